/*
 * weights.h: the weights the engine computes with, as the rest of pg_llm sees them.
 *
 * llm_param is the float32 source of truth; what training and inference compute with are copies
 * derived from it (models.c): the server's shared read-only copy per precision (cache.c: one file
 * per database, model, weights_version and format, mapped by every backend; served.c: the formats
 * of each precision), or a backend's private one, and the float32 block training writes into.
 * Every copy follows llm_model_config.weights_version (version.c), and every call that serves a
 * model checks that its caller may read the weights it computes with (rights.c).
 */
#ifndef PG_LLM_WEIGHTS_H
#define PG_LLM_WEIGHTS_H

#include "model/model.h"
#include "weights/cache.h"
#include "weights/served.h"

/*
 * The model for inference, in the precision of pg_llm.inference_precision (a served copy, see
 * served.h), derived from llm_param on first use and kept until the model's weights_version or
 * the precision changes (one indexed lookup per call): the server's shared read-only copy
 * (weights_cache.h; pg_llm.shared_weights), else a private one. ERROR when a tensor is missing or
 * has the wrong size. The returned model stays valid until the next llm_model_get* call. Never
 * write into its memory: it may be mapped read-only.
 */
extern LlmModel *llm_model_get(const char *model);

/*
 * The file of the server's shared copy that m (from llm_model_get) is mapped from; NULL when m is a
 * private copy (pg_llm.shared_weights off, weights this transaction changed, sharing failed).
 */
extern const char *llm_model_shared_path(const LlmModel *m);

/*
 * For the batch runner, a process without a database: the served model of cfg in this precision,
 * mapped from the shared copy that a backend of `database` made; NULL when there is none. It stays
 * mapped until the process exits.
 */
extern LlmModel *llm_model_map_shared(Oid database, const LlmConfig *cfg, int precision);

/*
 * The float32 block (model.h's layout) to compute on without writing into it (llm_embed,
 * llm_perplexity, llm_eval): the server's shared copy, as llm_model_get's (same rules, format
 * "block" in pg_llm_weight_cache()), or the training block of this backend when it is current.
 * Valid until the next llm_model_get* call.
 */
extern LlmModel *llm_model_get_block(const char *model);

/* The float32 block in private memory that the caller may write into (training). */
extern LlmModel *llm_model_get_private(const char *model);

/* Drop the backend's models (frees or unmaps their weights). */
extern void llm_model_forget(void);

/*
 * After this backend itself wrote new weights into the model of llm_model_get_private (training),
 * record the version it now sees so that the next llm_model_get does not reload what it holds.
 */
extern void llm_model_set_version(LlmModel *m, int64 version);

/* ---- rights.c: who may read a model's weights ---------------------------------------------- */

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

#endif							/* PG_LLM_WEIGHTS_H */
