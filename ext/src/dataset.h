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
#include "model.h"

typedef struct LlmDataset
{
	char	   *name;			/* the dataset */
	int64	   *ids;			/* row ids in id order */
	int64		n;
	int			T;				/* tokens per row */
	SPIPlanPtr	fetch;			/* SELECT tokens, target ... WHERE id = $1 */
} LlmDataset;

/* Defines pg_llm.check_dataset_tokenizer (from _PG_init). */
extern void llm_dataset_init(void);

/*
 * Refuses, with the rule of the SQL function llm_dataset_check_tokenizer, a model whose tokenizer
 * is not the one the dataset's rows were made with: for training and evaluating (unless
 * pg_llm.check_dataset_tokenizer is off), or for adding rows made with the model's tokenizer
 * (caller connected to SPI).
 */
extern void llm_dataset_check_tokenizer(const char *dataset, const char *model, bool for_training);

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
