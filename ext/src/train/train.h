/*
 * train.h: training and evaluation, as the rest of pg_llm sees them: reading a dataset's blocks
 * (dataset.h), the forward pass of training and evaluation with its losses (eval.h), and one
 * trainer per model (lock.h). llm_train itself (train.c) and llm_dataset_build are SQL functions.
 */
#ifndef PG_LLM_TRAIN_H
#define PG_LLM_TRAIN_H

#include "train/dataset.h"
#include "train/eval.h"
#include "train/lock.h"

#endif							/* PG_LLM_TRAIN_H */
