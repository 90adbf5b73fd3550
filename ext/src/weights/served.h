/*
 * served.h: the weights inference computes on, in the precision of pg_llm.inference_precision.
 *
 * llm_param stays the float32 source of truth. What inference reads is derived from it: a copy
 * per precision (float32, bfloat16, int8, int4) in which every linear layer and the tied head are
 * packed for llm_gemv (gemv.h) and the vectors (biases, LayerNorm, wpe) stay float32. int4's
 * layers are 4-bit, its head int8 (see served.c). Each copy is one
 * more format of weights_cache.h, so each precision is its own shared copy per server, following
 * weights_version like the others. Training never sees these: it has its own float32 block.
 */
#ifndef PG_LLM_SERVED_H
#define PG_LLM_SERVED_H

#include "compute/compute.h"
#include "model/model.h"
#include "weights/cache.h"

/* pg_llm.inference_precision (served.c); the values are also the names of the copies' formats. */
typedef enum LlmPrecision
{
	LLM_PRECISION_FLOAT32,
	LLM_PRECISION_BFLOAT16,
	LLM_PRECISION_INT8,
	LLM_PRECISION_INT4
} LlmPrecision;

extern int	llm_inference_precision;

extern void llm_served_init(void);

/* "float32", "bfloat16", "int8", "int4"; the packed format of a kind (a linear layer, the head) in each. */
extern const char *llm_precision_name(LlmPrecision prec);
extern LlmWeightFormat llm_precision_format(LlmPrecision prec, LlmParamKind kind);

/* A precision by its name (ERROR with the valid names otherwise). */
extern LlmPrecision llm_precision_parse(const char *name);

/*
 * The cache format of cfg's weights in this precision. Its fill packs from `source`, cfg's float32
 * block (model.h's layout), when not NULL; else it reads the block from llm_param first
 * (llm_block_format) into private memory, freed once packed.
 */
extern void llm_served_format(const LlmConfig *cfg, LlmPrecision prec, const float *source, LlmWcFormat *fmt);

/* Points m (its cfg and layout set) at a copy made in that format. */
extern void llm_served_point(LlmModel *m, const LlmWcCopy *copy, LlmPrecision prec);

/* model.c: the float32 block of cfg's weights, filled from llm_param. */
extern void llm_block_format(const LlmConfig *cfg, LlmWcFormat *fmt);

#endif							/* PG_LLM_SERVED_H */
