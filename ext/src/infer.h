/*
 * infer.h: the GPT-2 forward pass for inference, with a key/value cache.
 *
 * The model is a served copy (served.h): every linear layer and the tied head are products over
 * packed weights (llm_gemv) in the session's precision. A prompt is one batched pass (T rows);
 * then each generation step runs B rows, one per beam, reading every weight once per step. All beams
 * share the prompt's keys and values; each beam's own positions are found through a path of slot
 * indices, so that reordering beams copies integers, never cached vectors.
 *
 * Shapes: L = n_layer, NH = n_head, C = d_model, hs = C / NH, V = vocab, Tp = prompt length,
 * G = generated positions, B = beams.
 */
#ifndef PG_LLM_INFER_H
#define PG_LLM_INFER_H

#include "model.h"

typedef struct LlmInfer
{
	const LlmModel *model;		/* refreshed by the caller before each call (llm_infer_set_model) */
	int			L,
				NH,
				C,
				V,
				hs;
	int			beams;			/* B */
	int			max_prompt;		/* capacity of the prompt cache (positions) */
	int			max_new;		/* capacity of the generated cache (positions per beam) */
	int			prompt_len;		/* Tp, once the prompt has run */
	int			n_new;			/* G: positions generated so far by each beam */

	float	   *k_prompt,
			   *v_prompt;		/* (L, Tp, C) */
	float	   *k_new,
			   *v_new;			/* (L, G, B, C): position g of slot b */
	int		   *path;			/* (B, G): slot that holds beam b's position g */
	int		   *path_tmp;		/* (B, G) */

	/* activations, R = max(max_prompt, B) rows */
	float	   *x;				/* (R, C) residual stream */
	float	   *ln;				/* (R, C) */
	float	   *qkv;			/* (R, 3C) */
	float	   *att;			/* (R, C) */
	float	   *fch;			/* (R, 4C) */
	float	   *scores;			/* attention probabilities, see infer.c */
	float	   *logits;			/* (B, V) */
	void	   *gemv_scratch;	/* llm_gemv's activations in its kernels' form, R rows, 64-byte aligned */
} LlmInfer;

/* Buffers for B beams, a prompt of up to max_prompt tokens and max_new generated tokens (palloc'd). */
extern LlmInfer *llm_infer_create(const LlmModel *m, int beams, int max_prompt, int max_new);

/* Use these weights from now on (same architecture; the caller checks they did not change). */
extern void llm_infer_set_model(LlmInfer *s, const LlmModel *m);

/* Run the prompt (T tokens, shared by all beams); returns the logits (V) after its last token. */
extern const float *llm_infer_prompt(LlmInfer *s, const int32 *tokens, int T);

/* One step: tokens[b] is beam b's next input; returns the logits (B, V) after it. */
extern const float *llm_infer_step(LlmInfer *s, const int32 *tokens);

/* Beam b continues the sequence of beam parents[b] (before the next llm_infer_step). */
extern void llm_infer_reorder(LlmInfer *s, const int *parents);

#endif							/* PG_LLM_INFER_H */
