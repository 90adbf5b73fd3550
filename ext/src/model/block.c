/*
 * block.c: the GPT-2 block (see model.h), in the numerics of transformers.GPT2LMHeadModel:
 * LayerNorm with eps 1e-5, GELU in its tanh form (compute/kernels.h).
 */
#include "base/base.h"
#include "model/model.h"

/* out (+)= inp @ W + b, plus the rows' adapters' update of that product (model.h) */
static void
linear(const LlmBlockOps *ops, void *ctx, LlmParamKind weight, int l, float *out, const float *inp,
	   const float *bias, size_t R, size_t IC, size_t OC, bool accumulate)
{
	ops->linear(ctx, weight, l, out, inp, bias, R, IC, OC, accumulate);
	if (ops->adapt != NULL)
		ops->adapt(ctx, weight, l, out, inp, R, IC, OC);
}

/* x_out = x_in + dropout(inp @ W + b): into a projection first, or in place. */
static void
add_projection(const LlmBlockOps *ops, void *ctx, const LlmBlockActs *a, LlmParamKind weight, int l,
			   float *x_out, const float *x_in, const float *inp, const float *bias, size_t R, size_t IC,
			   size_t C, int site)
{
	if (a->proj == NULL)
	{
		linear(ops, ctx, weight, l, x_out, inp, bias, R, IC, C, true);
		return;
	}
	linear(ops, ctx, weight, l, a->proj, inp, bias, R, IC, C, false);
	if (ops->dropout != NULL)
		ops->dropout(ctx, l, site, a->proj, R * C);
	residual_forward(x_out, x_in, a->proj, R * C);
}

size_t
llm_block_forward(const LlmBlockOps *ops, void *ctx, const LlmParams *p, const LlmLayout *layout, int l,
				  const LlmBlockActs *a, size_t R)
{
	size_t		C = layout->size[LLM_LN1W];
	size_t		Rout;

#define LAYER(kind, base) ((base) + (size_t) l * layout->size[LLM_##kind])
	layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, a->x_in, LAYER(LN1W, p->ln1w), LAYER(LN1B, p->ln1b),
					  (int) R, (int) C);
	linear(ops, ctx, LLM_QKVW, l, a->qkv, a->ln1, LAYER(QKVB, p->qkvb), R, C, 3 * C, false);
	Rout = ops->attention(ctx, l, a->att, a->qkv, R);
	add_projection(ops, ctx, a, LLM_ATTPROJW, l, a->x_mid, a->x_in, a->att, LAYER(ATTPROJB, p->attprojb),
				   Rout, C, C, 1);
	layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->x_mid, LAYER(LN2W, p->ln2w), LAYER(LN2B, p->ln2b),
					  (int) Rout, (int) C);
	linear(ops, ctx, LLM_FCW, l, a->fch, a->ln2, LAYER(FCB, p->fcb), Rout, C, 4 * C, false);
	gelu_forward(a->fch_gelu, a->fch, Rout * 4 * C);
	add_projection(ops, ctx, a, LLM_FCPROJW, l, a->x_out, a->x_mid, a->fch_gelu, LAYER(FCPROJB, p->fcprojb),
				   Rout, 4 * C, C, 2);
#undef LAYER
	return Rout;
}
