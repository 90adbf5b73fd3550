/*
 * lora.c: the products of LoRA adapters (kernels.h; the adapters themselves are model.h's
 * LlmLora): training's by sgemm on BLAS's threads, inference's and evaluation's row by row on the
 * pool's threads, so that a row's result depends on nothing but that row and its adapter.
 */
#include "compute/kernels_args.h"

void
lora_forward(float *out, float *h, const float *x, const float *A, const float *B, int R, int IC, int OC,
			 int rank, float scale)
{
	/* h (R, rank) = scale * x (R, IC) @ A^T; out (R, OC) += h @ B^T */
	llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasTrans, R, rank, IC, scale, x, IC, A, IC, 0.0f,
					h, rank);
	llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasTrans, R, OC, rank, 1.0f, h, rank, B, rank, 1.0f,
					out, OC);
}

void
lora_backward(float *dx, bool dx_add, float *dA, float *dB, float *h, float *dh, const float *dout,
			  const float *x, const float *A, const float *B, int R, int IC, int OC, int rank, float scale,
			  bool accumulate)
{
	float		beta = accumulate ? 1.0f : 0.0f;

	/* h (R, rank) = x @ A^T, again */
	llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasTrans, R, rank, IC, 1.0f, x, IC, A, IC, 0.0f,
					h, rank);
	/* dB (OC, rank) (+)= scale * dout^T @ h */
	llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasTrans, LlmCblasNoTrans, OC, rank, R, scale, dout, OC, h, rank,
					beta, dB, rank);
	/* dh (R, rank) = scale * dout @ B */
	llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasNoTrans, R, rank, OC, scale, dout, OC, B, rank,
					0.0f, dh, rank);
	/* dA (rank, IC) (+)= dh^T @ x */
	llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasTrans, LlmCblasNoTrans, rank, IC, R, 1.0f, dh, rank, x, IC,
					beta, dA, IC);
	/* dx (R, IC) (+)= dh @ A, unless no gradient is wanted there (dx NULL) */
	if (dx != NULL)
		llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasNoTrans, R, IC, rank, 1.0f, dh, rank, A, IC,
						dx_add ? 1.0f : 0.0f, dx, IC);
}

#define OUT_BLOCK 8

typedef struct LoraRowsArgs
{
	float	   *out;
	const float *x,
			   *A,
			   *B;
	size_t		IC,
				OC,
				rank;
	float		scale;
} LoraRowsArgs;

static void
lora_rows_task(void *arg, size_t start, size_t end)
{
	const LoraRowsArgs *a = arg;
	float		h[LORA_RANK_MAX];

	for (size_t r = start; r < end; r++)
	{
		const float *x = a->x + r * a->IC;
		float	   *out = a->out + r * a->OC;

		for (size_t j = 0; j < a->rank; j++)
		{
			const float *w = a->A + j * a->IC;
			float		s[8] = {0};
			size_t		i = 0;

			/* eight partial sums: one vector of them, independent adds */
			for (; i + 8 <= a->IC; i += 8)
				for (int u = 0; u < 8; u++)
					s[u] += x[i + u] * w[i + u];
			for (; i < a->IC; i++)
				s[0] += x[i] * w[i];
			h[j] = a->scale * (((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])));
		}
		/*
		 * out[o] += h . B[o], eight outputs at a time: eight independent sums (a lone one waits on
		 * its own adds), each still over j in order, so every output's value is unchanged
		 */
		for (size_t o0 = 0; o0 < a->OC; o0 += OUT_BLOCK)
		{
			size_t		n = Min(OUT_BLOCK, a->OC - o0);
			const float *w = a->B + o0 * a->rank;
			float		s[OUT_BLOCK] = {0};

			for (size_t j = 0; j < a->rank; j++)
				for (size_t k = 0; k < n; k++)
					s[k] += h[j] * w[k * a->rank + j];
			for (size_t k = 0; k < n; k++)
				out[o0 + k] += s[k];
		}
	}
}

void
lora_forward_rows(float *out, const float *x, const float *A, const float *B, size_t R, size_t IC, size_t OC,
				  int rank, float scale)
{
	LoraRowsArgs a = {.out = out, .x = x, .A = A, .B = B, .IC = IC, .OC = OC, .rank = (size_t) rank,
	.scale = scale};

	if (R * (IC + OC) * (size_t) rank < (1 << 16))
		lora_rows_task(&a, 0, R);
	else
		llm_parallel_for(R, lora_rows_task, &a);
}
