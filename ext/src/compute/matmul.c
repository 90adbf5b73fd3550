/*
 * matmul.c: the matrix products of training (see kernels.h): each one sgemm on BLAS's own threads,
 * the bias tasks at the level in use (kernels.c). Inference's products are gemv.c's, over packed
 * weights.
 */
#include "compute/kernels_args.h"

void
matmul_forward(float *out, const float *inp, const float *weight, const float *bias, int BT, int C, int OC)
{
	if (bias != NULL)
	{
		BiasArgs	a = {.out = out, .bias = bias, .BT = BT, .OC = OC};

		llm_parallel_for(BT, llm_kernel_tasks()->bias_fill_task, &a);
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
	if (dweight != NULL)
		llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasTrans, LlmCblasNoTrans, C, OC, BT,
						1.0f, inp, C, dout, OC, accumulate ? 1.0f : 0.0f, dweight, OC);
	if (dbias != NULL)
	{
		BiasArgs	a = {.out = dbias, .dout = dout, .BT = BT, .OC = OC, .accumulate = accumulate};

		llm_parallel_for(OC, llm_kernel_tasks()->bias_backward_task, &a);
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
		if (dwte != NULL)
			llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasTrans, LlmCblasNoTrans, V, C, rows,
						1.0f, scratch, V, x, C, (accumulate || r0 > 0) ? 1.0f : 0.0f, dwte, C);
	}
}
