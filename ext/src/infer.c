/*
 * infer.c: the GPT-2 forward pass for inference (see infer.h), in the numerics of
 * transformers.GPT2LMHeadModel: pre-LayerNorm blocks (eps 1e-5), causal softmax attention scaled by
 * 1/sqrt(hs), GELU in its tanh form, a final LayerNorm and the output head tied to wte.
 *
 * Where the time goes, and what each path is built for:
 * - A prompt is T rows: every linear layer is an sgemm (BLAS) per worker thread on its share of
 *   the columns, attention two sgemms per head and block of rows, heads spread over the threads.
 *   In the last layer only the last row goes on past the key/value projection: its keys and
 *   values are all the cache needs, and only its logits are wanted.
 * - A generation step is B rows (B = 1, or the beams). That is memory-bound: each step streams every
 *   weight once (0.5 GB for GPT-2 small). BLAS is slow for so few rows, so a plain-C kernel reads each
 *   weight row once for all B rows, split over the worker threads by output columns.
 * - The output head (V x C) is the largest product; it runs for one position per sequence only.
 */
/*
 * Floating-point traps are never enabled in a backend; without this, GCC does not if-convert the
 * comparisons in our loops (clamps, maxima), and those loops stay scalar.
 */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize ("no-trapping-math")
#endif

#include "pg_llm.h"
#include "infer.h"

#include <math.h>

#include "miscadmin.h"
#include "utils/memutils.h"

/* Hot loops get an AVX2+FMA clone chosen at load time; the default clone runs on any x86-64. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLM_SIMD __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LLM_SIMD
#endif

/*
 * Up to this many rows (the beams of a step, a short prompt) the matrix-vector kernel, bound by
 * reading the weights once, is used; with more rows the arithmetic dominates and sgemm wins.
 */
#define GEMV_MAX_ROWS 8

/* Columns per work item of the matrix-vector kernel and of sgemm (multiples of the vector width). */
#define GEMV_COL_BLOCK 64
#define SGEMM_COL_BLOCK 16

/* Rows of queries per attention block in the prompt pass: bounds the score buffer, and blocks
 * that end early skip most of the masked (future) keys. */
#define ATT_ROW_BLOCK 128

#define LN_EPS 1e-5f

/* ---- vectorisable elementwise helpers ------------------------------------------------------ */

/*
 * exp(x) for x <= 88, written so that the compiler vectorises loops that call it: 2^n * p(r) with
 * n = round(x / ln 2), r = x - n ln 2 and the Cephes polynomial for p (about 1 ulp). Below -87 it
 * returns the smallest normal float instead of 0, which is as good as 0 wherever it is used here.
 */
static inline float
fast_expf(float x)
{
	float		n,
				r,
				z,
				p,
				scale;
	int32		bits;

	x = x < -87.0f ? -87.0f : x;
	x = x > 88.0f ? 88.0f : x;
	/* round to nearest by the 1.5 * 2^23 trick (no libm call, so it vectorises) */
	n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
	r = x - n * 0.693359375f;
	r = r - n * -2.12194440e-4f;
	z = r * r;
	p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
		  4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
	p = p * z + r + 1.0f;
	bits = ((int32) n + 127) << 23;
	memcpy(&scale, &bits, sizeof(scale));
	return p * scale;
}

/* Sums with 16 independent lanes: vectorises without reassociating a single accumulator. */
static inline float
sum_floats(const float *x, size_t n)
{
	float		acc[16] = {0};
	float		s = 0.0f;
	size_t		i = 0;

	for (; i + 16 <= n; i += 16)
		for (int k = 0; k < 16; k++)
			acc[k] += x[i + k];
	for (; i < n; i++)
		s += x[i];
	for (int k = 0; k < 16; k++)
		s += acc[k];
	return s;
}

static inline float
dot(const float *restrict a, const float *restrict b, size_t n)
{
	float		acc[16] = {0};
	float		s = 0.0f;
	size_t		i = 0;

	for (; i + 16 <= n; i += 16)
		for (int k = 0; k < 16; k++)
			acc[k] += a[i + k] * b[i + k];
	for (; i < n; i++)
		s += a[i] * b[i];
	for (int k = 0; k < 16; k++)
		s += acc[k];
	return s;
}

static inline float
max_floats(const float *x, size_t n)
{
	float		acc[8];
	float		m = x[0];
	size_t		i = 0;

	for (int k = 0; k < 8; k++)
		acc[k] = x[0];
	for (; i + 8 <= n; i += 8)
		for (int k = 0; k < 8; k++)
			acc[k] = x[i + k] > acc[k] ? x[i + k] : acc[k];
	for (; i < n; i++)
		m = x[i] > m ? x[i] : m;
	for (int k = 0; k < 8; k++)
		m = acc[k] > m ? acc[k] : m;
	return m;
}

/* x (n) <- softmax(x) */
LLM_SIMD static void
softmax_inplace(float *x, size_t n)
{
	float		m = max_floats(x, n);
	float		inv;

	for (size_t i = 0; i < n; i++)
		x[i] = fast_expf(x[i] - m);
	inv = 1.0f / sum_floats(x, n);
	for (size_t i = 0; i < n; i++)
		x[i] *= inv;
}

/* out (R, C) <- LayerNorm(inp (R, C)) * w + b, rows [start, end) */
typedef struct LayerNormTask
{
	float	   *out;
	const float *inp,
			   *w,
			   *b;
	size_t		C;
} LayerNormTask;

LLM_SIMD static void
layernorm_task(void *arg, size_t start, size_t end)
{
	const LayerNormTask *t = arg;
	size_t		C = t->C;

	for (size_t r = start; r < end; r++)
	{
		const float *restrict x = t->inp + r * C;
		float	   *restrict y = t->out + r * C;
		float		mean = sum_floats(x, C) / (float) C;
		float		acc[16] = {0};
		float		var = 0.0f;
		float		rstd;
		size_t		i = 0;

		for (; i + 16 <= C; i += 16)
			for (int k = 0; k < 16; k++)
				acc[k] += (x[i + k] - mean) * (x[i + k] - mean);
		for (; i < C; i++)
			var += (x[i] - mean) * (x[i] - mean);
		for (int k = 0; k < 16; k++)
			var += acc[k];
		rstd = 1.0f / sqrtf(var / (float) C + LN_EPS);
		for (i = 0; i < C; i++)
			y[i] = (x[i] - mean) * rstd * t->w[i] + t->b[i];
	}
}

static void
layernorm(float *out, const float *inp, const float *w, const float *b, size_t R, size_t C)
{
	LayerNormTask t = {out, inp, w, b, C};

	if (R >= 64)
		llm_parallel_for(R, layernorm_task, &t);
	else
		layernorm_task(&t, 0, R);
}

/*
 * x (n) <- GELU(x), tanh form. 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)), which keeps full relative
 * precision in both tails.
 */
typedef struct GeluTask
{
	float	   *x;
} GeluTask;

LLM_SIMD static void
gelu_task(void *arg, size_t start, size_t end)
{
	float	   *x = ((GeluTask *) arg)->x;

	for (size_t i = start; i < end; i++)
	{
		float		v = x[i];
		float		u = 0.7978845608028654f * (v + 0.044715f * v * v * v);

		x[i] = v / (1.0f + fast_expf(-2.0f * u));
	}
}

static void
gelu(float *x, size_t n)
{
	GeluTask	t = {x};

	/* worth waking the workers only for a prompt's worth of rows */
	if (n >= 65536)
		llm_parallel_for(n, gelu_task, &t);
	else
		gelu_task(&t, 0, n);
}

/* ---- linear layers ------------------------------------------------------------------------- */

typedef struct MatmulTask
{
	float	   *out;			/* (R, OC) */
	const float *inp;			/* (R, IC) */
	const float *w;				/* (IC, OC) */
	const float *bias;			/* (OC) */
	size_t		R,
				IC,
				OC;
	bool		accumulate;		/* out += ..., else out = ... */
} MatmulTask;

/*
 * out[:, cols] (+)= bias[cols] + inp @ w[:, cols] for the columns of work items [start, end).
 * Four weight rows at a time: each weight is loaded once for all R rows, and each output element is
 * loaded and stored once per four weight rows (from L1, since a share of columns is small).
 */
LLM_SIMD static void
gemv_task(void *arg, size_t start, size_t end)
{
	const MatmulTask *t = arg;
	size_t		j0 = start * GEMV_COL_BLOCK;
	size_t		j1 = Min(end * GEMV_COL_BLOCK, t->OC);
	size_t		IC = t->IC,
				OC = t->OC;
	size_t		i = 0;

	for (size_t r = 0; r < t->R; r++)
	{
		float	   *restrict y = t->out + r * OC;

		if (t->accumulate)
			for (size_t j = j0; j < j1; j++)
				y[j] += t->bias[j];
		else
			for (size_t j = j0; j < j1; j++)
				y[j] = t->bias[j];
	}
	for (; i + 4 <= IC; i += 4)
	{
		const float *restrict w0 = t->w + i * OC;
		const float *restrict w1 = w0 + OC;
		const float *restrict w2 = w1 + OC;
		const float *restrict w3 = w2 + OC;

		for (size_t r = 0; r < t->R; r++)
		{
			const float *x = t->inp + r * IC + i;
			float		a = x[0],
						b = x[1],
						c = x[2],
						d = x[3];
			float	   *restrict y = t->out + r * OC;

			for (size_t j = j0; j < j1; j++)
				y[j] += a * w0[j] + b * w1[j] + c * w2[j] + d * w3[j];
		}
	}
	for (; i < IC; i++)
	{
		const float *restrict w0 = t->w + i * OC;

		for (size_t r = 0; r < t->R; r++)
		{
			float		a = t->inp[r * IC + i];
			float	   *restrict y = t->out + r * OC;

			for (size_t j = j0; j < j1; j++)
				y[j] += a * w0[j];
		}
	}
}

/*
 * Many rows: each worker runs one single-threaded sgemm on its share of the columns. One split per
 * product (rather than BLAS's own threads) keeps both cores busy with no hand-off between BLAS's
 * threads and the pool's, and a late thread delays a product once, not at every block.
 */
LLM_SIMD static void
sgemm_task(void *arg, size_t start, size_t end)
{
	const MatmulTask *t = arg;
	size_t		j0 = start * SGEMM_COL_BLOCK;
	size_t		j1 = Min(end * SGEMM_COL_BLOCK, t->OC);

	for (size_t r = 0; r < t->R; r++)
	{
		float	   *restrict y = t->out + r * t->OC;

		if (t->accumulate)
			for (size_t j = j0; j < j1; j++)
				y[j] += t->bias[j];
		else
			for (size_t j = j0; j < j1; j++)
				y[j] = t->bias[j];
	}
	llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasNoTrans, (int) t->R, (int) (j1 - j0),
					(int) t->IC, 1.0f, t->inp, (int) t->IC, t->w + j0, (int) t->OC,
					1.0f, t->out + j0, (int) t->OC);
}

/* out (R, OC) (+)= bias + inp (R, IC) @ w (IC, OC) */
static void
matmul(float *out, const float *inp, const float *w, const float *bias,
	   size_t R, size_t IC, size_t OC, bool accumulate)
{
	MatmulTask	t = {out, inp, w, bias, R, IC, OC, accumulate};

	if (R <= GEMV_MAX_ROWS)
		llm_parallel_for((OC + GEMV_COL_BLOCK - 1) / GEMV_COL_BLOCK, gemv_task, &t);
	else
		llm_parallel_for((OC + SGEMM_COL_BLOCK - 1) / SGEMM_COL_BLOCK, sgemm_task, &t);
}

/* The output head: logits (R, V) = inp (R, C) @ wte^T; each wte row is read once for all R rows. */
typedef struct HeadTask
{
	float	   *logits;
	const float *inp;
	const float *wte;
	size_t		R,
				C,
				V;
} HeadTask;

LLM_SIMD static void
head_task(void *arg, size_t start, size_t end)
{
	const HeadTask *t = arg;

	for (size_t v = start; v < end; v++)
		for (size_t r = 0; r < t->R; r++)
			t->logits[r * t->V + v] = dot(t->inp + r * t->C, t->wte + v * t->C, t->C);
}

static void
lm_head(float *logits, const float *inp, const float *wte, size_t R, size_t C, size_t V)
{
	HeadTask	t = {logits, inp, wte, R, C, V};

	llm_parallel_for(V, head_task, &t);
}

/* ---- attention ----------------------------------------------------------------------------- */

/*
 * Prompt attention of layer l for query rows [r0, T), for the heads [start, end): per head,
 * scores = Q K^T / sqrt(hs) by sgemm over a block of rows and the keys up to the block's last row,
 * causal softmax, then P V by sgemm into att's columns of that head. Keys and values come from the
 * prompt cache (already written). Each head has its own score buffer, so heads run in parallel.
 */
typedef struct PromptAttTask
{
	LlmInfer   *s;
	int			l;
	size_t		T,
				r0;
} PromptAttTask;

LLM_SIMD static void
attention_prompt_task(void *arg, size_t start, size_t end)
{
	const PromptAttTask *t = arg;
	const LlmInfer *s = t->s;
	size_t		C = s->C,
				hs = s->hs,
				T = t->T;
	const float *kc = s->k_prompt + (size_t) t->l * s->max_prompt * C;
	const float *vc = s->v_prompt + (size_t) t->l * s->max_prompt * C;
	float		scale = 1.0f / sqrtf((float) hs);

	for (size_t h = start; h < end; h++)
	{
		float	   *S = s->scores + h * (size_t) Min(s->max_prompt, ATT_ROW_BLOCK) * s->max_prompt;

		for (size_t b0 = t->r0; b0 < T; b0 += ATT_ROW_BLOCK)
		{
			size_t		b1 = Min(b0 + ATT_ROW_BLOCK, T);
			size_t		M = b1 - b0;
			size_t		N = b1;		/* keys 0 .. b1-1 */

			llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasTrans, (int) M, (int) N, (int) hs,
							scale, s->qkv + b0 * 3 * C + h * hs, (int) (3 * C), kc + h * hs, (int) C,
							0.0f, S, (int) N);
			for (size_t i = 0; i < M; i++)
			{
				float	   *row = S + i * N;
				size_t		n = b0 + i + 1;	/* causal: keys 0 .. b0+i */

				softmax_inplace(row, n);
				memset(row + n, 0, (N - n) * sizeof(float));
			}
			llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasNoTrans, (int) M, (int) hs, (int) N,
							1.0f, S, (int) N, vc + h * hs, (int) C,
							0.0f, s->att + b0 * C + h * hs, (int) C);
		}
	}
}

typedef struct StepAttTask
{
	LlmInfer   *s;
	int			l;
} StepAttTask;

/* One generation step's attention for the (beam, head) pairs [start, end). */
LLM_SIMD static void
attention_step_task(void *arg, size_t start, size_t end)
{
	const StepAttTask *t = arg;
	const LlmInfer *s = t->s;
	size_t		C = s->C,
				hs = s->hs,
				B = s->beams,
				Tp = s->prompt_len,
				G = s->n_new + 1;	/* including this step's position */
	size_t		l = t->l;
	const float *kp = s->k_prompt + l * s->max_prompt * C;
	const float *vp = s->v_prompt + l * s->max_prompt * C;
	const float *kn = s->k_new + l * s->max_new * B * C;
	const float *vn = s->v_new + l * s->max_new * B * C;
	float		scale = 1.0f / sqrtf((float) hs);

	for (size_t bh = start; bh < end; bh++)
	{
		size_t		b = bh / s->NH,
					h = bh % s->NH;
		const float *q = s->qkv + b * 3 * C + h * hs;
		const int  *path = s->path + b * s->max_new;
		float	   *p = s->scores + bh * (s->max_prompt + s->max_new);
		float	   *out = s->att + b * C + h * hs;

		for (size_t t2 = 0; t2 < Tp; t2++)
			p[t2] = dot(q, kp + t2 * C + h * hs, hs) * scale;
		for (size_t g = 0; g < G; g++)
			p[Tp + g] = dot(q, kn + (g * B + path[g]) * C + h * hs, hs) * scale;
		softmax_inplace(p, Tp + G);

		memset(out, 0, hs * sizeof(float));
		for (size_t t2 = 0; t2 < Tp; t2++)
		{
			const float *v = vp + t2 * C + h * hs;
			float		pt = p[t2];

			for (size_t k = 0; k < hs; k++)
				out[k] += pt * v[k];
		}
		for (size_t g = 0; g < G; g++)
		{
			const float *v = vn + (g * B + path[g]) * C + h * hs;
			float		pt = p[Tp + g];

			for (size_t k = 0; k < hs; k++)
				out[k] += pt * v[k];
		}
	}
}

/* ---- the forward passes -------------------------------------------------------------------- */

static float *
alloc_floats(size_t n)
{
	return (float *) MemoryContextAllocHuge(CurrentMemoryContext, Max(n, 1) * sizeof(float));
}

LlmInfer *
llm_infer_create(const LlmModel *m, int beams, int max_prompt, int max_new)
{
	LlmInfer   *s = palloc0(sizeof(LlmInfer));
	size_t		L = m->cfg.n_layer,
				C = m->cfg.d_model,
				V = m->cfg.vocab;
	size_t		R = Max(max_prompt, beams);
	size_t		scores;

	Assert(beams >= 1 && max_prompt >= 1 && max_new >= 0);
	llm_blas_init();
	s->model = m;
	s->L = m->cfg.n_layer;
	s->NH = m->cfg.n_head;
	s->C = m->cfg.d_model;
	s->V = m->cfg.vocab;
	s->hs = s->C / s->NH;
	s->beams = beams;
	s->max_prompt = max_prompt;
	s->max_new = max_new;

	s->k_prompt = alloc_floats(L * max_prompt * C);
	s->v_prompt = alloc_floats(L * max_prompt * C);
	s->k_new = alloc_floats(L * max_new * beams * C);
	s->v_new = alloc_floats(L * max_new * beams * C);
	s->path = palloc0(Max(sizeof(int) * beams * max_new, 1));
	s->path_tmp = palloc0(Max(sizeof(int) * beams * max_new, 1));

	s->x = alloc_floats(R * C);
	s->ln = alloc_floats(R * C);
	s->qkv = alloc_floats(R * 3 * C);
	s->att = alloc_floats(R * C);
	s->fch = alloc_floats(R * 4 * C);
	/* prompt: a block of scores per head; step: one row of scores per (beam, head) */
	scores = Max((size_t) s->NH * Min(max_prompt, ATT_ROW_BLOCK) * max_prompt,
				 (size_t) beams * s->NH * (max_prompt + max_new));
	s->scores = alloc_floats(scores);
	s->logits = alloc_floats((size_t) beams * V);
	return s;
}

void
llm_infer_set_model(LlmInfer *s, const LlmModel *m)
{
	Assert(m->cfg.n_layer == s->L && m->cfg.d_model == s->C && m->cfg.vocab == s->V);
	s->model = m;
}

/* x (R, C) <- wte[tokens] + wpe[positions] */
static void
embed(float *x, const LlmParams *p, const int32 *tokens, const int *positions, size_t R, size_t C)
{
	for (size_t r = 0; r < R; r++)
	{
		const float *te = p->wte + (size_t) tokens[r] * C;
		const float *pe = p->wpe + (size_t) positions[r] * C;

		for (size_t i = 0; i < C; i++)
			x[r * C + i] = te[i] + pe[i];
	}
}

const float *
llm_infer_prompt(LlmInfer *s, const int32 *tokens, int T)
{
	const LlmParams *p = &s->model->p;
	const LlmLayout *lay = &s->model->layout;
	size_t		C = s->C;
	int		   *positions = palloc(sizeof(int) * T);
	PromptAttTask att = {s, 0, T, 0};

	Assert(T >= 1 && T <= s->max_prompt);
	llm_blas_set_threads(1);	/* products are split over the pool: see sgemm_task */
	for (int t = 0; t < T; t++)
		positions[t] = t;
	embed(s->x, p, tokens, positions, T, C);
	pfree(positions);

	for (int l = 0; l < s->L; l++)
	{
		/* past the keys and values, the last layer only needs the last row */
		size_t		r0 = (l == s->L - 1) ? (size_t) T - 1 : 0;
		size_t		R = T - r0;
		float	   *kc = s->k_prompt + (size_t) l * s->max_prompt * C;
		float	   *vc = s->v_prompt + (size_t) l * s->max_prompt * C;

		CHECK_FOR_INTERRUPTS();
		layernorm(s->ln, s->x, p->ln1w + l * lay->size[LLM_LN1W], p->ln1b + l * lay->size[LLM_LN1B], T, C);
		matmul(s->qkv, s->ln, p->qkvw + l * lay->size[LLM_QKVW], p->qkvb + l * lay->size[LLM_QKVB],
			   T, C, 3 * C, false);
		for (int t = 0; t < T; t++)
		{
			memcpy(kc + (size_t) t * C, s->qkv + (size_t) t * 3 * C + C, C * sizeof(float));
			memcpy(vc + (size_t) t * C, s->qkv + (size_t) t * 3 * C + 2 * C, C * sizeof(float));
		}
		att.l = l;
		att.r0 = r0;
		llm_parallel_for(s->NH, attention_prompt_task, &att);
		matmul(s->x + r0 * C, s->att + r0 * C, p->attprojw + l * lay->size[LLM_ATTPROJW],
			   p->attprojb + l * lay->size[LLM_ATTPROJB], R, C, C, true);
		layernorm(s->ln + r0 * C, s->x + r0 * C, p->ln2w + l * lay->size[LLM_LN2W],
				  p->ln2b + l * lay->size[LLM_LN2B], R, C);
		matmul(s->fch + r0 * 4 * C, s->ln + r0 * C, p->fcw + l * lay->size[LLM_FCW],
			   p->fcb + l * lay->size[LLM_FCB], R, C, 4 * C, false);
		gelu(s->fch + r0 * 4 * C, R * 4 * C);
		matmul(s->x + r0 * C, s->fch + r0 * 4 * C, p->fcprojw + l * lay->size[LLM_FCPROJW],
			   p->fcprojb + l * lay->size[LLM_FCPROJB], R, 4 * C, C, true);
	}
	CHECK_FOR_INTERRUPTS();
	layernorm(s->ln, s->x + (size_t) (T - 1) * C, p->lnfw, p->lnfb, 1, C);
	lm_head(s->logits, s->ln, p->wte, 1, C, s->V);
	s->prompt_len = T;
	s->n_new = 0;
	return s->logits;
}

const float *
llm_infer_step(LlmInfer *s, const int32 *tokens)
{
	const LlmParams *p = &s->model->p;
	const LlmLayout *lay = &s->model->layout;
	size_t		C = s->C,
				B = s->beams,
				G = s->n_new;
	int		   *positions = palloc(sizeof(int) * B);
	StepAttTask att = {s, 0};

	if (G >= (size_t) s->max_new)
		elog(ERROR, "generation cache of %d positions is full", s->max_new);
	llm_blas_set_threads(1);	/* more than GEMV_MAX_ROWS beams split sgemm over the pool */
	for (size_t b = 0; b < B; b++)
	{
		positions[b] = s->prompt_len + (int) G;
		s->path[b * s->max_new + G] = (int) b;
	}
	embed(s->x, p, tokens, positions, B, C);
	pfree(positions);

	for (int l = 0; l < s->L; l++)
	{
		float	   *kn = s->k_new + ((size_t) l * s->max_new + G) * B * C;
		float	   *vn = s->v_new + ((size_t) l * s->max_new + G) * B * C;

		CHECK_FOR_INTERRUPTS();
		layernorm(s->ln, s->x, p->ln1w + l * lay->size[LLM_LN1W], p->ln1b + l * lay->size[LLM_LN1B], B, C);
		matmul(s->qkv, s->ln, p->qkvw + l * lay->size[LLM_QKVW], p->qkvb + l * lay->size[LLM_QKVB],
			   B, C, 3 * C, false);
		for (size_t b = 0; b < B; b++)
		{
			memcpy(kn + b * C, s->qkv + b * 3 * C + C, C * sizeof(float));
			memcpy(vn + b * C, s->qkv + b * 3 * C + 2 * C, C * sizeof(float));
		}
		att.l = l;
		llm_parallel_for(B * s->NH, attention_step_task, &att);
		matmul(s->x, s->att, p->attprojw + l * lay->size[LLM_ATTPROJW],
			   p->attprojb + l * lay->size[LLM_ATTPROJB], B, C, C, true);
		layernorm(s->ln, s->x, p->ln2w + l * lay->size[LLM_LN2W], p->ln2b + l * lay->size[LLM_LN2B], B, C);
		matmul(s->fch, s->ln, p->fcw + l * lay->size[LLM_FCW], p->fcb + l * lay->size[LLM_FCB],
			   B, C, 4 * C, false);
		gelu(s->fch, B * 4 * C);
		matmul(s->x, s->fch, p->fcprojw + l * lay->size[LLM_FCPROJW],
			   p->fcprojb + l * lay->size[LLM_FCPROJB], B, 4 * C, C, true);
	}
	CHECK_FOR_INTERRUPTS();
	layernorm(s->ln, s->x, p->lnfw, p->lnfb, B, C);
	lm_head(s->logits, s->ln, p->wte, B, C, s->V);
	s->n_new++;
	return s->logits;
}

void
llm_infer_reorder(LlmInfer *s, const int *parents)
{
	int		   *tmp = s->path_tmp;

	for (int b = 0; b < s->beams; b++)
		memcpy(tmp + (size_t) b * s->max_new, s->path + (size_t) parents[b] * s->max_new,
			   s->n_new * sizeof(int));
	s->path_tmp = s->path;
	s->path = tmp;
}
