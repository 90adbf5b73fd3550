/*
 * batch.h: batched generation (batch.c): llm_generate_batch decodes many prompts together, each
 * step one pass over the weights for every unfinished sequence.
 */
#ifndef PG_LLM_BATCH_H
#define PG_LLM_BATCH_H

/* pg_llm.batch_rows: sequences decoded at once by one llm_generate_batch call. */
extern int	llm_batch_rows;

/* Defines the settings above (from _PG_init). */
extern void llm_batch_init(void);

#endif							/* PG_LLM_BATCH_H */
