/*
 * full_pass.c: the block's operations (model.h) for training and evaluation, on the float32
 * block: every product an sgemm on BLAS's threads (matmul_forward; measuring's the same on any
 * number of threads, llm_sgemm_repeatable), attention causal over whole
 * sequences of T tokens, dropout from the step's keys (training only).
 */
#include "base/base.h"
#include "train/eval.h"

static const float *
weights(const LlmModel *m, LlmParamKind kind, int l)
{
	static const size_t offset_of[LLM_NUM_KINDS] = {
		[LLM_QKVW] = offsetof(LlmParams, qkvw), [LLM_ATTPROJW] = offsetof(LlmParams, attprojw),
		[LLM_FCW] = offsetof(LlmParams, fcw), [LLM_FCPROJW] = offsetof(LlmParams, fcprojw),
	};
	const float *base = *(const float *const *) ((const char *) &m->p + offset_of[kind]);

	return base + (size_t) l * m->layout.size[kind];
}

static void
full_linear(void *ctx, LlmParamKind weight, int l, float *out, const float *inp, const float *bias,
			size_t R, size_t IC, size_t OC, bool accumulate)
{
	const LlmFullPass *f = ctx;

	Assert(!accumulate);
	if (!f->repeatable)
	{
		matmul_forward(out, inp, weights(f->model, weight, l), bias, (int) R, (int) IC, (int) OC);
		return;
	}
	for (size_t r = 0; r < R; r++)
		memcpy(out + r * OC, bias, OC * sizeof(float));
	llm_sgemm_repeatable(LlmCblasNoTrans, (int) R, (int) OC, (int) IC, inp, (int) IC, weights(f->model, weight, l),
						 (int) OC, 1.0f, out, (int) OC);
}

static size_t
full_attention(void *ctx, int l, float *out, const float *qkv, size_t R)
{
	const LlmFullPass *f = ctx;
	float	   *att = f->att + (f->att_per_layer ? (size_t) l * f->B * f->NH * f->T * f->T : 0);

	attention_forward(out, att, f->scratch, qkv, f->B, f->T, f->model->cfg.d_model, f->NH, f->dropout,
					  llm_full_pass_key(f, l, 0));
	return R;
}

static void
full_dropout(void *ctx, int l, int site, float *x, size_t N)
{
	const LlmFullPass *f = ctx;

	dropout_forward(x, N, f->dropout, llm_full_pass_key(f, l, site));
}

/* The adapter's update of the product: by sgemm in training, row by row when measuring. */
static void
full_adapt(void *ctx, LlmParamKind kind, int l, float *out, const float *inp, size_t R, size_t IC, size_t OC)
{
	const LlmFullPass *f = ctx;
	const LlmLora *lora = f->lora;

	if (lora == NULL || !lora->target[kind])
		return;
	if (f->repeatable)
	{
		Assert(f->lora_dropout == 0);
		lora_forward_rows(out, inp, llm_lora_a(lora, kind, l), llm_lora_b(lora, kind, l), R, IC, OC, lora->rank,
						  lora->scale);
		return;
	}
	if (f->lora_dropout > 0)
	{
		memcpy(f->lora_x, inp, R * IC * sizeof(float));
		dropout_forward(f->lora_x, R * IC, f->lora_dropout, llm_full_pass_lora_key(f, l, kind));
		inp = f->lora_x;
	}
	lora_forward(out, f->lora_h, inp, llm_lora_a(lora, kind, l), llm_lora_b(lora, kind, l), (int) R, (int) IC,
				 (int) OC, lora->rank, lora->scale);
}

const LlmBlockOps llm_full_pass_ops = {full_linear, full_attention, full_dropout, full_adapt};

uint64
llm_full_pass_key(const LlmFullPass *f, int layer, int site)
{
	return dropout_key(f->seed, (uint64) f->step, (uint64) f->micro, (uint64) (layer + 1) * 4 + site);
}

uint64
llm_full_pass_lora_key(const LlmFullPass *f, int layer, LlmParamKind kind)
{
	/* the seed salted ("LoRA"), so that no mask repeats one of the model's sites */
	return dropout_key(f->seed ^ UINT64CONST(0x4c6f5241), (uint64) f->step, (uint64) f->micro,
					   (uint64) (layer + 1) * LLM_NUM_KINDS + kind);
}
