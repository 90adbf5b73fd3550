/*
 * generate.h: what the SQL functions of inference share (generate.c): argument checks, token
 * arrays, and the text around generation (the prompt's ids, the generated text). Used by
 * generate.c and beam.c.
 */
#ifndef PG_LLM_GENERATE_H
#define PG_LLM_GENERATE_H

#include "postgres.h"

#include "fmgr.h"
#include "model/model.h"
#include "utils/array.h"

/* The settings of one generation, checked. */
typedef struct GenSettings
{
	char	   *model;
	int			max_tokens;
	double		temperature;
	int			top_k;
	double		top_p;
	bool		has_seed;
	int64		seed;
	int32		eos;			/* stop after this token; -1: none */
	char	   *adapter;		/* compute with this adapter of the model, or NULL */
} GenSettings;

/*
 * The sampling arguments of the generation functions, at argument positions 1..6:
 * (max_tokens, temperature, topk, topp, model, seed), checked; eos -1.
 */
extern void llm_sampling_args(FunctionCallInfo fcinfo, GenSettings *set);


/* A 1-D int[] without NULLs and not empty, as a palloc'd copy; *n its length. */
extern int32 *llm_tokens_from_array(ArrayType *a, int *n);
extern ArrayType *llm_tokens_to_array(const int32 *tokens, int n);

/* Every id in the model's vocabulary. */
extern void llm_check_token_range(const int32 *tokens, int n, const LlmConfig *cfg);
/* max_tokens >= 1. */
extern void llm_check_max_tokens(int max_tokens);
/* The prompt and what is generated after it fit in the model's positions. */
extern void llm_check_context(int prompt_len, int max_tokens, const LlmConfig *cfg);
/* An end-of-sequence id in the vocabulary, or -1 (none). */
extern void llm_check_eos(int32 eos, const LlmConfig *cfg);

/*
 * The prompt's ids under the model's tokenizer, and the id generation stops at: the tokenizer's
 * <|endoftext|> (-1 when it has none, or when the model cannot produce it).
 */
extern int32 *llm_encode_prompt(const char *model, text *prompt, int *n, int32 *eos);
/* Generated ids as text, without the end-of-text token that stopped generation. */
extern text *llm_decode_generated(const char *model, const int32 *ids, int n, int32 eos);

/* generate/batch.c: llm_generate_batch; pg_llm.batch_rows, defined by _PG_init. */
extern int	llm_batch_rows;
extern void llm_batch_init(void);

#endif							/* PG_LLM_GENERATE_H */
