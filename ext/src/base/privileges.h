/*
 * privileges.h: what a role may do with pg_llm's models (privileges.c).
 */
#ifndef PG_LLM_PRIVILEGES_H
#define PG_LLM_PRIVILEGES_H

#include "model/model.h"

extern void llm_privileges_init(void);

/*
 * Whether the current user could read every tensor of cfg's model from llm_param: SELECT on the
 * table (or on the columns model, name, shape, data) and, where row-level security applies to it,
 * every tensor row visible. With `error`, raise the error PostgreSQL would (insufficient
 * privilege) instead of returning false. Serving calls it on every call: its weights are a copy.
 */
extern bool llm_may_read_weights(const LlmConfig *cfg, bool error);

/*
 * Whether the current user may see that the model exists and read its weights (for listings):
 * SELECT on llm_model_config with its row visible, and llm_may_read_weights. Never raises.
 */
extern bool llm_may_see_model(const char *model);

/* ERROR unless the current user may write models' weights (UPDATE on llm_param), as the write would. */
extern void llm_check_may_train(const char *model);

/*
 * ERROR unless the trigger of fcinfo fires on pg_llm's table `table`: a trigger function of the
 * extension reads that table's columns by position, and must never run anywhere else.
 */
extern void llm_check_trigger_table(FunctionCallInfo fcinfo, const char *function, const char *table);

#endif							/* PG_LLM_PRIVILEGES_H */
