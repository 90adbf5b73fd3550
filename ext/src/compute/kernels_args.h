/*
 * kernels_args.h: what compute/kernels.c and the kernels' tasks share: the argument of each task
 * (a small struct), their constants and scalar helpers, and the table of tasks that each
 * instruction set has (kernels_portable.c, kernels_avx2.c, both made from kernels_tasks.h).
 * Private to compute/.
 */
#ifndef PG_LLM_KERNELS_ARGS_H
#define PG_LLM_KERNELS_ARGS_H

#include "compute/blas.h"
#include "compute/gemv.h"
#include "compute/kernels.h"
#include "compute/pool.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define Min(x, y) ((x) < (y) ? (x) : (y))

#define LANES 8

#define GELU_SCALE 0.7978845608028654f	/* sqrt(2 / pi) */
#define LAYERNORM_EPS 1e-5f

/*
 * Below these sizes a kernel runs on the calling thread: waking the workers costs more than
 * the work (a generation step's rows; a prompt's or a batch's rows are worth it).
 */
#define LAYERNORM_PARALLEL_ROWS 64
#define GELU_PARALLEL_ELEMENTS 65536

/* ---- dropout: a counter-based hash, so masks are regenerated instead of stored ------------- */

static inline uint64_t
splitmix64(uint64_t x)
{
	x += 0x9E3779B97F4A7C15ULL;
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
	return x ^ (x >> 31);
}


/* Keep element i with probability 1 - p: the top 24 bits of its hash against p * 2^24. */
static inline bool
dropout_keep(uint64_t key, uint64_t i, uint32_t threshold)
{
	return (uint32_t) (splitmix64(key ^ (i * 0xD1B54A32D192ED03ULL)) >> 40) >= threshold;
}

static inline uint32_t
dropout_threshold(float p)
{
	return (uint32_t) ((double) p * 16777216.0);
}

typedef struct
{
	float	   *x;
	float		p;
	uint64_t	key;
}			DropoutArgs;



/* ---- encoder ------------------------------------------------------------------------------- */

typedef struct
{
	float	   *out;
	const int32_t *inp;
	const float *wte,
			   *wpe;
	float	   *dwte,
			   *dwpe;
	const float *dout;
	int			B,
				T,
				C;
}			EncoderArgs;





/* ---- layernorm ----------------------------------------------------------------------------- */

typedef struct
{
	float	   *out,
			   *mean,
			   *rstd;
	const float *inp,
			   *weight,
			   *bias;
	float	   *dinp,
			   *dweight,
			   *dbias;
	const float *dout,
			   *cmean,
			   *crstd;
	int			BT,
				C;
	bool		accumulate;
}			LayernormArgs;






/* ---- attention ----------------------------------------------------------------------------- */

typedef struct
{
	float	   *out,
			   *att,
			   *dinp,
			   *scratch;
	const float *inp,
			   *dout,
			   *catt;
	int			B,
				T,
				C,
				NH;
	float		dropout;
	uint64_t	key;
}			AttentionArgs;





/* ---- GELU, residual ------------------------------------------------------------------------ */

typedef struct
{
	float	   *out;
	const float *inp,
			   *inp2;
}			EltwiseArgs;

/* GELU(x) = 0.5 x (1 + tanh(u)) = x sigmoid(2u): no cancellation for large negative x. */
static inline float
gelu(float x)
{
	float		u = GELU_SCALE * (x + 0.044715f * x * x * x);

	return x / (1.0f + llm_expf(-2.0f * u));
}

/* d/dx [x s(2u)] = s + 2 x s (1 - s) du/dx, s = sigmoid(2u). */
static inline float
gelu_grad(float x)
{
	float		u = GELU_SCALE * (x + 0.044715f * x * x * x);
	float		du = GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
	float		s = 1.0f / (1.0f + llm_expf(-2.0f * u));

	return s + 2.0f * x * s * (1.0f - s) * du;
}







/* ---- softmax + cross-entropy -------------------------------------------- */

typedef struct
{
	float	   *losses,
			   *logits;
	const int32_t *targets;
	int			V;
	float		dloss;
}			CrossentropyArgs;



/* ---- gradient norm, AdamW ------------------------------------------------------------------ */

#define NORM_CHUNKS 256
#define NORM_BLOCK 1024

typedef struct
{
	const float *x;
	size_t		N;
	double		partial[NORM_CHUNKS];
}			NormArgs;



typedef struct
{
	float	   *params,
			   *m,
			   *v;
	const float *grads;
	float		beta1,
				beta2,
				eps,
				step_size,		/* lr / (1 - beta1^t) */
				bc2_sqrt,		/* sqrt(1 - beta2^t) */
				decay,			/* 1 - lr * weight_decay */
				grad_scale;
}			AdamwArgs;

/* ---- the products' biases (matmul.c) ---------------------------------------------------------- */

typedef struct
{
	float	   *out;
	const float *bias;
	const float *dout;
	int			BT,
				OC;
	bool		accumulate;
}			BiasArgs;

/* Every task of the kernels, as one instruction set compiled them. */
typedef struct LlmKernelTasks
{
	llm_task_fn	dropout_task;
	llm_task_fn	encoder_forward_task;
	llm_task_fn	encoder_backward_task;
	llm_task_fn	layernorm_forward_task;
	llm_task_fn	layernorm_backward_rows;
	llm_task_fn	layernorm_backward_cols;
	llm_task_fn	attention_forward_task;
	llm_task_fn	attention_backward_task;
	llm_task_fn	gelu_forward_task;
	llm_task_fn	gelu_backward_task;
	llm_task_fn	residual_task;
	llm_task_fn	crossentropy_task;
	llm_task_fn	norm_task;
	llm_task_fn	adamw_task;
	llm_task_fn	bias_fill_task;
	llm_task_fn	bias_backward_task;
	void		(*attention_prompt_head) (float *out, size_t ld_out, const float *q, size_t ld_q, const float *k,
										  const float *v, size_t ld_kv, size_t T, size_t r0, size_t hs, size_t block,
										  float scale, float *S);
	void		(*attention_step_row) (float *out, float *p, size_t stride, const float *q, const float *const *keys,
									   const float *const *values, size_t n, size_t h0, size_t h1, size_t hs,
									   float scale);
	size_t		(*first_nonfinite) (const float *x, size_t n);
} LlmKernelTasks;

extern const LlmKernelTasks llm_kernel_tasks_portable;
extern const LlmKernelTasks llm_kernel_tasks_avx2;

/* The tasks at the level in use (llm_simd_level(), capped by pg_llm.simd / PG_LLM_SIMD). */
extern const LlmKernelTasks *llm_kernel_tasks(void);

#endif							/* PG_LLM_KERNELS_ARGS_H */
