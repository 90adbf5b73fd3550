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

#include "train/dataset.h"
#include "model/model.h"

/*
 * Mean cross-entropy over every target token of the dataset's rows, batch_size rows per forward,
 * with the adapter lora (NULL: none); *tokens receives the number of tokens. The dataset is open
 * (llm_dataset_open; SPI connected).
 */
extern double llm_eval_dataset(const LlmModel *model, const LlmLora *lora, LlmDataset *ds, int batch_size,
							   int64 *tokens);

/*
 * The block's operations for training and evaluation (full_pass.c): products by sgemm on the
 * float32 block, causal attention over B sequences of T tokens keeping its probabilities (per
 * layer for a backward pass, else one set reused), dropout keyed by the step (training; 0: none).
 */
typedef struct LlmFullPass
{
	const LlmModel *model;
	int			B,
				T,
				NH;
	float	   *att;			/* (L or 1, B, NH, T, T) */
	bool		att_per_layer;
	float	   *scratch;		/* (B, T, C + NH) */
	float		dropout;
	uint64		seed;			/* the masks' keys: seed, global step, micro-batch, site */
	int64		step;
	int			micro;
	bool		repeatable;		/* products the same on any number of threads (llm_sgemm_repeatable):
								 * measuring, which parallel workers run with fewer threads */
	const LlmLora *lora;		/* the adapter every row runs with, or NULL */
	float		lora_dropout;	/* on the adapter's inputs (training; 0: none) */
	float	   *lora_h;			/* (B, T, rank) scratch (training) */
	float	   *lora_x;			/* (B, T, 4C) the adapter's input after dropout (when lora_dropout) */
} LlmFullPass;

extern const LlmBlockOps llm_full_pass_ops;

/* The key of the dropout masks at (layer, site); layer -1 is the embeddings. */
extern uint64 llm_full_pass_key(const LlmFullPass *f, int layer, int site);

/* The key of the adapter's dropout mask on the input of layer l's product of this kind. */
extern uint64 llm_full_pass_lora_key(const LlmFullPass *f, int layer, LlmParamKind kind);

/* Mean cross-entropy of B rows of T tokens (inputs and targets (B,T)), in one forward, with lora. */
extern double llm_eval_rows(const LlmModel *model, const LlmLora *lora, const int32 *inputs, const int32 *targets,
							int B, int T);

#endif							/* PG_LLM_EVAL_H */
