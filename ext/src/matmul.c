/*
 * matmul.c: the matrix products of the kernel library (see kernels.h).
 *
 * Training runs each product as one sgemm on BLAS's own threads. Inference splits each product
 * by output columns over the worker pool, with BLAS on one thread: a few rows (a generation step)
 * are bound by reading the weights once, which a plain-C matrix-vector kernel does best; more
 * rows (a prompt) run one single-threaded sgemm per worker on its share of the columns. One split
 * per product keeps both cores busy with no hand-off between BLAS's threads and the pool's, and a
 * late thread delays a product once, not at every block.
 */
#include "pg_llm.h"
#include "blas.h"

#include <string.h>

/*
 * Up to LLM_GEMV_MAX_ROWS rows (the beams of a step, a short prompt) the matrix-vector kernel, bound
 * by reading the weights once, is used; with more rows the arithmetic dominates and sgemm wins.
 */

/* Columns per work item of the matrix-vector kernel and of sgemm (multiples of the vector width). */
#define GEMV_COL_BLOCK 64
#define SGEMM_COL_BLOCK 16

/* ---- training: one sgemm per product ---------------------------------------------------------- */

typedef struct
{
	float	   *out;
	const float *bias;
	const float *dout;
	int			BT,
				OC;
	bool		accumulate;
}			BiasArgs;

static void
bias_fill_task(void *arg, size_t start, size_t end)
{
	BiasArgs   *a = arg;

	for (size_t r = start; r < end; r++)
		memcpy(a->out + r * a->OC, a->bias, a->OC * sizeof(float));
}

/* out(OC) = column sums of dout(BT,OC), by column ranges. */
LLM_SIMD static void
bias_backward_task(void *arg, size_t start, size_t end)
{
	BiasArgs   *a = arg;

	if (!a->accumulate)
		memset(a->out + start, 0, (end - start) * sizeof(float));
	for (size_t r = 0; r < (size_t) a->BT; r++)
	{
		const float *d = a->dout + r * a->OC;

		for (size_t i = start; i < end; i++)
			a->out[i] += d[i];
	}
}

void
matmul_forward(float *out, const float *inp, const float *weight, const float *bias, int BT, int C, int OC)
{
	if (bias != NULL)
	{
		BiasArgs	a = {.out = out, .bias = bias, .BT = BT, .OC = OC};

		llm_parallel_for(BT, bias_fill_task, &a);
	}
	llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasNoTrans, BT, OC, C,
					1.0f, inp, C, weight, OC, bias != NULL ? 1.0f : 0.0f, out, OC);
}

void
matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
				const float *weight, int BT, int C, int OC, bool accumulate)
{
	if (dinp != NULL)
		llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasTrans, BT, C, OC,
						1.0f, dout, OC, weight, OC, 0.0f, dinp, C);
	llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasTrans, LlmCblasNoTrans, C, OC, BT,
					1.0f, inp, C, dout, OC, accumulate ? 1.0f : 0.0f, dweight, OC);
	if (dbias != NULL)
	{
		BiasArgs	a = {.out = dbias, .dout = dout, .BT = BT, .OC = OC, .accumulate = accumulate};

		llm_parallel_for(OC, bias_backward_task, &a);
	}
}

void
classifier_forward_backward(float *losses, float *dinp, float *dwte, float *scratch, const float *inp,
							const float *wte, const int32_t *targets, int BT, int C, int V,
							int chunk_rows, float dloss, bool accumulate)
{
	for (int r0 = 0; r0 < BT; r0 += chunk_rows)
	{
		int			rows = Min(chunk_rows, BT - r0);
		const float *x = inp + (size_t) r0 * C;

		/* logits(rows,V) = x(rows,C) @ wte^T */
		llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasTrans, rows, V, C,
						1.0f, x, C, wte, C, 0.0f, scratch, V);
		crossentropy_softmax_forward_backward(losses + r0, scratch, targets + r0, rows, V, dloss);
		/* dx(rows,C) = dlogits(rows,V) @ wte(V,C) */
		llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasNoTrans, rows, C, V,
						1.0f, scratch, V, wte, C, 0.0f, dinp + (size_t) r0 * C, C);
		/* dwte(V,C) (+)= dlogits^T @ x */
		llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasTrans, LlmCblasNoTrans, V, C, rows,
						1.0f, scratch, V, x, C, (accumulate || r0 > 0) ? 1.0f : 0.0f, dwte, C);
	}
}

/* ---- inference: products split by columns over the worker pool ----------------------------- */

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

/* out[:, j0:j1] = bias[j0:j1], or += when accumulating: the products then add into it. */
static inline void
bias_columns(const MatmulTask *t, size_t j0, size_t j1)
{
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
}

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

	bias_columns(t, j0, j1);
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

	bias_columns(t, j0, j1);
	llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasNoTrans, (int) t->R, (int) (j1 - j0),
					(int) t->IC, 1.0f, t->inp, (int) t->IC, t->w + j0, (int) t->OC,
					1.0f, t->out + j0, (int) t->OC);
}

void
matmul_rows(float *out, const float *inp, const float *w, const float *bias,
			size_t R, size_t IC, size_t OC, bool accumulate)
{
	MatmulTask	t = {out, inp, w, bias, R, IC, OC, accumulate};

	if (R <= LLM_GEMV_MAX_ROWS)
		llm_parallel_for((OC + GEMV_COL_BLOCK - 1) / GEMV_COL_BLOCK, gemv_task, &t);
	else
		llm_parallel_for((OC + SGEMM_COL_BLOCK - 1) / SGEMM_COL_BLOCK, sgemm_task, &t);
}

/* The output head: each wte row is read once for all R rows. */
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
			t->logits[r * t->V + v] = llm_dot(t->inp + r * t->C, t->wte + v * t->C, t->C);
}

void
head_forward(float *logits, const float *inp, const float *wte, size_t R, size_t C, size_t V)
{
	HeadTask	t = {logits, inp, wte, R, C, V};

	llm_parallel_for(V, head_task, &t);
}
