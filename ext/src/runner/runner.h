/*
 * runner.h: continuous batching across sessions (runner.c).
 *
 * Sessions that generate with the same model, weights_version and precision at the same time hand
 * their forward passes to one process, the model's batch runner, which runs every waiting
 * sequence's step in one pass over the weights. A session keeps everything else: the arguments,
 * the tokenizer, sampling (from the logits the runner returns) and when to stop, so what it sees is
 * exactly what it would compute alone. Where there is no runner (pg_llm.batch_sessions = 0, a
 * private copy of the weights, no free background worker or slot) the session computes alone.
 */
#ifndef PG_LLM_RUNNER_H
#define PG_LLM_RUNNER_H

#include "model/model.h"

/* pg_llm.batch_sessions: sequences one runner decodes at once; 0 = every session computes alone. */
extern int	llm_batch_sessions;

extern void llm_runner_init(void);

/* A sequence of this session in a runner. */
typedef struct LlmRunnerSeq LlmRunnerSeq;

/*
 * A sequence in the runner of m (from llm_model_get), started first when there is none, computing
 * with the adapter lora (NULL: none; read by the caller with its rights); NULL when this session
 * must compute alone. Held until llm_runner_end, or until the resource owner current now is
 * released (the statement or cursor ends, an error or a cancel).
 */
extern LlmRunnerSeq *llm_runner_begin(const LlmModel *m, const LlmLora *lora);

/* The logits (V) after a prompt of T tokens (a new sequence), and after each next token. */
extern const float *llm_runner_prompt(LlmRunnerSeq *q, const int32 *tokens, int T);
extern const float *llm_runner_step(LlmRunnerSeq *q, int32 token);

/* Gives the sequence's slot back; the logits returned before are no longer valid. */
extern void llm_runner_end(LlmRunnerSeq *q);

/* The background worker's entry point (bgw_function_name). */
extern PGDLLEXPORT void llm_runner_main(Datum arg);

#endif							/* PG_LLM_RUNNER_H */
