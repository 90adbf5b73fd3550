/*
 * infer.h: the GPT-2 forward pass for inference, with a key/value cache.
 *
 * The model is a served copy (served.h): every linear layer and the tied head are products over
 * packed weights (llm_gemv) in the session's precision, each row's result the same whatever the
 * other rows. A prompt is one batched pass (T rows); then each generation step runs a few rows,
 * reading every weight once per step. The rows of a step are row slots, each a sequence at its
 * own position:
 * - beams (llm_infer_create): all slots share one prompt's keys and values; each beam's own
 *   positions are found through a path of slot indices, so that reordering beams copies
 *   integers, never cached vectors;
 * - a batch (llm_infer_create_rows): each slot has a prompt of its own, run when a sequence
 *   enters the slot (llm_infer_prompt_row; llm_infer_prompt_rows runs several prompts in shared
 *   passes); any subset of the slots steps together
 *   (llm_infer_step_rows), each at its own position, and a slot is reused for the next sequence.
 *
 * Shapes: L = n_layer, NH = n_head, C = d_model, hs = C / NH, V = vocab, Tp = prompt length,
 * G = generated positions, B = row slots, P = prompt slots (1 for beams, B for a batch).
 */
#ifndef PG_LLM_INFER_H
#define PG_LLM_INFER_H

#include "infer/sample.h"
#include "model/model.h"

typedef struct LlmInfer
{
	const LlmModel *model;		/* refreshed by the caller before each call (llm_infer_set_model) */
	int			L,
				NH,
				C,
				V,
				hs;
	bool		batch;			/* llm_infer_create_rows: independent sequences, not beams */
	int			beams;			/* B: row slots */
	int			prompts;		/* P: prompt slots; row slot b reads prompt slot (P == 1 ? 0 : b) */
	int			max_prompt;		/* positions of the longest prompt */
	int			ctx;			/* capacity of each prompt slot (positions): max_prompt for beams; for a
								 * batch its prompt and then its generated positions */
	int			max_new;		/* capacity of the beams' generated cache (positions per row slot; 0 for
								 * a batch) */
	int			rows;			/* R: rows of the activations, the most tokens of one prompt pass */
	int		   *prompt_len;		/* (P) Tp of each prompt slot, once its prompt has run */
	int		   *n_new;			/* (B) G: positions generated so far in each row slot */

	float	   *k_prompt,
			   *v_prompt;		/* (L, P, ctx, C) */
	float	   *k_new,
			   *v_new;			/* beams: (L, B, max_new, C), position g of slot b, a slot's positions in a row */
	int		   *path;			/* (B, max_new): slot that holds row b's position g */
	int		   *path_tmp;		/* (B, max_new) */
	int		   *step_rows;		/* (B) the row slots of the step in progress */
	const float **kv_rows;		/* (B, 2, ctx + max_new) where each position's key and value row is */
	int		   *kv_n;			/* (B) positions each row of the step sees */

	/* activations, R rows: max(max_prompt, B), for a batch at least min(P x max_prompt, 96) */
	float	   *x;				/* (R, C) residual stream */
	float	   *ln;				/* (R, C) */
	float	   *qkv;			/* (R, 3C) */
	float	   *att;			/* (R, C) */
	float	   *fch;			/* (R, 4C) */
	float	   *scores;			/* attention probabilities, see infer.c */
	float	   *logits;			/* (B, V) */
	void	   *gemv_scratch;	/* llm_gemv's activations in its kernels' form, R rows, 64-byte aligned */
	const LlmLora **adapter;	/* (B) the adapter of each row slot, or NULL (none) */
} LlmInfer;

/* Buffers for B beams, a prompt of up to max_prompt tokens and max_new generated tokens (palloc'd). */
extern LlmInfer *llm_infer_create(const LlmModel *m, int beams, int max_prompt, int max_new);

/*
 * Buffers for B independent sequences, each a prompt of up to max_prompt tokens and then generated
 * positions, max_positions in all (a slot's cache holds no more than one sequence can use).
 */
extern LlmInfer *llm_infer_create_rows(const LlmModel *m, int rows, int max_prompt, int max_positions);

/*
 * Row slot `row` computes with this adapter (NULL: none) from its next prompt on; row -1: every
 * slot. The adapter must outlive its use (the caller's memory).
 */
extern void llm_infer_set_adapter(LlmInfer *s, int row, const LlmLora *lora);

/* Use these weights from now on (same architecture; the caller checks they did not change). */
extern void llm_infer_set_model(LlmInfer *s, const LlmModel *m);

/* Run the prompt (T tokens, shared by all beams); returns the logits (V) after its last token. */
extern const float *llm_infer_prompt(LlmInfer *s, const int32 *tokens, int T);

/* One step: tokens[b] is beam b's next input; returns the logits (B, V) after it. */
extern const float *llm_infer_step(LlmInfer *s, const int32 *tokens);

/*
 * A batch (llm_infer_create_rows): a new sequence in row slot `row` (what the slot held is
 * dropped); runs its prompt of T tokens and returns the logits (V) after its last token.
 */
extern const float *llm_infer_prompt_row(LlmInfer *s, int row, const int32 *tokens, int T);

/*
 * New sequences in n distinct row slots rows[0..n) at once: prompt i (T[i] tokens) into slot
 * rows[i]; returns the logits (n, V), row i after prompt i's last token. Prompts that fit the
 * rows of one pass together share it (each weight read once for all of them); each slot's keys,
 * values and logits are exactly those of llm_infer_prompt_row alone.
 */
extern const float *llm_infer_prompt_rows(LlmInfer *s, int n, const int *rows,
										  const int32 *const *tokens, const int *T);

/*
 * One step of n distinct row slots rows[0..n), each at its own position: tokens[i] is the next
 * input of slot rows[i]; returns the logits (n, V) after them, row i for slot rows[i]. The rows of
 * a step never affect each other's results: a slot's logits are exactly those it would get alone.
 */
extern const float *llm_infer_step_rows(LlmInfer *s, const int *rows, int n, const int32 *tokens);

/* Bytes of the key/value cache that s reserved. */
extern size_t llm_infer_cache_bytes(const LlmInfer *s);

/* Beam b continues the sequence of beam parents[b] (before the next llm_infer_step). */
extern void llm_infer_reorder(LlmInfer *s, const int *parents);

#endif							/* PG_LLM_INFER_H */
