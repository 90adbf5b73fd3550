/*
 * infer.c: the GPT-2 forward pass for inference (see infer.h), in the numerics of
 * transformers.GPT2LMHeadModel: pre-LayerNorm blocks (eps 1e-5), causal softmax attention scaled by
 * 1/sqrt(hs), GELU in its tanh form, a final LayerNorm and the output head tied to wte.
 *
 * Where the time goes, and what each path is built for:
 * - Every linear layer and the output head is llm_gemv (gemv.c) over the model's packed weights,
 *   in the precision of its served copy (served.h), split over the worker threads by panels of
 *   output columns. A generation step is B rows (B = 1, the beams, or the live sequences of a batch, each at its
 *   own position): memory-bound, each step
 *   streams every weight once (0.5 GB for GPT-2 small in float32, 0.13 GB in int8). A prompt is T
 *   rows through the same kernels, in blocks of rows that reuse each panel from cache: as fast as
 *   sgemm on float32 weights, and reduced precisions need no float32 copy beside theirs.
 *   In the last layer of a prompt only the last row goes on past the key/value projection: its
 *   keys and values are all the cache needs, and only its logits are wanted.
 * - Prompt attention is two sgemms (BLAS, one thread each) per head and block of rows, heads spread
 *   over the threads; a step's attention is plain C per (beam, head).
 * - The token embedding reads wte's rows back from the packed head (llm_weights_column).
 */
#include "base/base.h"
#include "compute/compute.h"
#include "infer/infer.h"
#include "weights/weights.h"

#include <math.h>

#include "miscadmin.h"
#include "utils/memutils.h"

/* Rows of queries per attention block in the prompt pass: bounds the score buffer, and blocks
 * that end early skip most of the masked (future) keys. */
#define ATT_ROW_BLOCK 128

/* Rows of a batch's prompt pass, at least: one block of llm_gemv's rows (each reads the weights once). */
#define PROMPT_PASS_ROWS 96

/* ---- attention ----------------------------------------------------------------------------- */

/*
 * Prompt attention of layer l for query rows [r0, T) of the prompt whose rows start at row `off`
 * of qkv and att, for the heads [start, end): per head,
 * scores = Q K^T / sqrt(hs) by sgemm over a block of rows and the keys up to the block's last row,
 * causal softmax, then P V by sgemm into att's columns of that head. Keys and values come from the
 * prompt cache (already written). Each head has its own score buffer, so heads run in parallel.
 */
typedef struct PromptAttTask
{
	LlmInfer   *s;
	int			l;
	int			p;				/* prompt slot */
	size_t		off,			/* the prompt's first row in qkv and att */
				T,
				r0;
} PromptAttTask;

/* The key (or value) cache of layer l, prompt slot p: (ctx, C). */
static inline float *
prompt_cache(const LlmInfer *s, float *cache, size_t l, size_t p)
{
	return cache + (l * s->prompts + p) * s->ctx * s->C;
}

static void
attention_prompt_task(void *arg, size_t start, size_t end)
{
	const PromptAttTask *t = arg;
	const LlmInfer *s = t->s;
	size_t		C = s->C,
				hs = s->hs;
	const float *kc = prompt_cache(s, s->k_prompt, t->l, t->p);
	const float *vc = prompt_cache(s, s->v_prompt, t->l, t->p);
	float		scale = 1.0f / sqrtf((float) hs);

	for (size_t h = start; h < end; h++)
		llm_attention_prompt_head(s->att + t->off * C + h * hs, C, s->qkv + t->off * 3 * C + h * hs, 3 * C,
								  kc + h * hs, vc + h * hs, C, t->T, t->r0, hs, ATT_ROW_BLOCK, scale,
								  s->scores + h * (size_t) Min(s->max_prompt, ATT_ROW_BLOCK) * s->ctx);
}

typedef struct StepAttTask
{
	LlmInfer   *s;
	int			l;
} StepAttTask;

/*
 * One generation step's attention for the (row, head) pairs [start, end), ih = i * NH + h; row i
 * of the step is slot b = step_rows[i], which sees its prompt slot's Tp positions and its own G
 * generated ones (kv_rows: where each of them is). The pairs of one row are taken together,
 * position by position (llm_attention_step_row), so that each
 * cached key and value is read as one contiguous stretch of its heads (reading one head's 64
 * floats per position, a cache line apart from the next position's, left the reads waiting on
 * memory); each head's arithmetic is the same as one head alone: its scores in position order,
 * its softmax, then its weighted sum of values in position order.
 */
static void
attention_step_task(void *arg, size_t start, size_t end)
{
	const StepAttTask *t = arg;
	const LlmInfer *s = t->s;
	size_t		C = s->C,
				hs = s->hs,
				NH = s->NH,
				span = s->ctx + s->max_new; /* positions a row may see; scores per (row, head) */
	float		scale = 1.0f / sqrtf((float) hs);

	for (size_t ih0 = start, ih1; ih0 < end; ih0 = ih1)
	{
		size_t		i = ih0 / NH,
					h0 = ih0 % NH;
		const float *const *keys = s->kv_rows + i * 2 * span;

		ih1 = Min(end, (i + 1) * NH);
		llm_attention_step_row(s->att + i * C, s->scores + i * NH * span, span, s->qkv + i * 3 * C, keys,
							   keys + span, (size_t) s->kv_n[i], h0, ih1 - i * NH, hs, scale);
	}
}

/* ---- the forward passes -------------------------------------------------------------------- */

static float *
alloc_floats(size_t n)
{
	return (float *) MemoryContextAllocHuge(CurrentMemoryContext, Max(n, 1) * sizeof(float));
}

/* Scratch of llm_gemv for R rows of up to IC inputs, in any format (the precision may change). */
static size_t
gemv_scratch_size(size_t R, size_t IC)
{
	size_t		bytes = 0;

	for (int f = 0; f < LLM_WEIGHTS_FORMATS; f++)
		bytes = Max(bytes, llm_gemv_scratch_size((LlmWeightFormat) f, R, IC));
	return bytes;
}

/*
 * Beams (prompts 1): one prompt slot of max_prompt positions, and a generated cache of max_new
 * positions per beam. A batch (prompts = beams): each slot holds its prompt and then what it
 * generates, max_positions in all, so a slot reserves what one sequence can use.
 */
static LlmInfer *
infer_create(const LlmModel *m, bool batch, int beams, int prompts, int max_prompt, int max_new, int max_positions)
{
	LlmInfer   *s = palloc0(sizeof(LlmInfer));
	size_t		L = m->cfg.n_layer,
				C = m->cfg.d_model,
				V = m->cfg.vocab;
	size_t		R = Max(max_prompt, beams);
	size_t		scores;

	/* a batch's short prompts share passes (llm_infer_prompt_rows) */
	if (prompts > 1)
		R = Max(R, Min((size_t) prompts * max_prompt, PROMPT_PASS_ROWS));

	Assert(beams >= 1 && max_prompt >= 1 && max_new >= 0 && max_positions >= max_prompt);
	llm_blas_init();
	s->model = m;
	s->L = m->cfg.n_layer;
	s->NH = m->cfg.n_head;
	s->C = m->cfg.d_model;
	s->V = m->cfg.vocab;
	s->hs = s->C / s->NH;
	s->batch = batch;
	s->beams = beams;
	s->prompts = prompts;
	s->max_prompt = max_prompt;
	s->max_new = max_new;
	s->ctx = max_positions;
	s->rows = R;
	s->prompt_len = palloc0(sizeof(int) * prompts);
	s->n_new = palloc0(sizeof(int) * beams);

	s->k_prompt = alloc_floats(L * prompts * max_positions * C);
	s->v_prompt = alloc_floats(L * prompts * max_positions * C);
	s->k_new = alloc_floats(L * max_new * beams * C);
	s->v_new = alloc_floats(L * max_new * beams * C);
	s->path = palloc0(Max(sizeof(int) * beams * max_new, 1));
	s->path_tmp = palloc0(Max(sizeof(int) * beams * max_new, 1));
	s->step_rows = palloc(sizeof(int) * beams);
	s->adapter = palloc0(sizeof(LlmLora *) * beams);

	s->x = alloc_floats(R * C);
	s->ln = alloc_floats(R * C);
	s->qkv = alloc_floats(R * 3 * C);
	s->att = alloc_floats(R * C);
	s->fch = alloc_floats(R * 4 * C);
	/* prompt: a block of scores per head; step: one row of scores per (row, head) */
	scores = Max((size_t) s->NH * Min(max_prompt, ATT_ROW_BLOCK) * max_positions,
				 (size_t) beams * s->NH * (max_positions + max_new));
	s->scores = alloc_floats(scores);
	s->kv_rows = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(float *) * 2 * beams * (max_positions + max_new));
	s->kv_n = palloc(sizeof(int) * beams);
	s->logits = alloc_floats((size_t) beams * V);
	s->gemv_scratch = (void *) TYPEALIGN(64, MemoryContextAllocHuge(CurrentMemoryContext, gemv_scratch_size(R, 4 * C) + 64));
	return s;
}

LlmInfer *
llm_infer_create(const LlmModel *m, int beams, int max_prompt, int max_new)
{
	return infer_create(m, false, beams, 1, max_prompt, max_new, max_prompt);
}

LlmInfer *
llm_infer_create_rows(const LlmModel *m, int rows, int max_prompt, int max_positions)
{
	return infer_create(m, true, rows, rows, max_prompt, 0, max_positions);
}

void
llm_infer_set_adapter(LlmInfer *s, int row, const LlmLora *lora)
{
	Assert(row >= -1 && row < s->beams);
	Assert(lora == NULL || (lora->n_layer == s->L && strcmp(lora->model, s->model->cfg.model) == 0));
	for (int b = (row < 0 ? 0 : row); b < (row < 0 ? s->beams : row + 1); b++)
		s->adapter[b] = lora;
}

void
llm_infer_set_model(LlmInfer *s, const LlmModel *m)
{
	Assert(m->cfg.n_layer == s->L && m->cfg.d_model == s->C && m->cfg.vocab == s->V);
	s->model = m;
}

/* x (R, C) <- wte[tokens] + wpe[positions], wte's rows read back from the packed head */
static void
embed(LlmInfer *s, const int32 *tokens, const int *positions, size_t R)
{
	const LlmModel *m = s->model;
	size_t		C = s->C;

	for (size_t r = 0; r < R; r++)
	{
		float	   *x = s->x + r * C;
		const float *pe = m->p.wpe + (size_t) positions[r] * C;

		llm_weights_column(m->packed.fmt[LLM_WTE], x, m->packed.w[LLM_WTE], C, s->V, (size_t) tokens[r]);
		for (size_t i = 0; i < C; i++)
			x[i] += pe[i];
	}
}

/* out (R, OC) (+)= inp (R, IC) @ W + bias, W layer l's packed weights of this kind (the block's linear op) */
static void
linear(void *ctx, LlmParamKind kind, int l, float *out, const float *inp, const float *bias,
	   size_t R, size_t IC, size_t OC, bool accumulate)
{
	LlmInfer   *s = *(LlmInfer **) ctx;
	const LlmPacked *w = &s->model->packed;

	llm_gemv(w->fmt[kind], out, inp, w->w[kind] + (size_t) l * w->stride[kind], bias, R, IC, OC, accumulate,
			 s->gemv_scratch);
}

/* out (R, OC) += rows [r0, r1)'s update by adapter lora (NULL: none) of layer l's product of this kind */
static void
adapt_rows(const LlmLora *lora, LlmParamKind kind, int l, float *out, const float *inp, size_t r0, size_t r1,
		   size_t IC, size_t OC)
{
	if (lora == NULL || !lora->target[kind] || r1 <= r0)
		return;
	lora_forward_rows(out + r0 * OC, inp + r0 * IC, llm_lora_a(lora, kind, l), llm_lora_b(lora, kind, l), r1 - r0,
					  IC, OC, lora->rank, lora->scale);
}

/* logits (R, V) <- the final LayerNorm of x's rows (R, C) @ wte^T */
static void
head(LlmInfer *s, float *logits, const float *x, size_t R)
{
	const LlmModel *m = s->model;

	layernorm_forward(s->ln, NULL, NULL, x, m->p.lnfw, m->p.lnfb, R, s->C);
	llm_gemv(m->packed.fmt[LLM_WTE], logits, s->ln, m->packed.w[LLM_WTE], NULL, R, s->C, s->V, false, s->gemv_scratch);
}

/*
 * The block's activations in inference: one set for every layer, the residual stream x updated in
 * place (each projection added by llm_gemv's accumulate), GELU in place.
 */
static LlmBlockActs
infer_acts(LlmInfer *s)
{
	LlmBlockActs a = {.x_in = s->x, .x_mid = s->x, .x_out = s->x, .ln1 = s->ln, .qkv = s->qkv, .att = s->att,
	.ln2 = s->ln, .fch = s->fch, .fch_gelu = s->fch};

	return a;
}

/* A prompt pass: n prompts, prompt i in prompt slot ps[i], its T[i] rows from row off[i]. */
typedef struct PromptPass
{
	LlmInfer   *s;				/* first: the ops' ctx is also an LlmInfer ** */
	int			n;
	const int  *ps;
	const size_t *off;
	const int  *T;
} PromptPass;

/*
 * The prompt pass's attention: each prompt's keys and values into its cache, then its attention;
 * past the keys and values of the last layer only each prompt's last row goes on (moved to row i).
 */
static size_t
prompt_attention(void *ctx, int l, float *out, const float *qkv_rows, size_t R)
{
	const PromptPass *pp = ctx;
	LlmInfer   *s = pp->s;
	size_t		C = s->C;
	bool		last = (l == s->L - 1);

	for (int i = 0; i < pp->n; i++)
	{
		float	   *kc = prompt_cache(s, s->k_prompt, l, pp->ps[i]);
		float	   *vc = prompt_cache(s, s->v_prompt, l, pp->ps[i]);
		PromptAttTask att = {s, l, pp->ps[i], pp->off[i], pp->T[i], last ? (size_t) pp->T[i] - 1 : 0};

		for (int t = 0; t < pp->T[i]; t++)
		{
			const float *qkv = qkv_rows + (pp->off[i] + t) * 3 * C;

			memcpy(kc + (size_t) t * C, qkv + C, C * sizeof(float));
			memcpy(vc + (size_t) t * C, qkv + 2 * C, C * sizeof(float));
		}
		llm_parallel_for(s->NH, attention_prompt_task, &att);
	}
	if (!last)
		return R;
	for (int i = 0; i < pp->n; i++)
	{
		/* row i <- prompt i's last row; rows below i were moved already, none above is read */
		size_t		r = pp->off[i] + pp->T[i] - 1;

		memmove(s->x + i * C, s->x + r * C, C * sizeof(float));
		memmove(out + i * C, out + r * C, C * sizeof(float));
	}
	return (size_t) pp->n;
}

/*
 * The adapters' update in a prompt pass: prompt i's rows are [off[i], off[i] + T[i]) of the pass,
 * or row i alone past the last layer's attention (R == n then).
 */
static void
prompt_adapt(void *ctx, LlmParamKind kind, int l, float *out, const float *inp, size_t R, size_t IC, size_t OC)
{
	const PromptPass *pp = ctx;
	const LlmInfer *s = pp->s;
	bool		moved = R < pp->off[pp->n - 1] + pp->T[pp->n - 1];

	for (int i = 0; i < pp->n; i++)
	{
		const LlmLora *lora = s->adapter[s->prompts == 1 ? 0 : pp->ps[i]];

		if (moved)
			adapt_rows(lora, kind, l, out, inp, i, i + 1, IC, OC);
		else
			adapt_rows(lora, kind, l, out, inp, pp->off[i], pp->off[i] + pp->T[i], IC, OC);
	}
}

static const LlmBlockOps prompt_ops = {linear, prompt_attention, NULL, prompt_adapt};

/*
 * One prompt pass for n prompts at once: prompt i (T[i] tokens) into prompt slot ps[i]; their rows
 * are concatenated (sum of T[i] <= the row capacity), so each linear layer reads its weights once
 * for all of them. Each row's arithmetic is the same as in a pass of its prompt alone: LayerNorm,
 * GELU and llm_gemv work row by row, and attention runs per prompt with the same blocks of rows,
 * relative to the prompt's first row. Past the keys and values of the last layer only each
 * prompt's last row goes on (moved to row i); logits (n, V) <- those after each prompt's last
 * token.
 */
static void
infer_prompts(LlmInfer *s, int n, const int *ps, const int32 *const *tokens, const int *T, float *logits)
{
	const LlmParams *p = &s->model->p;
	const LlmLayout *lay = &s->model->layout;
	size_t		R = 0;
	size_t	   *off = palloc(sizeof(size_t) * n);	/* prompt i's first row */
	int		   *positions;
	int32	   *ids;
	PromptPass	pass = {s, n, ps, off, T};
	LlmBlockActs acts = infer_acts(s);

	for (int i = 0; i < n; i++)
	{
		Assert(T[i] >= 1 && T[i] <= s->max_prompt);
		off[i] = R;
		R += T[i];
	}
	Assert(R <= s->rows);
	positions = palloc(sizeof(int) * R);
	ids = palloc(sizeof(int32) * R);
	for (int i = 0; i < n; i++)
		for (int t = 0; t < T[i]; t++)
		{
			positions[off[i] + t] = t;
			ids[off[i] + t] = tokens[i][t];
		}
	llm_blas_set_threads(1);	/* attention's sgemms run on the pool's threads, one each */
	embed(s, ids, positions, R);
	pfree(positions);
	pfree(ids);

	for (int l = 0; l < s->L; l++)
	{
		CHECK_FOR_INTERRUPTS();
		llm_block_forward(&prompt_ops, &pass, p, lay, l, &acts, R);
	}
	CHECK_FOR_INTERRUPTS();
	head(s, logits, s->x, n);
	for (int i = 0; i < n; i++)
		s->prompt_len[ps[i]] = T[i];
	pfree(off);
}

const float *
llm_infer_prompt(LlmInfer *s, const int32 *tokens, int T)
{
	int			ps = 0;

	Assert(!s->batch);
	memset(s->n_new, 0, sizeof(int) * s->beams);
	infer_prompts(s, 1, &ps, &tokens, &T, s->logits);
	return s->logits;
}

const float *
llm_infer_prompt_row(LlmInfer *s, int row, const int32 *tokens, int T)
{
	return llm_infer_prompt_rows(s, 1, &row, &tokens, &T);
}

/* Consecutive prompts go into one pass as long as their tokens fit its rows. */
const float *
llm_infer_prompt_rows(LlmInfer *s, int n, const int *rows, const int32 *const *tokens, const int *T)
{
	Assert(s->batch && n >= 1 && n <= s->beams);
	for (int i0 = 0, i1; i0 < n; i0 = i1)
	{
		size_t		R = T[i0];

		for (i1 = i0 + 1; i1 < n && R + T[i1] <= (size_t) s->rows; i1++)
			R += T[i1];
		for (int i = i0; i < i1; i++)
		{
			Assert(rows[i] >= 0 && rows[i] < s->beams);
			s->n_new[rows[i]] = 0;
		}
		infer_prompts(s, i1 - i0, rows + i0, tokens + i0, T + i0, s->logits + (size_t) i0 * s->V);
	}
	return s->logits;
}

const float *
llm_infer_step(LlmInfer *s, const int32 *tokens)
{
	Assert(!s->batch);
	for (int b = 0; b < s->beams; b++)
		s->step_rows[b] = b;
	return llm_infer_step_rows(s, s->step_rows, s->beams, tokens);
}

/* A step: row i is row slot rows[i] at position positions[i] (beams: generated cache slot cache_at[i]). */
typedef struct StepPass
{
	LlmInfer   *s;				/* first: the ops' ctx is also an LlmInfer ** */
	const int  *rows;
	const int  *positions;
	const size_t *cache_at;
} StepPass;

/* The step's attention: each row's key and value into its cache, then its attention over all of them. */
static size_t
step_attention(void *ctx, int l, float *out, const float *qkv, size_t B)
{
	const StepPass *sp = ctx;
	LlmInfer   *s = sp->s;
	size_t		C = s->C,
				span = s->ctx + s->max_new;
	float	   *kn = s->k_new + (size_t) l * s->max_new * s->beams * C;
	float	   *vn = s->v_new + (size_t) l * s->max_new * s->beams * C;
	StepAttTask att = {s, l};

	for (size_t i = 0; i < B; i++)
	{
		float	   *k = s->batch ? prompt_cache(s, s->k_prompt, l, sp->rows[i]) + (size_t) sp->positions[i] * C
			: kn + sp->cache_at[i] * C;
		float	   *v = s->batch ? prompt_cache(s, s->v_prompt, l, sp->rows[i]) + (size_t) sp->positions[i] * C
			: vn + sp->cache_at[i] * C;

		memcpy(k, qkv + i * 3 * C + C, C * sizeof(float));
		memcpy(v, qkv + i * 3 * C + 2 * C, C * sizeof(float));
	}

	/*
	 * Where each row's positions are: its prompt slot's Tp, then its own generated ones: after the
	 * prompt in a batch's slot, else (beams) along the path of slots that hold its history.
	 */
	for (size_t i = 0; i < B; i++)
	{
		size_t		b = sp->rows[i],
					pr = s->prompts == 1 ? 0 : b,
					Tp = s->prompt_len[pr],
					n = Tp + s->n_new[b] + 1;	/* including this step's position */
		const float **keys = s->kv_rows + i * 2 * span,
				  **values = keys + span;
		const float *kp = prompt_cache(s, s->k_prompt, l, pr);
		const float *vp = prompt_cache(s, s->v_prompt, l, pr);
		const int  *path = s->path + b * s->max_new;

		for (size_t t = 0; t < n; t++)
		{
			bool		cached = t < Tp || s->batch;
			size_t		g = cached ? 0 : ((size_t) path[t - Tp] * s->max_new + t - Tp) * C;

			keys[t] = cached ? kp + t * C : kn + g;
			values[t] = cached ? vp + t * C : vn + g;
		}
		s->kv_n[i] = (int) n;
	}
	llm_parallel_for(B * s->NH, attention_step_task, &att);
	return B;
}

/* The adapters' update in a step: row i is row slot rows[i]; runs of rows with one adapter together. */
static void
step_adapt(void *ctx, LlmParamKind kind, int l, float *out, const float *inp, size_t B, size_t IC, size_t OC)
{
	const StepPass *sp = ctx;
	const LlmInfer *s = sp->s;

	for (size_t i0 = 0, i1; i0 < B; i0 = i1)
	{
		const LlmLora *lora = s->adapter[sp->rows[i0]];

		for (i1 = i0 + 1; i1 < B && s->adapter[sp->rows[i1]] == lora; i1++)
			;
		adapt_rows(lora, kind, l, out, inp, i0, i1, IC, OC);
	}
}

static const LlmBlockOps step_ops = {linear, step_attention, NULL, step_adapt};

/* Row i of a step is slot rows[i]; B below is the number of rows of this step. */
const float *
llm_infer_step_rows(LlmInfer *s, const int *rows, int n, const int32 *tokens)
{
	const LlmParams *p = &s->model->p;
	const LlmLayout *lay = &s->model->layout;
	size_t		B = n;
	int		   *positions = palloc(sizeof(int) * B);
	size_t	   *cache_at = palloc(sizeof(size_t) * B);	/* row i's slot in the generated cache */
	StepPass	pass = {s, rows, positions, cache_at};
	LlmBlockActs acts = infer_acts(s);

	Assert(n >= 1 && n <= s->beams);
	for (size_t i = 0; i < B; i++)
	{
		int			b = rows[i],
					g = s->n_new[b];

		if (!s->batch)
		{
			if (g >= s->max_new)
				elog(ERROR, "generation cache of %d positions is full", s->max_new);
			positions[i] = s->prompt_len[0] + g;
			s->path[(size_t) b * s->max_new + g] = b;
			cache_at[i] = (size_t) b * s->max_new + g;
		}
		else
		{
			positions[i] = s->prompt_len[b] + g;
			if (positions[i] >= s->ctx)
				elog(ERROR, "the cache of %d positions of row slot %d is full", s->ctx, b);
		}
	}
	if (rows != s->step_rows)
		memcpy(s->step_rows, rows, sizeof(int) * B);
	embed(s, tokens, positions, B);

	for (int l = 0; l < s->L; l++)
	{
		CHECK_FOR_INTERRUPTS();
		llm_block_forward(&step_ops, &pass, p, lay, l, &acts, B);
	}
	CHECK_FOR_INTERRUPTS();
	head(s, s->logits, s->x, B);
	for (size_t i = 0; i < B; i++)
		s->n_new[rows[i]]++;
	pfree(positions);
	pfree(cache_at);
	return s->logits;
}

size_t
llm_infer_cache_bytes(const LlmInfer *s)
{
	return 2 * sizeof(float) * (size_t) s->L * s->C *
		((size_t) s->prompts * s->ctx + (size_t) s->beams * s->max_new);
}

void
llm_infer_reorder(LlmInfer *s, const int *parents)
{
	int		   *tmp = s->path_tmp;

	for (int b = 0; b < s->beams; b++)
		memcpy(tmp + (size_t) b * s->max_new, s->path + (size_t) parents[b] * s->max_new,
			   s->n_new[parents[b]] * sizeof(int));
	s->path_tmp = s->path;
	s->path = tmp;
}
