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

#include "fmgr.h"

#include "compute/compute.h"
#include "base/base.h"

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
#include "model/tensors.def"
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

/*
 * The GPT-2 block (block.c), the one definition that training, evaluation, the prompt pass and the
 * decode step all run: pre-LayerNorm attention and MLP, each added to the residual stream,
 *
 *   ln1 = LN(x_in); qkv = ln1 @ c_attn + b; att = attention(qkv)
 *   x_mid = x_in + dropout(att @ attn.c_proj + b)
 *   ln2 = LN(x_mid); fch_gelu = GELU(ln2 @ c_fc + b)
 *   x_out = x_mid + dropout(fch_gelu @ mlp.c_proj + b)
 *
 * over R rows of C channels. What differs between its callers is passed in: how a linear layer's
 * product is computed (sgemm on the float32 block, or llm_gemv on packed weights), what attention
 * is (causal over whole sequences, or over a key/value cache), where the activations go (kept per
 * layer for a backward pass, or one set reused), and whether dropout applies.
 */
typedef struct LlmBlockOps
{
	/*
	 * out (R, OC) = inp (R, IC) @ W + bias, W layer l's weights of this kind; with accumulate,
	 * out += that (the residual stream, when the caller keeps no separate projection).
	 */
	void		(*linear) (void *ctx, LlmParamKind weight, int l, float *out, const float *inp,
						   const float *bias, size_t R, size_t IC, size_t OC, bool accumulate);

	/*
	 * out (R, C) = the causal self-attention of layer l over qkv (R, 3C). Returns the rows that go
	 * on past it (R, or fewer when only some rows' outputs are wanted; those rows are then moved
	 * to the front of x and out).
	 */
	size_t		(*attention) (void *ctx, int l, float *out, const float *qkv, size_t R);

	/* x (N) <- dropout at layer l's site (1: after attention, 2: after the MLP); NULL: none. */
	void		(*dropout) (void *ctx, int l, int site, float *x, size_t N);

	/*
	 * After each product: out (R, OC) += the low-rank update of the rows' LoRA adapters for this
	 * kind of layer l, from the product's input inp (R, IC) (model/lora.h); NULL: no adapters.
	 */
	void		(*adapt) (void *ctx, LlmParamKind weight, int l, float *out, const float *inp, size_t R,
						  size_t IC, size_t OC);
} LlmBlockOps;

/*
 * Where layer l's activations go (R rows of each). x_in, x_mid and x_out may be one buffer (the
 * residual stream updated in place); the LayerNorm statistics are kept when not NULL; fch and
 * fch_gelu may be one buffer. proj: scratch (R, C) for each projection before it is added to the
 * residual stream; NULL adds it in place (linear with accumulate).
 */
typedef struct LlmBlockActs
{
	const float *x_in;			/* (R, C) */
	float	   *x_mid,			/* (R, C) */
			   *x_out;			/* (R, C) */
	float	   *ln1,			/* (R, C) */
			   *ln1_mean,		/* (R) or NULL */
			   *ln1_rstd;		/* (R) or NULL */
	float	   *qkv;			/* (R, 3C) */
	float	   *att;			/* (R, C) */
	float	   *ln2,			/* (R, C) */
			   *ln2_mean,		/* (R) or NULL */
			   *ln2_rstd;		/* (R) or NULL */
	float	   *fch,			/* (R, 4C) before GELU */
			   *fch_gelu;		/* (R, 4C) after */
	float	   *proj;			/* (R, C) or NULL */
} LlmBlockActs;

/* Layer l of the model whose vectors (biases, LayerNorm) are p, over R rows; returns the rows out. */
extern size_t llm_block_forward(const LlmBlockOps *ops, void *ctx, const LlmParams *p, const LlmLayout *layout,
								int l, const LlmBlockActs *a, size_t R);

/* Layout and names (pure functions, no database access). */
extern void llm_layout_init(const LlmConfig *cfg, LlmLayout *layout);
extern void llm_tensor_info(const LlmConfig *cfg, const LlmLayout *layout, int index, LlmTensorInfo *info);
extern int	llm_tensor_find(const LlmConfig *cfg, const LlmLayout *layout, const char *name, LlmTensorInfo *info);
extern void llm_params_point(float *memory, const LlmLayout *layout, LlmParams *p);

/* Tensors of a kind: n_layer for the kinds of each layer, else 1. */
extern size_t llm_kind_tensors(const LlmConfig *cfg, LlmParamKind kind);
/* A kind's name in tensors.def ("attn.c_attn.weight"), and one tensor's shape (returns ndim). */
extern const char *llm_kind_name(LlmParamKind kind);
extern int	llm_kind_shape(const LlmConfig *cfg, LlmParamKind kind, int shape[2]);

/*
 * A LoRA adapter of a model (lora.c), PEFT's LoRA on the block's products: for each target kind
 * (LLM_QKVW, LLM_ATTPROJW, LLM_FCW, LLM_FCPROJW) and layer l, A (rank, IC) and B (OC, rank) in
 * PEFT's orientation (h.{l}.attn.c_attn.lora_A, ...lora_B: lora_A.weight and lora_B.weight), and
 * the product inp (R, IC) @ W gains scale * (dropout(inp) @ A^T) @ B^T, scale = alpha / rank.
 * One block holds, for each target in kind order, A of every layer, then B of every layer.
 */
typedef struct LlmLora
{
	char		name[LLM_MODEL_NAME_MAX + 1];
	char		model[LLM_MODEL_NAME_MAX + 1];	/* its base */
	int			rank;
	float		alpha,
				scale,
				dropout;		/* on the adapter's input, in training */
	bool		target[LLM_NUM_KINDS];
	size_t		a_offset[LLM_NUM_KINDS],	/* layer 0's A and B in the block; layer l's at l * size */
				b_offset[LLM_NUM_KINDS],
				a_size[LLM_NUM_KINDS],
				b_size[LLM_NUM_KINDS];
	int			in[LLM_NUM_KINDS],	/* IC and OC of each target's product */
				out[LLM_NUM_KINDS];
	int			n_layer;
	int			num_tensors;
	size_t		numel;
	float	   *memory;
	int64		step;			/* optimizer steps taken, and the position in its dataset */
	int64		data_pos;
} LlmLora;

static inline const float *
llm_lora_a(const LlmLora *lora, LlmParamKind kind, int l)
{
	return lora->memory + lora->a_offset[kind] + (size_t) l * lora->a_size[kind];
}

static inline const float *
llm_lora_b(const LlmLora *lora, LlmParamKind kind, int l)
{
	return lora->memory + lora->b_offset[kind] + (size_t) l * lora->b_size[kind];
}

/*
 * The adapter's row of llm_adapter and its tensors of llm_adapter_param, read with the caller's
 * rights (caller connected to SPI; read_only as llm_tensor_rows_scan's). The base must be `cfg`'s
 * model. Allocated in the memory context current at the call (not SPI's). m and v, when not NULL,
 * receive a block each (numel) with the AdamW moments (zero where the table has none).
 */
extern LlmLora *llm_lora_load(const char *adapter, const LlmConfig *cfg, bool read_only, float **m, float **v);

/*
 * For serving: the adapter of the model cfg, read with the caller's rights (read-only, under the
 * statement's snapshot), allocated in CurrentMemoryContext; NULL for NULL.
 */
extern const LlmLora *llm_lora_get(const char *adapter, const LlmConfig *cfg);
/*
 * Argument argno of a function, the adapter's name: NULL when it is NULL or the function's
 * declaration (an older version's) has no such argument.
 */
extern char *llm_lora_name_arg(FunctionCallInfo fcinfo, int argno);

/* Whether an adapter's description (read from a file) is one that its rank and targets give for cfg. */
extern bool llm_lora_fits(const LlmLora *lora, const LlmConfig *cfg);

/* Tensor `index` of the adapter: name, shape, offset, numel (kind and layer of the product). */
extern void llm_lora_tensor(const LlmLora *lora, int index, LlmTensorInfo *info);

/*
 * A model's tensors as rows (tensor_rows.c): of llm_param, llm_optim_state, llm_checkpoint_tensor or
 * a checkpoint file. Each row's name is matched to the tensor of that name in the layout, each
 * tensor is taken once, and the caller learns which never came.
 */
typedef struct LlmTensorRows
{
	LlmConfig	cfg;
	LlmLayout	layout;
	bool	   *seen;			/* (num_tensors) palloc'd */
	int			n_seen;
} LlmTensorRows;

extern void llm_tensor_rows_begin(LlmTensorRows *rows, const LlmConfig *cfg);

/* The index of the tensor named `name` (info filled), or -1 when the architecture has none. */
extern int	llm_tensor_rows_find(LlmTensorRows *rows, const char *name, LlmTensorInfo *info);

/* Tensor `index` came: ERROR data_exception when it came already ("appears twice"). */
extern void llm_tensor_rows_take(LlmTensorRows *rows, int index);

/* The first tensor from `from` on that no row gave (info filled), or -1 when every one came. */
extern int	llm_tensor_rows_missing(const LlmTensorRows *rows, int from, LlmTensorInfo *info);

/*
 * Runs `sql` (its $1 the key, of type key_type: the model's name, a checkpoint's id; its first
 * column a tensor's name) through a cursor, a few rows at a time, and calls fn for each row: index
 * is the tensor (taken), or -1 for a name the architecture does not have. The caller is connected
 * to SPI. read_only: under the current snapshot (as the statement sees the tables), else after
 * this transaction's own latest writes (SPI's new snapshot).
 */
typedef void (*LlmTensorRowFn) (void *arg, HeapTuple tuple, TupleDesc desc, const char *name, int index,
								const LlmTensorInfo *info);
extern void llm_tensor_rows_scan(LlmTensorRows *rows, const char *sql, Oid key_type, Datum key,
								 bool read_only, LlmTensorRowFn fn, void *arg);

/*
 * Reads the model's row of llm_model_config (caller connected to SPI); false when absent. Locked
 * until the end of the transaction: FOR_CHANGE against a drop, a rename, a change of shape or of
 * the weights by another session; FOR_SHARE against those and against any change of the row
 * (a write of the weights bumps its weights_version): the base of an adapter in training.
 */
typedef enum LlmConfigLock
{
	LLM_CONFIG_NO_LOCK,
	LLM_CONFIG_FOR_CHANGE,
	LLM_CONFIG_FOR_SHARE
} LlmConfigLock;
extern bool llm_config_lookup(const char *model, LlmConfig *cfg, LlmConfigLock lock);

/* Reads llm_model_config; ERROR (undefined object) when the model is unknown. Uses SPI. */
extern void llm_config_load(const char *model, LlmConfig *cfg);

#endif							/* PG_LLM_MODEL_H */
