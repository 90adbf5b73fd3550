/*
 * train_lock.h: one trainer per model at a time (train_lock.c).
 */
#ifndef PG_LLM_TRAIN_LOCK_H
#define PG_LLM_TRAIN_LOCK_H

/* Wait for, then hold until the end of the transaction, the model's training lock. */
extern void llm_train_lock_xact(const char *model);
/* The same for an adapter: one trainer per adapter, adapters of one base side by side. */
extern void llm_train_lock_adapter_xact(const char *adapter);

#endif							/* PG_LLM_TRAIN_LOCK_H */
