/*
 * sample.c: choosing the next token from the logits, in the order transformers' generate applies
 * its warpers: temperature, then top-k, then top-p (nucleus), then one draw from what is left.
 * Temperature 0 is greedy decoding: the first maximum, as torch.argmax.
 *
 * The draws come from PostgreSQL's PRNG (xoroshiro128**): with a seed, the same call gives the same
 * tokens in any session; without one, the state is seeded from the backend's own random state.
 */
#include "base/base.h"
#include "infer/sample.h"

#include <math.h>

void
llm_sampler_init(LlmSampler *s, int V, double temperature, int top_k, double top_p,
				 bool has_seed, int64 seed)
{
	s->V = V;
	s->temperature = temperature;
	s->top_k = (top_k > 0 && top_k < V) ? top_k : 0;
	s->top_p = top_p;
	s->z = palloc(sizeof(float) * V);
	s->cand = palloc(sizeof(int32) * V);
	s->prob = palloc(sizeof(double) * V);
	llm_sampler_seed(s, has_seed, seed);
}

void
llm_sampler_seed(LlmSampler *s, bool has_seed, int64 seed)
{
	pg_prng_seed(&s->rng, has_seed ? (uint64) seed : pg_prng_uint64(&pg_global_prng_state));
}

/*
 * Every way of choosing tokens (sampling, greedy, beams) starts here: a NaN or infinite logit
 * means broken weights, and no token chosen from it means anything.
 */
static void
check_logits(const float *logits, int V)
{
	for (int i = 0; i < V; i++)
		if (!isfinite(logits[i]))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("the model's logits are not finite (logit %d is %s)", i,
							isnan(logits[i]) ? "NaN" : "infinite"),
					 errdetail("Its weights hold values that no computation in float32 survives."),
					 errhint("Load a checkpoint saved before (llm_checkpoint_load), or train again with a lower lr_max.")));
}

static int32
argmax(const float *x, int n)
{
	int32		best = 0;

	for (int i = 1; i < n; i++)
		if (x[i] > x[best])
			best = i;
	return best;
}

/* The k-th largest of z (0 < k < n), by a min-heap of the k largest seen (heap: k floats). */
static float
kth_largest(const float *z, int n, int k, float *heap)
{
	for (int i = 0; i < k; i++)
	{
		/* sift up */
		int			c = i;

		heap[c] = z[i];
		while (c > 0 && heap[(c - 1) / 2] > heap[c])
		{
			float		tmp = heap[c];

			heap[c] = heap[(c - 1) / 2];
			heap[(c - 1) / 2] = tmp;
			c = (c - 1) / 2;
		}
	}
	for (int i = k; i < n; i++)
	{
		int			c = 0;

		if (!(z[i] > heap[0]))
			continue;
		heap[0] = z[i];
		/* sift down */
		for (;;)
		{
			int			l = 2 * c + 1,
						r = l + 1,
						m = c;
			float		tmp;

			if (l < k && heap[l] < heap[m])
				m = l;
			if (r < k && heap[r] < heap[m])
				m = r;
			if (m == c)
				break;
			tmp = heap[c];
			heap[c] = heap[m];
			heap[m] = tmp;
			c = m;
		}
	}
	return heap[0];
}

/* Candidates by scaled logit, highest first; equal ones by token id. */
static int
cmp_cand(const void *a, const void *b, void *arg)
{
	const float *z = arg;
	int32		x = *(const int32 *) a,
				y = *(const int32 *) b;

	if (z[x] != z[y])
		return z[x] > z[y] ? -1 : 1;
	return (x > y) - (x < y);
}

int32
llm_sample(LlmSampler *s, const float *logits)
{
	int			V = s->V;
	float	   *z = s->z;
	float		t = (float) s->temperature;
	float		zmax;
	int			n = 0;
	double		total = 0.0,
				u,
				acc = 0.0;

	check_logits(logits, V);

	/*
	 * Scaled in float32, as transformers divides. A positive temperature that is 0 in float32, or
	 * so small that a scaled logit overflows, samples as greedy decoding does, the limit of sampling
	 * as the temperature goes to 0: the scaled logits would be infinite, their probabilities NaN.
	 */
	if (s->temperature == 0.0 || t == 0.0f)
		return argmax(logits, V);
	zmax = 0.0f;
	for (int i = 0; i < V; i++)
	{
		z[i] = logits[i] / t;
		zmax = fabsf(z[i]) > zmax ? fabsf(z[i]) : zmax;
	}
	if (!isfinite(zmax))
		return argmax(logits, V);

	/* top-k keeps every token scoring at least the k-th best (ties included, as transformers) */
	if (s->top_k > 0)
	{
		float	   *heap = (float *) s->prob;	/* scratch: k floats fit in V doubles */
		float		threshold = kth_largest(z, V, s->top_k, heap);

		for (int i = 0; i < V; i++)
			if (z[i] >= threshold)
				s->cand[n++] = i;
	}
	else
	{
		for (int i = 0; i < V; i++)
			s->cand[i] = i;
		n = V;
	}
	zmax = z[s->cand[0]];
	for (int c = 1; c < n; c++)
		zmax = z[s->cand[c]] > zmax ? z[s->cand[c]] : zmax;
	for (int c = 0; c < n; c++)
	{
		s->prob[c] = exp((double) z[s->cand[c]] - zmax);
		total += s->prob[c];
	}

	/* top-p keeps the most likely tokens until their probability reaches top_p (at least one) */
	if (s->top_p < 1.0)
	{
		double		cum = 0.0;
		int			keep = 0;

		qsort_arg(s->cand, n, sizeof(int32), cmp_cand, z);
		for (int c = 0; c < n; c++)
			s->prob[c] = exp((double) z[s->cand[c]] - zmax);
		while (keep < n && (keep == 0 || cum < s->top_p))
		{
			cum += s->prob[keep] / total;
			keep++;
		}
		n = keep;
		total = 0.0;
		for (int c = 0; c < n; c++)
			total += s->prob[c];
	}

	u = pg_prng_double(&s->rng) * total;
	for (int c = 0; c < n; c++)
	{
		acc += s->prob[c];
		if (u < acc)
			return s->cand[c];
	}
	return s->cand[n - 1];
}

void
llm_log_softmax(float *out, const float *logits, int V)
{
	float		m = logits[0];
	double		sum = 0.0;
	float		lse;

	check_logits(logits, V);
	for (int i = 1; i < V; i++)
		m = logits[i] > m ? logits[i] : m;
	for (int i = 0; i < V; i++)
		sum += exp((double) logits[i] - m);
	lse = (float) log(sum);
	for (int i = 0; i < V; i++)
		out[i] = (logits[i] - m) - lse;
}
