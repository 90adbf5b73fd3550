/*
 * llm_limits.h: the limits pg_llm enforces, in one place.
 *
 * The SQL CHECK constraints of pg_llm--0.1.0.sql (frozen) hold the same numbers; the test suite
 * checks them against pg_llm_limits(), which reports these values to clients (pgllm asks the
 * server rather than keeping its own copy).
 */
#ifndef PG_LLM_LIMITS_H
#define PG_LLM_LIMITS_H

/* llm_model_config */
#define LLM_MODEL_NAME_MAX 200		/* bytes of a model name */
#define LLM_N_LAYER_MAX 1000
#define LLM_N_HEAD_MAX 1000
#define LLM_D_MODEL_MAX 65536
#define LLM_N_POSITIONS_MAX 1048576
#define LLM_VOCAB_MAX 10000000

/* tokenizers: ids below LLM_VOCAB_MAX (llm_bpe_vocab's CHECK) */
#define LLM_TOKEN_ID_MAX (LLM_VOCAB_MAX - 1)

/* llm_train */
#define LLM_BATCH_SIZE_MAX 65536
#define LLM_GRAD_ACCUM_MAX 65536

/* beam search keeps every beam's cache: this bounds the memory and time one call can ask for */
#define LLM_BEAM_WIDTH_MAX 64

/* pg_llm.batch_rows: each sequence in flight keeps its own cache; the same bound as beams */
#define LLM_BATCH_ROWS_MAX 64

#endif							/* PG_LLM_LIMITS_H */
