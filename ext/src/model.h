/*
 * model.h: GPT-2 architecture, the tensor name table, and the backend's model with its weights.
 *
 * Parameters live in one contiguous float block, grouped by kind across layers as in llm.c
 * (all layers' ln_1 weights, then all ln_1 biases, ...), each tensor in Hugging Face orientation:
 * Conv1D weights are (in, out), so a linear layer is out = in @ W + b with row-major sgemm.
 *
 * Shapes: V = vocab, P = n_positions, L = n_layer, C = d_model.
 */
#ifndef PG_LLM_MODEL_H
#define PG_LLM_MODEL_H

#include "postgres.h"

#include "gemv.h"
#include "llm_limits.h"

typedef struct LlmConfig
{
	char		model[LLM_MODEL_NAME_MAX + 1];
	int			n_layer;		/* L */
	int			n_head;			/* NH */
	int			d_model;		/* C */
	int			n_positions;	/* P */
	int			vocab;			/* V */
	int64		weights_version;
	Oid			table_oid;		/* of llm_model_config: versions restart when the extension is re-created */
} LlmConfig;

/* Parameter kinds, in block order: LLM_WTE, LLM_WPE, LLM_LN1W, ... (see tensors.def for shapes). */
typedef enum LlmParamKind
{
#define LLM_TENSOR(kind, name, scope, rows, cols) LLM_##kind,
#include "tensors.def"
#undef LLM_TENSOR
	LLM_NUM_KINDS
} LlmParamKind;

/* Where each kind starts in the block, and the size of one layer's tensor of that kind. */
typedef struct LlmLayout
{
	size_t		offset[LLM_NUM_KINDS];	/* in floats */
	size_t		size[LLM_NUM_KINDS];	/* floats per tensor (per layer for layered kinds) */
	size_t		num_params;		/* total floats */
	int			num_tensors;	/* named tensors: 2 + 12 L + 2 */
} LlmLayout;

/* One named tensor as stored in llm_param. */
typedef struct LlmTensorInfo
{
	char		name[64];		/* e.g. "h.3.attn.c_attn.weight" */
	LlmParamKind kind;
	int			layer;			/* -1 for non-layered kinds */
	int			ndim;			/* 1 or 2 */
	int			shape[2];
	size_t		offset;			/* in floats, within the block */
	size_t		numel;
	bool		decay;			/* AdamW weight decay applies (2-D tensors, as nanoGPT) */
} LlmTensorInfo;

typedef struct LlmParams
{
	float	   *wte,
			   *wpe,
			   *ln1w,
			   *ln1b,
			   *qkvw,
			   *qkvb,
			   *attprojw,
			   *attprojb,
			   *ln2w,
			   *ln2b,
			   *fcw,
			   *fcb,
			   *fcprojw,
			   *fcprojb,
			   *lnfw,
			   *lnfb;
} LlmParams;

/* The linear layers and the tied head of a served model, packed for llm_gemv (see served.h). */
typedef struct LlmPacked
{
	LlmWeightFormat fmt[LLM_NUM_KINDS];	/* of each packed kind (served.c: the head may differ) */
	const uint8_t *w[LLM_NUM_KINDS];	/* layer 0's packed matrix of the kinds that are packed
										 * (LLM_WTE: the head, wte^T), NULL for the others */
	size_t		stride[LLM_NUM_KINDS];	/* bytes from one layer's packed matrix to the next */
} LlmPacked;

/*
 * A model with its weights: for training (llm_model_get_private) the whole float32 block; for
 * inference (llm_model_get) a served copy, whose matrices are in `packed` and whose float32
 * memory holds the vectors only (p.wte and the linear layers' weights are NULL there).
 */
typedef struct LlmModel
{
	LlmConfig	cfg;
	LlmLayout	layout;
	float	   *memory;			/* 64-byte aligned; read-only unless private */
	LlmParams	p;				/* pointers into memory */
	bool		served;
	int			precision;		/* served: the LlmPrecision (served.h) */
	LlmPacked	packed;			/* served only */
} LlmModel;

/* Layout and names (pure functions, no database access). */
extern void llm_layout_init(const LlmConfig *cfg, LlmLayout *layout);
extern void llm_tensor_info(const LlmConfig *cfg, const LlmLayout *layout, int index, LlmTensorInfo *info);
extern int	llm_tensor_find(const LlmConfig *cfg, const LlmLayout *layout, const char *name, LlmTensorInfo *info);
extern void llm_params_point(float *memory, const LlmLayout *layout, LlmParams *p);

/* Tensors of a kind: n_layer for the kinds of each layer, else 1. */
extern size_t llm_kind_tensors(const LlmConfig *cfg, LlmParamKind kind);

/* Checks a model name before it is used anywhere (length, no control characters). */
extern void llm_check_model_name(const char *model);

/* Reads the model's row of llm_model_config (caller connected to SPI); false when absent. */
extern bool llm_config_lookup(const char *model, LlmConfig *cfg, bool for_update);

/* Reads llm_model_config; ERROR (undefined object) when the model is unknown. Uses SPI. */
extern void llm_config_load(const char *model, LlmConfig *cfg);

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

#endif							/* PG_LLM_MODEL_H */
