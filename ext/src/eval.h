/*
 * eval.h: measuring a model without training it (eval.c): the mean loss over a dataset
 * (llm_eval, and llm_train's validation loss), a text's perplexity, a text's embedding.
 *
 * The forward pass is training's (the kernels of kernels.h; its products llm_sgemm_repeatable's,
 * the same on any number of threads) without dropout, keeping one layer's activations at a time.
 */
#ifndef PG_LLM_EVAL_H
#define PG_LLM_EVAL_H

#include "postgres.h"

#include "dataset.h"
#include "model.h"

/*
 * Mean cross-entropy over every target token of the dataset's rows, batch_size rows per forward;
 * *tokens receives the number of tokens. The dataset is open (llm_dataset_open; SPI connected).
 */
extern double llm_eval_dataset(const LlmModel *model, LlmDataset *ds, int batch_size, int64 *tokens);

/* Mean cross-entropy of B rows of T tokens (inputs and targets (B,T)), in one forward. */
extern double llm_eval_rows(const LlmModel *model, const int32 *inputs, const int32 *targets, int B, int T);

#endif							/* PG_LLM_EVAL_H */
