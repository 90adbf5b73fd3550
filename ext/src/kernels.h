/*
 * kernels.h: GPT-2 layers as forward/backward pairs over float arrays, in the style of llm.c.
 *
 * Shapes in the comments: B = batch, T = time (sequence length), C = channels (d_model),
 * NH = heads, OC = output channels, V = vocabulary. BT = B * T rows, row-major everywhere.
 * Weights are in Hugging Face orientation: a linear layer's weight is (C, OC), so
 * out(BT, OC) = inp(BT, C) @ W(C, OC) + b, a plain row-major sgemm.
 *
 * Every kernel runs on the calling (backend) thread and splits its work over the worker pool
 * (llm_parallel_for) or BLAS; none of them touches PostgreSQL, allocates or fails.
 *
 * Gradient conventions: "accumulate" = false overwrites parameter gradients, true adds to them
 * (gradient accumulation over micro-batches needs no zeroing pass). Gradients of activations
 * (dinp) are overwritten, except in layernorm_backward, which adds into the residual stream's
 * gradient as llm.c does.
 */
#ifndef PG_LLM_KERNELS_H
#define PG_LLM_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* out(B,T,C) = wte[inp[b,t]] + wpe[t]; inp(B,T) ids already checked against V. */
extern void encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe,
							int B, int T, int C);
/* dwte[inp[b,t]] += dout[b,t], dwpe[t] += dout[b,t] (always accumulates). */
extern void encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
							 int B, int T, int C);

/* out(BT,C) = (inp - mean) * rstd * weight + bias; mean, rstd (BT) kept for the backward. */
extern void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
							  const float *weight, const float *bias, int BT, int C);
/* dinp(BT,C) += ...; dweight, dbias (C) overwritten or accumulated. */
extern void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
							   const float *inp, const float *weight, const float *mean,
							   const float *rstd, int BT, int C, bool accumulate);

/* out(BT,OC) = inp(BT,C) @ weight(C,OC) + bias(OC); bias may be NULL. */
extern void matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
						   int BT, int C, int OC);
/*
 * dinp(BT,C) = dout(BT,OC) @ weight^T (overwritten; skipped when dinp is NULL),
 * dweight(C,OC) = inp^T @ dout, dbias(OC) = column sums of dout (bias skipped when NULL).
 */
extern void matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
							const float *inp, const float *weight, int BT, int C, int OC,
							bool accumulate);

/*
 * Causal multi-head self-attention. inp(B,T,3C) = [q | k | v] per row (as c_attn produces
 * it), head h at channels h*hs .. (h+1)*hs-1 of each, hs = C/NH. att(B,NH,T,T) receives the
 * softmax probabilities (row t uses columns 0..t), out(B,T,C) the heads side by side.
 * Dropout on the probabilities: p = 0 disables it; the mask is a pure function of key
 * (see dropout_forward), so the backward regenerates it instead of storing it.
 * scratch holds B*T*(C+NH) floats (a transposed copy of each head's keys or values).
 */
extern void attention_forward(float *out, float *att, float *scratch, const float *inp,
							  int B, int T, int C, int NH, float dropout, uint64_t key);
/* dinp(B,T,3C) overwritten; scratch as for the forward. */
extern void attention_backward(float *dinp, float *scratch, const float *dout, const float *inp,
							   const float *att, int B, int T, int C, int NH,
							   float dropout, uint64_t key);

/* GELU, tanh form: out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), N elements. */
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
 * The tied output head with its loss, forward and backward in one pass, chunk_rows rows at a
 * time so that at most chunk_rows * V logits exist (scratch holds that many floats):
 * logits = inp(BT,C) @ wte(V,C)^T, losses(BT) as above, dinp(BT,C) = dlogits @ wte (overwritten),
 * dwte(V,C) = dlogits^T @ inp (overwritten or accumulated).
 */
extern void classifier_forward_backward(float *losses, float *dinp, float *dwte, float *scratch,
										const float *inp, const float *wte, const int32_t *targets,
										int BT, int C, int V, int chunk_rows, float dloss,
										bool accumulate);

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

#endif							/* PG_LLM_KERNELS_H */
