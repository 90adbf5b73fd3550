/*
 * checkpoint.h: writing a model's whole set of weights into llm_param, shared by the file
 * importer (npz.c) and the initialiser (checkpoint.c).
 *
 * Everything runs in the calling transaction through SPI, so an ERROR anywhere (a corrupt
 * tensor, a missing one, a cancel) rolls back the configuration row, the deleted old weights
 * and every tensor already written: a model is never half-imported.
 */
#ifndef PG_LLM_CHECKPOINT_H
#define PG_LLM_CHECKPOINT_H

#include "postgres.h"

#include "executor/spi.h"
#include "model/model.h"

typedef struct LlmWeightWriter
{
	LlmConfig	cfg;			/* the model's architecture, as registered */
	LlmLayout	layout;
	LlmTensorRows rows;			/* the tensors written already */
	SPIPlanPtr	insert;			/* INSERT INTO llm_param (model, name, shape, data) */
	bytea	   *buffer;			/* see llm_weights_buffer */
} LlmWeightWriter;

/*
 * Start writing the weights of `model` (caller is connected to SPI). `arch` is the
 * architecture the new weights have, or NULL when they carry none: the model is then taken
 * from llm_model_config and must exist. A model that is absent is registered with `arch`; one
 * that is present must have the same architecture. A model that has weights already is an
 * ERROR unless `replace`; replacing also clears its optimizer and training state.
 */
extern void llm_weights_begin(LlmWeightWriter *w, const char *model, const LlmConfig *arch, bool replace);

/*
 * A buffer for tensor number `index` (llm_tensor_info order), its varlena size set. One buffer,
 * sized for the largest tensor, serves every call: no fresh pages to fault in per tensor.
 */
extern bytea *llm_weights_buffer(LlmWeightWriter *w, int index);

/* Write tensor number `index` (llm_tensor_info order); `data` holds exactly its numel float32 values. */
extern void llm_weights_put(LlmWeightWriter *w, int index, bytea *data);

/* "n_layer=12, n_head=12, d_model=768, n_positions=1024, vocab=50257", for messages. */
extern char *llm_describe_architecture(const LlmConfig *cfg);

/* ERROR naming the first tensor that was not written. */
extern void llm_weights_finish(LlmWeightWriter *w);

#endif							/* PG_LLM_CHECKPOINT_H */
