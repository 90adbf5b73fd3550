/*
 * kernels.c: the layers of the kernel library other than the matrix products (matmul.c):
 * embeddings, LayerNorm, GELU, residual, dropout, attention, softmax + cross-entropy, gradient
 * norm and AdamW (see kernels.h for shapes and conventions).
 *
 * Each kernel splits its rows (or columns, where rows would race on a shared output) over the
 * worker pool: a small argument struct plus a task function over a range [start, end).
 * Reductions use independent float lanes so that the compiler vectorises them without
 * -ffast-math, and the hot loops are compiled twice (LLM_SIMD: AVX2+FMA and baseline x86-64),
 * picked at load time, so the library runs on any x86-64.
 */
#include "compute/kernels.h"
#include "compute/pool.h"

#include <math.h>
#include <stdbool.h>
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

uint64_t
dropout_key(uint64_t seed, uint64_t a, uint64_t b, uint64_t c)
{
	return splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ a) ^ b) ^ c);
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

static void
dropout_task(void *arg, size_t start, size_t end)
{
	DropoutArgs *a = arg;
	uint32_t	threshold = dropout_threshold(a->p);
	float		scale = 1.0f / (1.0f - a->p);

	for (size_t i = start; i < end; i++)
		a->x[i] = dropout_keep(a->key, i, threshold) ? a->x[i] * scale : 0.0f;
}

void
dropout_forward(float *x, size_t N, float p, uint64_t key)
{
	DropoutArgs a = {x, p, key};

	if (p > 0.0f)
		llm_parallel_for(N, dropout_task, &a);
}

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

static void
encoder_forward_task(void *arg, size_t start, size_t end)
{
	EncoderArgs *a = arg;
	size_t		C = a->C;

	for (size_t bt = start; bt < end; bt++)
	{
		const float *wte = a->wte + (size_t) a->inp[bt] * C;
		const float *wpe = a->wpe + (bt % a->T) * C;
		float	   *out = a->out + bt * C;

		for (size_t i = 0; i < C; i++)
			out[i] = wte[i] + wpe[i];
	}
}

void
encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe, int B, int T, int C)
{
	EncoderArgs a = {.out = out, .inp = inp, .wte = wte, .wpe = wpe, .B = B, .T = T, .C = C};

	llm_parallel_for((size_t) B * T, encoder_forward_task, &a);
}

/* Over channel ranges: a token may repeat within the batch, so rows would race on dwte. */
static void
encoder_backward_task(void *arg, size_t start, size_t end)
{
	EncoderArgs *a = arg;
	size_t		C = a->C;

	for (size_t bt = 0; bt < (size_t) a->B * a->T; bt++)
	{
		float	   *dwte = a->dwte + (size_t) a->inp[bt] * C;
		float	   *dwpe = a->dwpe + (bt % a->T) * C;
		const float *dout = a->dout + bt * C;

		for (size_t i = start; i < end; i++)
		{
			dwte[i] += dout[i];
			dwpe[i] += dout[i];
		}
	}
}

void
encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp, int B, int T, int C)
{
	EncoderArgs a = {.dwte = dwte, .dwpe = dwpe, .dout = dout, .inp = inp, .B = B, .T = T, .C = C};

	llm_parallel_for(C, encoder_backward_task, &a);
}

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

LLM_SIMD static void
layernorm_forward_task(void *arg, size_t start, size_t end)
{
	LayernormArgs *a = arg;
	size_t		C = a->C;
	const float *restrict w = a->weight;
	const float *restrict b = a->bias;

	for (size_t r = start; r < end; r++)
	{
		const float *restrict x = a->inp + r * C;
		float	   *restrict out = a->out + r * C;
		float		m = llm_sum(x, C) / (float) C;
		float		acc[16] = {0};
		float		var = 0.0f,
					s;
		size_t		i = 0;

		for (; i + 16 <= C; i += 16)
			for (int k = 0; k < 16; k++)
				acc[k] += (x[i + k] - m) * (x[i + k] - m);
		for (; i < C; i++)
			var += (x[i] - m) * (x[i] - m);
		for (int k = 0; k < 16; k++)
			var += acc[k];
		s = 1.0f / sqrtf(var / (float) C + LAYERNORM_EPS);
		for (i = 0; i < C; i++)
			out[i] = (x[i] - m) * s * w[i] + b[i];
		if (a->mean != NULL)
		{
			a->mean[r] = m;
			a->rstd[r] = s;
		}
	}
}

void
layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *weight,
				  const float *bias, int R, int C)
{
	LayernormArgs a = {.out = out, .mean = mean, .rstd = rstd, .inp = inp, .weight = weight,
	.bias = bias, .BT = R, .C = C};

	if (R >= LAYERNORM_PARALLEL_ROWS)
		llm_parallel_for(R, layernorm_forward_task, &a);
	else
		layernorm_forward_task(&a, 0, R);
}

/* dinp by rows. */
LLM_SIMD static void
layernorm_backward_rows(void *arg, size_t start, size_t end)
{
	LayernormArgs *a = arg;
	size_t		C = a->C;

	for (size_t r = start; r < end; r++)
	{
		const float *x = a->inp + r * C;
		const float *dout = a->dout + r * C;
		float	   *dinp = a->dinp + r * C;
		float		m = a->cmean[r],
					s = a->crstd[r];
		float		acc1[LANES] = {0},
					acc2[LANES] = {0};
		float		dnorm_mean = 0.0f,
					dnorm_norm_mean = 0.0f;
		size_t		i = 0;

		for (; i + LANES <= C; i += LANES)
			for (int j = 0; j < LANES; j++)
			{
				float		dnorm = a->weight[i + j] * dout[i + j];

				acc1[j] += dnorm;
				acc2[j] += dnorm * (x[i + j] - m) * s;
			}
		for (int j = 0; j < LANES; j++)
			dnorm_mean += acc1[j], dnorm_norm_mean += acc2[j];
		for (; i < C; i++)
		{
			float		dnorm = a->weight[i] * dout[i];

			dnorm_mean += dnorm;
			dnorm_norm_mean += dnorm * (x[i] - m) * s;
		}
		dnorm_mean /= C;
		dnorm_norm_mean /= C;
		for (i = 0; i < C; i++)
		{
			float		norm = (x[i] - m) * s;

			dinp[i] += (a->weight[i] * dout[i] - dnorm_mean - norm * dnorm_norm_mean) * s;
		}
	}
}

/* dweight and dbias by channel ranges, summing over rows. */
LLM_SIMD static void
layernorm_backward_cols(void *arg, size_t start, size_t end)
{
	LayernormArgs *a = arg;
	size_t		C = a->C;

	if (!a->accumulate)
		for (size_t i = start; i < end; i++)
			a->dweight[i] = a->dbias[i] = 0.0f;
	for (size_t r = 0; r < (size_t) a->BT; r++)
	{
		const float *x = a->inp + r * C;
		const float *dout = a->dout + r * C;
		float		m = a->cmean[r],
					s = a->crstd[r];

		for (size_t i = start; i < end; i++)
		{
			a->dweight[i] += (x[i] - m) * s * dout[i];
			a->dbias[i] += dout[i];
		}
	}
}

void
layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
				   const float *weight, const float *mean, const float *rstd, int R, int C,
				   bool accumulate)
{
	LayernormArgs a = {.dinp = dinp, .dweight = dweight, .dbias = dbias, .dout = dout,
		.inp = inp, .weight = weight, .cmean = mean, .crstd = rstd, .BT = R, .C = C,
	.accumulate = accumulate};

	llm_parallel_for(R, layernorm_backward_rows, &a);
	llm_parallel_for(C, layernorm_backward_cols, &a);
}

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

/*
 * One task = one (batch, head) pair: its rows of att and its slice of out are its own.
 * The scores of row t, q_t . k_t2 for every t2 <= t, are computed as hs vectorised row updates
 * over a transposed copy of the head's keys (scratch), not as t+1 short dot products.
 */
LLM_SIMD static void
attention_forward_task(void *arg, size_t start, size_t end)
{
	AttentionArgs *a = arg;
	size_t		T = a->T,
				C = a->C,
				C3 = 3 * C;
	int			hs = a->C / a->NH;
	float		scale = 1.0f / sqrtf((float) hs);
	uint32_t	threshold = dropout_threshold(a->dropout);
	float		keep_scale = 1.0f / (1.0f - a->dropout);

	for (size_t bh = start; bh < end; bh++)
	{
		size_t		b = bh / a->NH,
					h = bh % a->NH;
		const float *base = a->inp + b * T * C3 + h * hs;
		float	   *kt = a->scratch + bh * (hs + 1) * T;	/* (hs, T) */

		for (size_t t2 = 0; t2 < T; t2++)
			for (int i = 0; i < hs; i++)
				kt[i * T + t2] = base[t2 * C3 + C + i];

		for (size_t t = 0; t < T; t++)
		{
			const float *q = base + t * C3;
			float	   *att = a->att + (bh * T + t) * T;
			float	   *out = a->out + (b * T + t) * C + h * hs;
			size_t		n = t + 1;

			memset(att, 0, T * sizeof(float));
			for (int i = 0; i < hs; i++)
			{
				const float *k = kt + i * T;
				float		qi = q[i] * scale;

				for (size_t t2 = 0; t2 < n; t2++)
					att[t2] += qi * k[t2];
			}
			softmax_inplace(att, n);

			memset(out, 0, hs * sizeof(float));
			for (size_t t2 = 0; t2 < n; t2++)
			{
				const float *v = base + t2 * C3 + 2 * C;
				float		w = att[t2];

				if (a->dropout > 0.0f)
					w = dropout_keep(a->key, (bh * T + t) * T + t2, threshold) ? w * keep_scale : 0.0f;
				for (int i = 0; i < hs; i++)
					out[i] += w * v[i];
			}
		}
	}
}

void
attention_forward(float *out, float *att, float *scratch, const float *inp, int B, int T, int C, int NH,
				  float dropout, uint64_t key)
{
	AttentionArgs a = {.out = out, .att = att, .scratch = scratch, .inp = inp, .B = B, .T = T, .C = C,
	.NH = NH, .dropout = dropout, .key = key};

	llm_parallel_for((size_t) B * NH, attention_forward_task, &a);
}

LLM_SIMD static void
attention_backward_task(void *arg, size_t start, size_t end)
{
	AttentionArgs *a = arg;
	size_t		T = a->T,
				C = a->C,
				C3 = 3 * C;
	int			hs = a->C / a->NH;
	float		scale = 1.0f / sqrtf((float) hs);
	uint32_t	threshold = dropout_threshold(a->dropout);
	float		keep_scale = 1.0f / (1.0f - a->dropout);

	for (size_t bh = start; bh < end; bh++)
	{
		size_t		b = bh / a->NH,
					h = bh % a->NH;
		const float *base = a->inp + b * T * C3 + h * hs;
		float	   *dbase = a->dinp + b * T * C3 + h * hs;
		float	   *vt = a->scratch + bh * (hs + 1) * T;	/* (hs, T) */
		float	   *datt = vt + hs * T; /* (T) */

		for (size_t t2 = 0; t2 < T; t2++)
		{
			for (int i = 0; i < hs; i++)
				vt[i * T + t2] = base[t2 * C3 + 2 * C + i];
			for (int k = 0; k < 3; k++)
				memset(dbase + t2 * C3 + k * C, 0, hs * sizeof(float));
		}

		for (size_t t = 0; t < T; t++)
		{
			const float *q = base + t * C3;
			float	   *dq = dbase + t * C3;
			const float *dout = a->dout + (b * T + t) * C + h * hs;
			const float *att = a->catt + (bh * T + t) * T;
			size_t		n = t + 1;
			float		s = 0.0f;

			/* through out = dropout(att) @ v: datt = dout . v, dv += att * dout */
			memset(datt, 0, n * sizeof(float));
			for (int i = 0; i < hs; i++)
			{
				const float *v = vt + i * T;
				float		d = dout[i];

				for (size_t t2 = 0; t2 < n; t2++)
					datt[t2] += d * v[t2];
			}
			for (size_t t2 = 0; t2 < n; t2++)
			{
				float	   *dv = dbase + t2 * C3 + 2 * C;
				float		w = att[t2];

				if (a->dropout > 0.0f)
				{
					float		mask = dropout_keep(a->key, (bh * T + t) * T + t2, threshold) ? keep_scale : 0.0f;

					datt[t2] *= mask;
					w *= mask;
				}
				for (int i = 0; i < hs; i++)
					dv[i] += w * dout[i];
			}
			/* through the softmax and the scaled q.k */
			for (size_t t2 = 0; t2 < n; t2++)
				s += att[t2] * datt[t2];
			for (size_t t2 = 0; t2 < n; t2++)
			{
				const float *k = base + t2 * C3 + C;
				float	   *dk = dbase + t2 * C3 + C;
				float		dpre = att[t2] * (datt[t2] - s) * scale;

				for (int i = 0; i < hs; i++)
				{
					dq[i] += dpre * k[i];
					dk[i] += dpre * q[i];
				}
			}
		}
	}
}

void
attention_backward(float *dinp, float *scratch, const float *dout, const float *inp, const float *att,
				   int B, int T, int C, int NH, float dropout, uint64_t key)
{
	AttentionArgs a = {.dinp = dinp, .scratch = scratch, .dout = dout, .inp = inp, .catt = att,
	.B = B, .T = T, .C = C, .NH = NH, .dropout = dropout, .key = key};

	llm_parallel_for((size_t) B * NH, attention_backward_task, &a);
}

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

/*
 * The element-wise loops read and write through local restrict pointers, in place or not: through
 * the argument struct, every store could change the struct's pointers (PostgreSQL builds with
 * -fno-strict-aliasing), and the loops would not vectorise.
 */
LLM_SIMD static void
gelu_forward_task(void *arg, size_t start, size_t end)
{
	EltwiseArgs *a = arg;

	if (a->out == a->inp)
	{
		float	   *restrict x = a->out;

		for (size_t i = start; i < end; i++)
			x[i] = gelu(x[i]);
	}
	else
	{
		float	   *restrict out = a->out;
		const float *restrict inp = a->inp;

		for (size_t i = start; i < end; i++)
			out[i] = gelu(inp[i]);
	}
}

void
gelu_forward(float *out, const float *inp, size_t N)
{
	EltwiseArgs a = {.out = out, .inp = inp};

	if (N >= GELU_PARALLEL_ELEMENTS)
		llm_parallel_for(N, gelu_forward_task, &a);
	else
		gelu_forward_task(&a, 0, N);
}

LLM_SIMD static void
gelu_backward_task(void *arg, size_t start, size_t end)
{
	EltwiseArgs *a = arg;
	const float *restrict inp = a->inp;

	if (a->out == a->inp2)
	{
		float	   *restrict d = a->out;

		for (size_t i = start; i < end; i++)
			d[i] = d[i] * gelu_grad(inp[i]);
	}
	else
	{
		float	   *restrict out = a->out;
		const float *restrict dout = a->inp2;

		for (size_t i = start; i < end; i++)
			out[i] = dout[i] * gelu_grad(inp[i]);
	}
}

void
gelu_backward(float *dinp, const float *inp, const float *dout, size_t N)
{
	EltwiseArgs a = {.out = dinp, .inp = inp, .inp2 = dout};

	llm_parallel_for(N, gelu_backward_task, &a);
}

static void
residual_task(void *arg, size_t start, size_t end)
{
	EltwiseArgs *a = arg;

	for (size_t i = start; i < end; i++)
		a->out[i] = a->inp[i] + a->inp2[i];
}

void
residual_forward(float *out, const float *inp1, const float *inp2, size_t N)
{
	EltwiseArgs a = {.out = out, .inp = inp1, .inp2 = inp2};

	llm_parallel_for(N, residual_task, &a);
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

LLM_SIMD static void
crossentropy_task(void *arg, size_t start, size_t end)
{
	CrossentropyArgs *a = arg;
	size_t		V = a->V;

	for (size_t r = start; r < end; r++)
	{
		float	   *x = a->logits + r * V;
		int32_t		target = a->targets[r];
		float		target_logit = x[target];
		float		maxval = llm_max(x, V);
		float		total,
					scale;

		for (size_t i = 0; i < V; i++)
			x[i] = llm_expf(x[i] - maxval);
		total = llm_sum(x, V);
		a->losses[r] = logf(total) + maxval - target_logit;
		scale = a->dloss / total;
		for (size_t i = 0; i < V; i++)
			x[i] *= scale;
		x[target] -= a->dloss;
	}
}

void
crossentropy_softmax_forward_backward(float *losses, float *logits, const int32_t *targets, int N, int V,
									  float dloss)
{
	CrossentropyArgs a = {.losses = losses, .logits = logits, .targets = targets, .V = V, .dloss = dloss};

	llm_parallel_for(N, crossentropy_task, &a);
}

/* ---- gradient norm, AdamW ------------------------------------------------------------------ */

#define NORM_CHUNKS 256
#define NORM_BLOCK 1024

typedef struct
{
	const float *x;
	size_t		N;
	double		partial[NORM_CHUNKS];
}			NormArgs;

/* Fixed chunk boundaries, so the sum does not depend on the number of threads. */
LLM_SIMD static void
norm_task(void *arg, size_t start, size_t end)
{
	NormArgs   *a = arg;

	for (size_t c = start; c < end; c++)
	{
		size_t		lo = a->N * c / NORM_CHUNKS,
					hi = a->N * (c + 1) / NORM_CHUNKS;
		double		total = 0.0;

		for (size_t b = lo; b < hi; b += NORM_BLOCK)
		{
			size_t		n = Min(NORM_BLOCK, hi - b);
			float		acc[LANES] = {0};
			size_t		i = 0;

			for (; i + LANES <= n; i += LANES)
				for (int j = 0; j < LANES; j++)
					acc[j] += a->x[b + i + j] * a->x[b + i + j];
			for (; i < n; i++)
				acc[0] += a->x[b + i] * a->x[b + i];
			for (int j = 0; j < LANES; j++)
				total += acc[j];
		}
		a->partial[c] = total;
	}
}

double
sum_of_squares(const float *x, size_t N)
{
	NormArgs	a = {.x = x, .N = N};
	double		total = 0.0;

	llm_parallel_for(NORM_CHUNKS, norm_task, &a);
	for (int c = 0; c < NORM_CHUNKS; c++)
		total += a.partial[c];
	return total;
}

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

/* One pass over memory; the operation order follows torch.optim.AdamW (foreach). */
LLM_SIMD static void
adamw_task(void *arg, size_t start, size_t end)
{
	AdamwArgs  *a = arg;
	float	   *restrict params = a->params;
	float	   *restrict ms = a->m;
	float	   *restrict vs = a->v;
	const float *restrict grads = a->grads;
	float		beta2 = a->beta2,
				w1 = 1.0f - a->beta1,
				w2 = 1.0f - a->beta2,
				eps = a->eps,
				step_size = a->step_size,
				bc2_sqrt = a->bc2_sqrt,
				decay = a->decay,
				grad_scale = a->grad_scale;

	for (size_t i = start; i < end; i++)
	{
		float		g = grads[i] * grad_scale;
		float		m = ms[i] + w1 * (g - ms[i]);
		float		v = vs[i] * beta2 + w2 * (g * g);
		float		denom = sqrtf(v) / bc2_sqrt + eps;

		ms[i] = m;
		vs[i] = v;
		params[i] = params[i] * decay - step_size * (m / denom);
	}
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

	llm_parallel_for(N, adamw_task, &a);
}
