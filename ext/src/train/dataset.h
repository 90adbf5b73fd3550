/*
 * dataset.h: reading training blocks from llm_dataset (dataset.c).
 *
 * Rows of one named dataset are fixed-length blocks (tokens, target = tokens shifted by one), read in id order; the
 * block size is the first row's length, and every row read must match it.
 */
#ifndef PG_LLM_DATASET_H
#define PG_LLM_DATASET_H

#include "postgres.h"

#include "executor/spi.h"
#include "model/model.h"

typedef struct LlmDataset
{
	char	   *name;			/* the dataset */
	int64	   *ids;			/* row ids in id order */
	int64		n;
	int			T;				/* tokens per row */
	SPIPlanPtr	fetch;			/* SELECT tokens, target ... WHERE id = $1 */
} LlmDataset;

/*
 * The row ids of one dataset (the first max_rows of them; all when max_rows <= 0) and its block
 * size, checked against the model's positions (caller connected to SPI; reads only).
 */
extern void llm_dataset_open(LlmDataset *ds, const LlmConfig *cfg, const char *dataset, int64 max_rows);

/*
 * Rows pos .. pos+B-1 (mod n, in id order) into inputs and targets, each (B,T), every id checked
 * against the model's vocabulary V.
 */
extern void llm_dataset_batch(LlmDataset *ds, int64 pos, int B, int V, int32 *inputs, int32 *targets);

#endif							/* PG_LLM_DATASET_H */
