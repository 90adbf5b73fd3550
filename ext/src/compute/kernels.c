/*
 * kernels.c: the layers of the kernel library other than the matrix products (matmul.c):
 * embeddings, LayerNorm, GELU, residual, dropout, attention, softmax + cross-entropy, gradient
 * norm and AdamW (see kernels.h for shapes and conventions).
 *
 * Each kernel splits its rows (or columns, where rows would race on a shared output) over the
 * worker pool: a small argument struct (kernels_args.h) plus a task function over a range
 * [start, end). The tasks are compiled once per instruction set (kernels_tasks.h, made into
 * kernels_portable.c and kernels_avx2.c) and taken from the level in use, the one dispatch of
 * every kernel: the CPU's best, capped by pg_llm.simd (or PG_LLM_SIMD), so the library runs on
 * any x86-64 and a session can run every kernel at a lower level.
 */
#include "compute/kernels_args.h"

const LlmKernelTasks *
llm_kernel_tasks(void)
{
	return llm_simd_level() >= LLM_SIMD_AVX2 ? &llm_kernel_tasks_avx2 : &llm_kernel_tasks_portable;
}

uint64_t
dropout_key(uint64_t seed, uint64_t a, uint64_t b, uint64_t c)
{
	return splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ a) ^ b) ^ c);
}

void
dropout_forward(float *x, size_t N, float p, uint64_t key)
{
	DropoutArgs a = {x, p, key};

	if (p > 0.0f)
		llm_parallel_for(N, llm_kernel_tasks()->dropout_task, &a);
}

void
encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe, int B, int T, int C)
{
	EncoderArgs a = {.out = out, .inp = inp, .wte = wte, .wpe = wpe, .B = B, .T = T, .C = C};

	llm_parallel_for((size_t) B * T, llm_kernel_tasks()->encoder_forward_task, &a);
}

void
encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp, int B, int T, int C)
{
	EncoderArgs a = {.dwte = dwte, .dwpe = dwpe, .dout = dout, .inp = inp, .B = B, .T = T, .C = C};

	llm_parallel_for(C, llm_kernel_tasks()->encoder_backward_task, &a);
}

void
layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *weight,
				  const float *bias, int R, int C)
{
	LayernormArgs a = {.out = out, .mean = mean, .rstd = rstd, .inp = inp, .weight = weight,
	.bias = bias, .BT = R, .C = C};

	if (R >= LAYERNORM_PARALLEL_ROWS)
		llm_parallel_for(R, llm_kernel_tasks()->layernorm_forward_task, &a);
	else
		llm_kernel_tasks()->layernorm_forward_task(&a, 0, R);
}

void
layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
				   const float *weight, const float *mean, const float *rstd, int R, int C,
				   bool accumulate)
{
	LayernormArgs a = {.dinp = dinp, .dweight = dweight, .dbias = dbias, .dout = dout,
		.inp = inp, .weight = weight, .cmean = mean, .crstd = rstd, .BT = R, .C = C,
	.accumulate = accumulate};

	llm_parallel_for(R, llm_kernel_tasks()->layernorm_backward_rows, &a);
	if (dweight != NULL)
		llm_parallel_for(C, llm_kernel_tasks()->layernorm_backward_cols, &a);
}

void
attention_forward(float *out, float *att, float *scratch, const float *inp, int B, int T, int C, int NH,
				  float dropout, uint64_t key)
{
	AttentionArgs a = {.out = out, .att = att, .scratch = scratch, .inp = inp, .B = B, .T = T, .C = C,
	.NH = NH, .dropout = dropout, .key = key};

	llm_parallel_for((size_t) B * NH, llm_kernel_tasks()->attention_forward_task, &a);
}

void
attention_backward(float *dinp, float *scratch, const float *dout, const float *inp, const float *att,
				   int B, int T, int C, int NH, float dropout, uint64_t key)
{
	AttentionArgs a = {.dinp = dinp, .scratch = scratch, .dout = dout, .inp = inp, .catt = att,
	.B = B, .T = T, .C = C, .NH = NH, .dropout = dropout, .key = key};

	llm_parallel_for((size_t) B * NH, llm_kernel_tasks()->attention_backward_task, &a);
}

void
gelu_forward(float *out, const float *inp, size_t N)
{
	EltwiseArgs a = {.out = out, .inp = inp};

	if (N >= GELU_PARALLEL_ELEMENTS)
		llm_parallel_for(N, llm_kernel_tasks()->gelu_forward_task, &a);
	else
		llm_kernel_tasks()->gelu_forward_task(&a, 0, N);
}

void
gelu_backward(float *dinp, const float *inp, const float *dout, size_t N)
{
	EltwiseArgs a = {.out = dinp, .inp = inp, .inp2 = dout};

	llm_parallel_for(N, llm_kernel_tasks()->gelu_backward_task, &a);
}

void
residual_forward(float *out, const float *inp1, const float *inp2, size_t N)
{
	EltwiseArgs a = {.out = out, .inp = inp1, .inp2 = inp2};

	llm_parallel_for(N, llm_kernel_tasks()->residual_task, &a);
}

void
crossentropy_softmax_forward_backward(float *losses, float *logits, const int32_t *targets, int N, int V,
									  float dloss)
{
	CrossentropyArgs a = {.losses = losses, .logits = logits, .targets = targets, .V = V, .dloss = dloss};

	llm_parallel_for(N, llm_kernel_tasks()->crossentropy_task, &a);
}

double
sum_of_squares(const float *x, size_t N)
{
	NormArgs	a = {.x = x, .N = N};
	double		total = 0.0;

	llm_parallel_for(NORM_CHUNKS, llm_kernel_tasks()->norm_task, &a);
	for (int c = 0; c < NORM_CHUNKS; c++)
		total += a.partial[c];
	return total;
}

void
adamw_update(float *params, const float *grads, float *m, float *v, size_t N, float lr, float beta1,
			 float beta2, float eps, float weight_decay, float grad_scale, long t)
{
	AdamwArgs	a = {.params = params, .m = m, .v = v, .grads = grads, .beta1 = beta1,
		.beta2 = beta2, .eps = eps,
		.step_size = (float) (lr / (1.0 - pow(beta1, (double) t))),
		.bc2_sqrt = (float) sqrt(1.0 - pow(beta2, (double) t)),
		.decay = 1.0f - lr * weight_decay,
	.grad_scale = grad_scale};

	llm_parallel_for(N, llm_kernel_tasks()->adamw_task, &a);
}

void
llm_attention_prompt_head(float *out, size_t ld_out, const float *q, size_t ld_q, const float *k, const float *v,
						  size_t ld_kv, size_t T, size_t r0, size_t hs, size_t block, float scale, float *S)
{
	llm_kernel_tasks()->attention_prompt_head(out, ld_out, q, ld_q, k, v, ld_kv, T, r0, hs, block, scale, S);
}

void
llm_attention_step_row(float *out, float *p, size_t stride, const float *q, const float *const *keys,
					   const float *const *values, size_t n, size_t h0, size_t h1, size_t hs, float scale)
{
	llm_kernel_tasks()->attention_step_row(out, p, stride, q, keys, values, n, h0, h1, hs, scale);
}

size_t
llm_first_nonfinite(const float *x, size_t n)
{
	return llm_kernel_tasks()->first_nonfinite(x, n);
}
