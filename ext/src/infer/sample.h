/*
 * sample.h: choosing the next token from the logits (sample.c), as transformers' generate does.
 */
#ifndef PG_LLM_SAMPLE_H
#define PG_LLM_SAMPLE_H

#include "postgres.h"

#include "common/pg_prng.h"

typedef struct LlmSampler
{
	int			V;
	double		temperature;	/* 0: greedy (argmax) */
	int			top_k;			/* 0: off */
	double		top_p;			/* 1: off */
	pg_prng_state rng;
	float	   *z;				/* (V) scaled logits */
	int32	   *cand;			/* (V) candidate token ids */
	double	   *prob;			/* (V) candidate probabilities */
} LlmSampler;

/* Seeded when has_seed (reproducible), else from the backend's random state. */
extern void llm_sampler_init(LlmSampler *s, int V, double temperature, int top_k, double top_p,
							 bool has_seed, int64 seed);
/* Start a new stream of draws, as llm_sampler_init does (for a sampler used again). */
extern void llm_sampler_seed(LlmSampler *s, bool has_seed, int64 seed);
extern int32 llm_sample(LlmSampler *s, const float *logits);

/* out (V) <- log_softmax(logits (V)) */
extern void llm_log_softmax(float *out, const float *logits, int V);

#endif							/* PG_LLM_SAMPLE_H */
