/*
 * kernels.h: the kernel library of inference and training, in the style of llm.c: plain functions
 * over float arrays, one forward (and, for training, one backward) per layer.
 *
 * Shapes in the comments: B = batch, T = time (sequence length), C = channels (d_model),
 * NH = heads, OC = output channels, V = vocabulary, R = rows (B * T, or the beams of a step).
 * Row-major everywhere. Weights are in Hugging Face orientation: a linear layer's weight is
 * (C, OC), so out(R, OC) = inp(R, C) @ W(C, OC) + b, a plain row-major sgemm.
 *
 * Every kernel runs on the calling (backend) thread and splits its work over the worker pool
 * (llm_parallel_for) or BLAS; none of them touches PostgreSQL, allocates or fails.
 *
 * Gradient conventions: "accumulate" = false overwrites parameter gradients, true adds to them
 * (gradient accumulation over micro-batches needs no zeroing pass). Gradients of activations
 * (dinp) are overwritten, except in layernorm_backward, which adds into the residual stream's
 * gradient as llm.c does.
 *
 * Floating point: the library is built with -fno-trapping-math (ext/Makefile; traps are never
 * enabled in a backend), which lets GCC if-convert the comparisons of clamps and maxima and so
 * vectorise those loops; it changes no result. No -ffast-math: reductions use independent lanes.
 */
#ifndef PG_LLM_KERNELS_H
#define PG_LLM_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- scalar helpers, inlined into the vectorised loops of each level ----------------------- */

/*
 * e^x, branch-free so that loops calling it vectorise (libm's expf does not without
 * -ffast-math). Cephes' expf: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n
 * through the exponent bits; about 1 ulp. The input is clamped so that 2^n stays a normal float:
 * e^x for x > 88.3 saturates at 2.1e38, for x < -87.3 at 1.2e-38 (as good as 0 wherever it is
 * used: a softmax term, a sigmoid's tail). NaN propagates.
 */
static inline float
llm_expf(float x)
{
	const float magic = 12582912.0f;	/* 1.5 * 2^23: adding it rounds to an integer */
	float		n,
				r,
				z,
				y;
	union
	{
		float		f;
		int32_t		i;
	}			scale;

	x = x > 88.3f ? 88.3f : x;
	x = x < -87.3f ? -87.3f : x;
	n = (x * 1.44269504088896341f + magic) - magic;
	r = x - n * 0.693359375f;
	r = r - n * -2.12194440e-4f;
	z = r * r;
	y = 1.9875691500e-4f;
	y = y * r + 1.3981999507e-3f;
	y = y * r + 8.3334519073e-3f;
	y = y * r + 4.1665795894e-2f;
	y = y * r + 1.6666665459e-1f;
	y = y * r + 5.0000001201e-1f;
	y = y * z + r + 1.0f;
	scale.i = ((int32_t) n + 127) << 23;
	return y * scale.f;
}

/* Sum of x[0..n) with 16 independent lanes: vectorises without reassociating one accumulator. */
static inline float
llm_sum(const float *x, size_t n)
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

/* a . b over n elements, 16 lanes. */
static inline float
llm_dot(const float *restrict a, const float *restrict b, size_t n)
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

/* The largest of x[0..n), n >= 1, 8 lanes. */
static inline float
llm_max(const float *x, size_t n)
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

/* x(n) <- softmax(x), n >= 1: one row (callers spread rows over the pool). */
static inline void
softmax_inplace(float *x, size_t n)
{
	float		m = llm_max(x, n);
	float		inv;

	for (size_t i = 0; i < n; i++)
		x[i] = llm_expf(x[i] - m);
	inv = 1.0f / llm_sum(x, n);
	for (size_t i = 0; i < n; i++)
		x[i] *= inv;
}

/* ---- kernels.c: embeddings, normalisation, activations, attention, loss, optimizer ---------- */

/* out(B,T,C) = wte[inp[b,t]] + wpe[t]; inp(B,T) ids already checked against V. */
extern void encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe,
							int B, int T, int C);
/* dwte[inp[b,t]] += dout[b,t], dwpe[t] += dout[b,t] (always accumulates). */
extern void encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
							 int B, int T, int C);

/*
 * out(R,C) = (inp - mean) * rstd * weight + bias, eps 1e-5; mean, rstd (R) kept for the backward
 * (both NULL when there is none, as in inference).
 */
extern void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
							  const float *weight, const float *bias, int R, int C);
/* dinp(R,C) += ...; dweight, dbias (C) overwritten or accumulated (both skipped when dweight is NULL: frozen). */
extern void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
							   const float *inp, const float *weight, const float *mean,
							   const float *rstd, int R, int C, bool accumulate);

/*
 * Causal multi-head self-attention. inp(B,T,3C) = [q | k | v] per row (as c_attn produces
 * it), head h at channels h*hs .. (h+1)*hs-1 of each, hs = C/NH. att(B,NH,T,T) receives the
 * softmax probabilities (row t uses columns 0..t), out(B,T,C) the heads side by side.
 * Dropout on the probabilities: p = 0 disables it; the mask is a pure function of key
 * (see dropout_forward), so the backward regenerates it instead of storing it.
 * scratch holds B*T*(C+NH) floats (a transposed copy of each head's keys or values).
 * (Inference runs its own attention over the key/value cache: infer.c.)
 */
extern void attention_forward(float *out, float *att, float *scratch, const float *inp,
							  int B, int T, int C, int NH, float dropout, uint64_t key);
/* dinp(B,T,3C) overwritten; scratch as for the forward. */
extern void attention_backward(float *dinp, float *scratch, const float *dout, const float *inp,
							   const float *att, int B, int T, int C, int NH,
							   float dropout, uint64_t key);

/* GELU, tanh form: out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), N elements; out may be inp. */
extern void gelu_forward(float *out, const float *inp, size_t N);
/* dinp = dout * gelu'(inp); dinp may be dout (in place). */
extern void gelu_backward(float *dinp, const float *inp, const float *dout, size_t N);

/* out = inp1 + inp2 (out may alias either input). */
extern void residual_forward(float *out, const float *inp1, const float *inp2, size_t N);

/*
 * Inverted dropout in place: x *= keep / (1 - p). The keep mask of element i is a pure
 * function of (key, i); applying the same call to a gradient is the backward.
 */
extern void dropout_forward(float *x, size_t N, float p, uint64_t key);
extern uint64_t dropout_key(uint64_t seed, uint64_t a, uint64_t b, uint64_t c);

/*
 * Softmax + cross-entropy, fused and in place, over N rows of V logits:
 * losses[i] = logsumexp(logits[i]) - logits[i][targets[i]], and logits[i] becomes
 * dloss * (softmax(logits[i]) - onehot(targets[i])), the gradient of dloss * losses[i].
 */
extern void crossentropy_softmax_forward_backward(float *losses, float *logits, const int32_t *targets,
												  int N, int V, float dloss);

/*
 * LoRA's low-rank update of one product (lora.c), x (R, IC) its input after the adapter's dropout,
 * A (rank, IC), B (OC, rank), rank <= LORA_RANK_MAX:
 * lora_forward: out (R, OC) += scale * (x @ A^T) @ B^T, h (R, rank) scratch; by sgemm (training).
 * lora_backward: given dout (R, OC), dB (+)= scale * dout^T @ h and dA (+)= dh^T @ x with
 * h = x @ A^T (recomputed) and dh = scale * dout @ B (scratch, R x rank each); dx (R, IC) = dh @ A,
 * or += with dx_add; none when dx is NULL.
 * lora_forward_rows: the forward row by row on the pool's threads (inference, evaluation): a row's
 * result is the same whatever the other rows are and however many threads there are.
 */
#define LORA_RANK_MAX 1024
extern void lora_forward(float *out, float *h, const float *x, const float *A, const float *B, int R, int IC,
						 int OC, int rank, float scale);
extern void lora_backward(float *dx, bool dx_add, float *dA, float *dB, float *h, float *dh, const float *dout,
						  const float *x, const float *A, const float *B, int R, int IC, int OC, int rank,
						  float scale, bool accumulate);
extern void lora_forward_rows(float *out, const float *x, const float *A, const float *B, size_t R, size_t IC,
							  size_t OC, int rank, float scale);

/* Sum of squares of x[0..N), in double, deterministic for any number of threads. */
extern double sum_of_squares(const float *x, size_t N);

/*
 * AdamW over N parameters (one flat loop; call it once per run of tensors with the same decay):
 * g = grads * grad_scale (clipping), m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2,
 * params -= lr * (m / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * params),
 * t = the 1-based step number (torch.optim.AdamW's formula, decay decoupled).
 */
extern void adamw_update(float *params, const float *grads, float *m, float *v, size_t N,
						 float lr, float beta1, float beta2, float eps, float weight_decay,
						 float grad_scale, long t);

/* ---- matmul.c: the matrix products ----------------------------------------------------------- */

/*
 * Training: out(BT,OC) = inp(BT,C) @ weight(C,OC) + bias(OC); bias may be NULL. One sgemm on
 * BLAS's own threads (llm_blas_set_threads(n)).
 */
extern void matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
						   int BT, int C, int OC);
/*
 * dinp(BT,C) = dout(BT,OC) @ weight^T (overwritten; skipped when dinp is NULL),
 * dweight(C,OC) = inp^T @ dout, dbias(OC) = column sums of dout (each skipped when NULL: frozen).
 */
extern void matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
							const float *inp, const float *weight, int BT, int C, int OC,
							bool accumulate);

/*
 * Training's tied output head with its loss, forward and backward in one pass, chunk_rows rows at
 * a time so that at most chunk_rows * V logits exist (scratch holds that many floats):
 * logits = inp(BT,C) @ wte(V,C)^T, losses(BT) as above, dinp(BT,C) = dlogits @ wte (overwritten),
 * dwte(V,C) = dlogits^T @ inp (overwritten or accumulated; skipped when NULL).
 */
extern void classifier_forward_backward(float *losses, float *dinp, float *dwte, float *scratch,
										const float *inp, const float *wte, const int32_t *targets,
										int BT, int C, int V, int chunk_rows, float dloss,
										bool accumulate);

/*
 * Inference's attention (infer.c) and a scan, at the level in use like every kernel here.
 *
 * llm_attention_prompt_head: a head's causal attention over a prompt of T rows, for the query rows
 * [r0, T): out(T, ld_out) at the head's hs columns <- softmax(q k^T * scale) v, with q(T, ld_q),
 * k and v (T, ld_kv) pointing at the head's columns; in blocks of `block` query rows, each two
 * sgemms (on the calling thread's BLAS), S (block, T) scratch.
 *
 * llm_attention_step_row: one query row's attention over n cached positions for heads [h0, h1)
 * of hs channels: keys[t], values[t] are position t's key and value rows (all heads); scores at
 * p[h * stride + t]. Each head's arithmetic is one head's alone: its scores in position order,
 * its softmax, its weighted sum of values in position order.
 *
 * llm_first_nonfinite: the index of the first NaN or infinite value of x (n), or n.
 */
extern void llm_attention_prompt_head(float *out, size_t ld_out, const float *q, size_t ld_q, const float *k,
									  const float *v, size_t ld_kv, size_t T, size_t r0, size_t hs, size_t block,
									  float scale, float *S);
extern void llm_attention_step_row(float *out, float *p, size_t stride, const float *q, const float *const *keys,
								   const float *const *values, size_t n, size_t h0, size_t h1, size_t hs,
								   float scale);
extern size_t llm_first_nonfinite(const float *x, size_t n);

#endif							/* PG_LLM_KERNELS_H */
