/*
 * model.c: GPT-2 tensor names and layout, llm_model_config, and the backend's model (its weights
 * from weights_cache.c: the server's shared copy, or a private one).
 */
#include "pg_llm.h"
#include "model.h"
#include "privileges.h"
#include "served.h"
#include "weights_cache.h"

#include <ctype.h>
#include <stdlib.h>

#include "access/detoast.h"
#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

/* Names and scopes of the kinds (tensors.def). */
static const struct
{
	const char *name;
	bool		layered;
}			kinds[] = {
#define LLM_TENSOR(kind, name, scope, rows, cols) [LLM_##kind] = {name, LLM_SCOPE_##scope},
#define LLM_SCOPE_MODEL false
#define LLM_SCOPE_LAYER true
#include "tensors.def"
#undef LLM_TENSOR
};

/* GPT-2's state dict: wte, wpe, then each layer's tensors (consecutive kinds), then ln_f. */
#define FIRST_LAYER_KIND LLM_LN1W
#define LAYER_TENSORS (LLM_FCPROJB - LLM_LN1W + 1)

static bool
kind_is_layered(LlmParamKind kind)
{
	return kinds[kind].layered;
}

/* The shape of one tensor of this kind (one layer's, for layered kinds), as tensors.def says. */
static int
kind_shape(const LlmConfig *cfg, LlmParamKind kind, int shape[2])
{
	int			V = cfg->vocab,
				P = cfg->n_positions,
				C = cfg->d_model;

	switch (kind)
	{
#define LLM_TENSOR(kind, name, scope, rows, cols) \
		case LLM_##kind: shape[0] = (rows); shape[1] = (cols); return (cols) != 0 ? 2 : 1;
#include "tensors.def"
#undef LLM_TENSOR
		default:
			elog(ERROR, "unknown tensor kind %d", (int) kind);
	}
}

void
llm_layout_init(const LlmConfig *cfg, LlmLayout *layout)
{
	size_t		offset = 0;

	for (int k = 0; k < LLM_NUM_KINDS; k++)
	{
		int			shape[2];
		int			ndim = kind_shape(cfg, (LlmParamKind) k, shape);
		size_t		n = (size_t) shape[0] * (ndim == 2 ? (size_t) shape[1] : 1);

		layout->offset[k] = offset;
		layout->size[k] = n;
		offset += n * (kind_is_layered((LlmParamKind) k) ? (size_t) cfg->n_layer : 1);
	}
	layout->num_params = offset;
	layout->num_tensors = 4 + LAYER_TENSORS * cfg->n_layer;
}

static void
fill_info(const LlmConfig *cfg, const LlmLayout *layout, LlmParamKind kind, int layer,
		  const char *name, LlmTensorInfo *info)
{
	strlcpy(info->name, name, sizeof(info->name));
	info->kind = kind;
	info->layer = layer;
	info->ndim = kind_shape(cfg, kind, info->shape);
	info->numel = layout->size[kind];
	info->offset = layout->offset[kind] + (layer >= 0 ? (size_t) layer * layout->size[kind] : 0);
	info->decay = (info->ndim == 2);
}

/* Tensors in state-dict order: wte, wpe, h.0.*, ..., h.{L-1}.*, ln_f.weight, ln_f.bias. */
void
llm_tensor_info(const LlmConfig *cfg, const LlmLayout *layout, int index, LlmTensorInfo *info)
{
	char		name[64];
	int			n_layered = LAYER_TENSORS * cfg->n_layer;

	Assert(index >= 0 && index < layout->num_tensors);
	if (index < 2)
		fill_info(cfg, layout, (LlmParamKind) index, -1, kinds[index].name, info);
	else if (index - 2 < n_layered)
	{
		int			layer = (index - 2) / LAYER_TENSORS;
		LlmParamKind kind = FIRST_LAYER_KIND + (index - 2) % LAYER_TENSORS;

		snprintf(name, sizeof(name), "h.%d.%s", layer, kinds[kind].name);
		fill_info(cfg, layout, kind, layer, name, info);
	}
	else
	{
		LlmParamKind kind = LLM_LNFW + (index - 2 - n_layered);

		fill_info(cfg, layout, kind, -1, kinds[kind].name, info);
	}
}

/* Index of the tensor with this name, or -1. */
int
llm_tensor_find(const LlmConfig *cfg, const LlmLayout *layout, const char *name, LlmTensorInfo *info)
{
	if (strncmp(name, "h.", 2) == 0)
	{
		char	   *end;
		long		layer;

		if (!isdigit((unsigned char) name[2]))
			return -1;
		layer = strtol(name + 2, &end, 10);
		/* no leading zeros, so that each tensor has exactly one name */
		if (*end != '.' || layer < 0 || layer >= cfg->n_layer || (name[2] == '0' && end != name + 3))
			return -1;
		for (int t = 0; t < LAYER_TENSORS; t++)
		{
			if (strcmp(end + 1, kinds[FIRST_LAYER_KIND + t].name) == 0)
			{
				int			index = 2 + (int) layer * LAYER_TENSORS + t;

				llm_tensor_info(cfg, layout, index, info);
				return index;
			}
		}
		return -1;
	}
	for (int index = 0; index < layout->num_tensors; index += (index == 1 ? LAYER_TENSORS * cfg->n_layer + 1 : 1))
	{
		llm_tensor_info(cfg, layout, index, info);
		if (strcmp(info->name, name) == 0)
			return index;
	}
	return -1;
}

void
llm_params_point(float *memory, const LlmLayout *layout, LlmParams *p)
{
	float	  **slots[LLM_NUM_KINDS] = {
		&p->wte, &p->wpe, &p->ln1w, &p->ln1b, &p->qkvw, &p->qkvb, &p->attprojw, &p->attprojb,
		&p->ln2w, &p->ln2b, &p->fcw, &p->fcb, &p->fcprojw, &p->fcprojb, &p->lnfw, &p->lnfb,
	};

	for (int k = 0; k < LLM_NUM_KINDS; k++)
		*slots[k] = memory + layout->offset[k];
}

size_t
llm_kind_tensors(const LlmConfig *cfg, LlmParamKind kind)
{
	return kind_is_layered(kind) ? (size_t) cfg->n_layer : 1;
}

void
llm_check_model_name(const char *model)
{
	size_t		len = strlen(model);

	if (len == 0 || len > LLM_MODEL_NAME_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("model name must have 1 to %d bytes", LLM_MODEL_NAME_MAX)));
	for (size_t i = 0; i < len; i++)
		if ((unsigned char) model[i] < 0x20 || model[i] == 0x7f)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("model name must not contain control characters")));
}

/* The model's row of llm_model_config (locked when for_update, against a drop, a rename or a
 * change of shape; FOR NO KEY UPDATE: a FOR UPDATE lock would wait for every open transaction
 * that inserted a row referencing the model, such as an uncommitted llm_train_log row); false
 * when there is none.
 * The caller is connected to SPI. */
bool
llm_config_lookup(const char *model, LlmConfig *cfg, bool for_update)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	TupleDesc	desc;
	HeapTuple	tuple;
	bool		isnull;

	llm_check_model_name(model);
	values[0] = CStringGetTextDatum(model);
	if (llm_spi_run("reading llm_model_config",
					psprintf("SELECT n_layer, n_head, d_model, n_positions, vocab, weights_version, tableoid "
							 "FROM %s WHERE model = $1%s", llm_table("llm_model_config"),
							 for_update ? " FOR NO KEY UPDATE" : ""),
					1, argtypes, values, !for_update, 1, SPI_OK_SELECT) == 0)
		return false;
	desc = SPI_tuptable->tupdesc;
	tuple = SPI_tuptable->vals[0];
	memset(cfg, 0, sizeof(*cfg));
	strlcpy(cfg->model, model, sizeof(cfg->model));
	cfg->n_layer = DatumGetInt32(SPI_getbinval(tuple, desc, 1, &isnull));
	cfg->n_head = DatumGetInt32(SPI_getbinval(tuple, desc, 2, &isnull));
	cfg->d_model = DatumGetInt32(SPI_getbinval(tuple, desc, 3, &isnull));
	cfg->n_positions = DatumGetInt32(SPI_getbinval(tuple, desc, 4, &isnull));
	cfg->vocab = DatumGetInt32(SPI_getbinval(tuple, desc, 5, &isnull));
	cfg->weights_version = DatumGetInt64(SPI_getbinval(tuple, desc, 6, &isnull));
	cfg->table_oid = DatumGetObjectId(SPI_getbinval(tuple, desc, 7, &isnull));
	return true;
}

void
llm_config_load(const char *model, LlmConfig *cfg)
{
	bool		found;

	SPI_connect();
	found = llm_config_lookup(model, cfg, false);
	SPI_finish();
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" does not exist", model),
				 errhint("Register it with pgllm import or pgllm init, or insert a row into llm_model_config.")));
}

/* ---- the weight cache ---------------------------------------------------------------------- */

/*
 * The backend keeps three models, each a copy from weights_cache.c: the one inference reads (a
 * served copy in the session's precision), the float32 block that measuring reads (llm_embed,
 * llm_perplexity, llm_eval: the training forward pass), both the server's shared read-only copy
 * when pg_llm.shared_weights is on, else private memory for one of the reasons below, and the
 * float32 block training writes into. A backend that trains and then serves has two; building the
 * served copy then packs from the trained block instead of reading the tables again, and measuring
 * reads the trained block itself. Shared copies are what let a parallel worker, a new process for
 * every query, compute at once: it maps the copy instead of reading every tensor from the tables.
 */
typedef enum CopyKind
{
	COPY_SHARED,
	COPY_OFF,					/* pg_llm.shared_weights = off */
	COPY_XACT,					/* weights this transaction changed: not to be seen by others */
	COPY_FALLBACK,				/* sharing failed (no room, an I/O error): said in a WARNING */
	COPY_TRAIN,					/* training writes into it (llm_model_get_private) */
} CopyKind;

typedef struct Slot
{
	bool		block;			/* the float32 block (model.h's layout), else a served copy */
	LlmModel   *model;
	LlmWcCopy  *copy;
	CopyKind	kind;
	TransactionId xmin;			/* of the llm_model_config row a COPY_XACT copy was made for */
} Slot;

static Slot serving;
static Slot measuring = {.block = true};
static Slot training = {.block = true};

static void
forget(Slot *slot)
{
	if (slot->model != NULL)
	{
		llm_wc_release(slot->copy);
		free(slot->model);
		slot->model = NULL;
		slot->copy = NULL;
	}
}

void
llm_model_forget(void)
{
	forget(&serving);
	forget(&measuring);
	forget(&training);
}

void
llm_model_set_version(LlmModel *m, int64 version)
{
	if (m != training.model)
		elog(ERROR, "llm_model_set_version needs the copy of llm_model_get_private");
	m->cfg.weights_version = version;
}

static bool
same_architecture(const LlmConfig *a, const LlmConfig *b)
{
	return strcmp(a->model, b->model) == 0 && a->n_layer == b->n_layer && a->n_head == b->n_head &&
		a->d_model == b->d_model && a->n_positions == b->n_positions && a->vocab == b->vocab;
}

static void
check_shape(const LlmTensorInfo *info, ArrayType *shape)
{
	int			n = ARR_NDIM(shape) == 1 ? ARR_DIMS(shape)[0] : -1;
	int32	   *dims = (int32 *) ARR_DATA_PTR(shape);
	bool		ok = (n == info->ndim) && !ARR_HASNULL(shape) && ARR_ELEMTYPE(shape) == INT4OID;

	for (int i = 0; ok && i < n; i++)
		ok = dims[i] == info->shape[i];
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("tensor \"%s\" has the wrong shape in llm_param", info->name),
				 info->ndim == 2 ? errdetail("Expected {%d,%d}.", info->shape[0], info->shape[1])
				 : errdetail("Expected {%d}.", info->shape[0]),
				 errhint("Re-import the model's weights.")));
}

#define LOAD_SLICE_BYTES ((size_t) 8 << 20)

/* Writes every tensor of the model from llm_param into section 0 of a copy (num_params floats). */
static void
load_weights(const LlmConfig *cfg, const LlmLayout *layout, LlmWcWriter *w)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(cfg->model)};
	bool	   *seen = palloc0(layout->num_tensors * sizeof(bool));
	Portal		portal;

	SPI_connect();
	portal = SPI_cursor_open_with_args(NULL,
									   psprintf("SELECT name, shape, data FROM %s WHERE model = $1",
												llm_table("llm_param")),
									   1, argtypes, values, NULL, true, CURSOR_OPT_NO_SCROLL);
	for (;;)
	{
		SPI_cursor_fetch(portal, true, 16);
		if (SPI_processed == 0)
			break;
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			HeapTuple	tuple = SPI_tuptable->vals[r];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			bool		isnull;
			char	   *name = TextDatumGetCString(SPI_getbinval(tuple, desc, 1, &isnull));
			LlmTensorInfo info;
			int			index = llm_tensor_find(cfg, layout, name, &info);
			Datum		datum;
			size_t		bytes;

			CHECK_FOR_INTERRUPTS();
			if (index < 0)
				continue;		/* not a parameter of this architecture: ignored */
			check_shape(&info, DatumGetArrayTypeP(SPI_getbinval(tuple, desc, 2, &isnull)));
			datum = SPI_getbinval(tuple, desc, 3, &isnull);
			bytes = toast_raw_datum_size(datum) - VARHDRSZ;
			if (bytes != info.numel * sizeof(float))
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("tensor \"%s\" has %zu bytes in llm_param, expected %zu",
								name, bytes, info.numel * sizeof(float)),
						 errhint("Re-import the model's weights.")));

			/*
			 * Copied in slices, each fetched from TOAST on its own: a whole tensor (wte is 150 MB
			 * in GPT-2 small) is never held twice, so loading needs little more than the weights.
			 */
			for (size_t off = 0; off < bytes; off += LOAD_SLICE_BYTES)
			{
				size_t		len = Min(LOAD_SLICE_BYTES, bytes - off);
				bytea	   *slice = DatumGetByteaPSlice(datum, (int32) off, (int32) len);

				llm_wc_write(w, 0, info.offset * sizeof(float) + off, VARDATA(slice), len);
				pfree(slice);
			}
			seen[index] = true;
			pfree(name);
		}
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);
	SPI_finish();

	for (int i = 0; i < layout->num_tensors; i++)
	{
		if (!seen[i])
		{
			LlmTensorInfo info;

			llm_tensor_info(cfg, layout, i, &info);
			ereport(ERROR,
					(errcode(ERRCODE_NO_DATA_FOUND),
					 errmsg("model \"%s\" has no weights for tensor \"%s\"", cfg->model, info.name),
					 errhint("Load weights with pgllm import (or pg_llm_import_npz), or create them with pgllm init.")));
		}
	}
	pfree(seen);
}

static void
fill_from_tables(const LlmConfig *cfg, LlmWcWriter *w, void *arg)
{
	LlmLayout	layout;

	llm_layout_init(cfg, &layout);
	load_weights(cfg, &layout, w);
}

void
llm_block_format(const LlmConfig *cfg, LlmWcFormat *fmt)
{
	LlmLayout	layout;

	llm_layout_init(cfg, &layout);
	memset(fmt, 0, sizeof(*fmt));
	fmt->name = "block";
	fmt->layout = LLM_WC_LAYOUT_BLOCK;
	fmt->precision = LLM_WC_FLOAT32;
	fmt->n_sections = 1;
	fmt->section_id[0] = LLM_WC_SECTION_PARAMS;
	fmt->section_bytes[0] = layout.num_params * sizeof(float);
	fmt->fill = fill_from_tables;
}

/* The xmin of the model's llm_model_config row: this transaction's when it changed the weights. */
static TransactionId
config_xmin(const char *model)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(model)};
	TransactionId xmin = InvalidTransactionId;
	bool		isnull;

	SPI_connect();
	if (SPI_execute_with_args(psprintf("SELECT xmin FROM %s WHERE model = $1", llm_table("llm_model_config")),
							  1, argtypes, values, NULL, true, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			xmin = DatumGetTransactionId(d);
	}
	SPI_finish();
	return xmin;
}

static bool
is_current(const Slot *slot, const LlmConfig *cfg)
{
	const LlmModel *m = slot->model;

	return m != NULL && same_architecture(&m->cfg, cfg) &&
		m->cfg.weights_version == cfg->weights_version && m->cfg.table_oid == cfg->table_oid;
}

/* Replaces the slot's model by a new copy of cfg's weights in this format. */
static LlmModel *
load_model(Slot *slot, const LlmConfig *cfg, CopyKind kind, const LlmWcFormat *fmt, int precision)
{
	static const char *const kinds[] = {"the shared copy", "a private copy (pg_llm.shared_weights = off)",
		"a private copy (weights changed by this transaction)", "a private copy", "a private copy for training"};
	TimestampTz start = GetCurrentTimestamp();
	LlmModel   *m = calloc(1, sizeof(LlmModel));
	LlmWcCopy  *copy;

	if (m == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	m->cfg = *cfg;
	llm_layout_init(cfg, &m->layout);
	forget(slot);				/* first: two copies at once could exhaust memory */
	PG_TRY();
	{
		copy = llm_wc_get(cfg, fmt, kind == COPY_SHARED);
	}
	PG_CATCH();
	{
		free(m);
		PG_RE_THROW();
	}
	PG_END_TRY();
	if (slot->block)
	{
		m->memory = (float *) copy->section[0];
		llm_params_point(m->memory, &m->layout, &m->p);
	}
	else
		llm_served_point(m, copy, (LlmPrecision) precision);
	slot->model = m;
	slot->copy = copy;
	slot->kind = (kind == COPY_SHARED && !copy->shared) ? COPY_FALLBACK : kind;
	ereport(DEBUG1,
			(errmsg_internal("pg_llm: model \"%s\" (weights_version " INT64_FORMAT ", %s) from %s in %.1f ms",
							 cfg->model, cfg->weights_version, fmt->name, kinds[slot->kind],
							 (GetCurrentTimestamp() - start) / 1000.0),
			 errhidestmt(true)));
	return m;
}

/* The slot's copy of cfg (a served one in this precision, or the float32 block), of this kind. */
static LlmModel *
load_read_only(Slot *slot, const LlmConfig *cfg, CopyKind kind, LlmPrecision prec)
{
	LlmWcFormat fmt;

	if (slot->block)
		llm_block_format(cfg, &fmt);
	else				/* packed from the block training holds when it is current: faster than the tables */
		llm_served_format(cfg, prec, is_current(&training, cfg) ? training.model->memory : NULL, &fmt);
	return load_model(slot, cfg, kind, &fmt, prec);
}

/*
 * The read-only model of a slot, serving's (in this precision) or measuring's: the shared copy
 * unless this transaction changed the weights or pg_llm.shared_weights is off.
 */
static LlmModel *
model_get_read_only(Slot *slot, const char *model, LlmPrecision prec)
{
	LlmConfig	cfg;
	LlmModel   *m;
	TransactionId xmin;
	bool		reuse = false;

	llm_config_load(model, &cfg);
	llm_may_read_weights(&cfg, true);	/* every call: the copy may be another role's */
	if (slot->block && is_current(&training, &cfg))
		return training.model;	/* the same float32 weights, already in memory */
	if (is_current(slot, &cfg) && (slot->block || slot->model->precision == (int) prec))
	{
		switch (slot->kind)
		{
			case COPY_SHARED:
				reuse = llm_shared_weights;
				break;
			case COPY_OFF:
				reuse = !llm_shared_weights;
				break;
			case COPY_XACT:
				reuse = TransactionIdIsCurrentTransactionId(slot->xmin);
				break;
			case COPY_FALLBACK:
				reuse = true;
				break;
			case COPY_TRAIN:	/* training's slot only */
				break;
		}
	}
	if (reuse)
		return slot->model;
	if (!llm_shared_weights)
		return load_read_only(slot, &cfg, COPY_OFF, prec);

	/* weights this transaction wrote are not committed: no other may see them, nor a file */
	xmin = config_xmin(model);
	if (!TransactionIdIsCurrentTransactionId(xmin))
		return load_read_only(slot, &cfg, COPY_SHARED, prec);
	m = load_read_only(slot, &cfg, COPY_XACT, prec);
	slot->xmin = xmin;
	return m;
}

/* The model for inference in this precision (llm_model_get with another precision). */
static LlmModel *
model_get_served(const char *model, LlmPrecision prec)
{
	return model_get_read_only(&serving, model, prec);
}

LlmModel *
llm_model_get_block(const char *model)
{
	return model_get_read_only(&measuring, model, LLM_PRECISION_FLOAT32);
}

LlmModel *
llm_model_get(const char *model)
{
	return model_get_served(model, (LlmPrecision) llm_inference_precision);
}

const char *
llm_model_shared_path(const LlmModel *m)
{
	if (m == NULL || m != serving.model || serving.kind != COPY_SHARED || serving.copy->path[0] == '\0')
		return NULL;
	return serving.copy->path;
}

LlmModel *
llm_model_map_shared(Oid database, const LlmConfig *cfg, int precision)
{
	LlmWcFormat fmt;
	LlmWcCopy  *copy;
	LlmModel   *m;

	llm_served_format(cfg, (LlmPrecision) precision, NULL, &fmt);
	copy = llm_wc_map_shared(database, cfg, &fmt);
	if (copy == NULL)
		return NULL;
	m = MemoryContextAllocZero(TopMemoryContext, sizeof(LlmModel));
	m->cfg = *cfg;
	llm_layout_init(cfg, &m->layout);
	llm_served_point(m, copy, (LlmPrecision) precision);
	return m;
}

LlmModel *
llm_model_get_private(const char *model)
{
	LlmConfig	cfg;
	LlmWcFormat fmt;

	llm_config_load(model, &cfg);
	llm_may_read_weights(&cfg, true);	/* every call: the copy may be another role's */
	forget(&serving);			/* training needs the memory; serving maps its copy again after */
	forget(&measuring);
	if (is_current(&training, &cfg))
		return training.model;
	llm_block_format(&cfg, &fmt);
	return load_model(&training, &cfg, COPY_TRAIN, &fmt, 0);
}

PG_FUNCTION_INFO_V1(pg_llm_weight_cache_build);

/*
 * pg_llm_weight_cache_build(model text, inference_precision text DEFAULT NULL) -> (format,
 * weights_version, bytes, shared): builds (or maps) the server's copy of the model's weights in this precision
 * (NULL: pg_llm.inference_precision), so that the first call of a session that serves it does not
 * wait for it. shared is false when the copy could not be shared (a WARNING said why) or the
 * model's weights were changed by this transaction.
 */
Datum
pg_llm_weight_cache_build(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	LlmPrecision prec;
	LlmModel   *m;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("model must not be null")));
	if (!llm_shared_weights)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pg_llm.shared_weights is off"),
				 errdetail("Each backend loads a private copy of the weights: there is no shared copy to build."),
				 errhint("SET pg_llm.shared_weights = on.")));
	prec = PG_ARGISNULL(1) ? (LlmPrecision) llm_inference_precision
		: llm_precision_parse(text_to_cstring(PG_GETARG_TEXT_PP(1)));
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "pg_llm_weight_cache_build must return a record");
	m = model_get_served(text_to_cstring(PG_GETARG_TEXT_PP(0)), prec);
	values[0] = CStringGetTextDatum(llm_precision_name(prec));
	values[1] = Int64GetDatum(m->cfg.weights_version);
	values[2] = Int64GetDatum((int64) serving.copy->bytes);
	values[3] = BoolGetDatum(serving.copy->shared);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

/* ---- weights_version: bumped once per statement for each model whose parameters changed ---- */

/*
 * A row trigger notes the models and a statement trigger bumps them. Transition tables would
 * do it in one trigger, but they copy every row written, and a row here is a whole tensor.
 * A statement that fails leaves no note behind: the notes of an aborted (sub)transaction are
 * dropped with it, so that a later statement never bumps a model it did not write.
 */
typedef struct ChangedModel
{
	char	   *model;
	int			level;			/* transaction nesting level that noted it */
} ChangedModel;

static List *changed_models = NIL;	/* of ChangedModel *, in TopMemoryContext */

static void
drop_notes(int from_level)
{
	List	   *keep = NIL;
	ListCell   *lc;

	foreach(lc, changed_models)
	{
		ChangedModel *c = lfirst(lc);

		if (c->level < from_level)
			keep = lappend(keep, c);
		else
		{
			pfree(c->model);
			pfree(c);
		}
	}
	list_free(changed_models);
	changed_models = keep;
}

static void
notes_xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		drop_notes(0);
}

static void
notes_subxact_callback(SubXactEvent event, SubTransactionId mySubid, SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		drop_notes(GetCurrentTransactionNestLevel());
}

static void
note_model(HeapTuple tuple, TupleDesc desc)
{
	static bool callbacks = false;
	bool		isnull;
	Datum		d = heap_getattr(tuple, 1, desc, &isnull);	/* llm_param.model */
	char	   *model;
	ListCell   *lc;
	MemoryContext old;
	ChangedModel *c;

	if (isnull)
		return;
	if (!callbacks)
	{
		RegisterXactCallback(notes_xact_callback, NULL);
		RegisterSubXactCallback(notes_subxact_callback, NULL);
		callbacks = true;
	}
	model = TextDatumGetCString(d);
	foreach(lc, changed_models)
		if (strcmp(((ChangedModel *) lfirst(lc))->model, model) == 0)
			return;
	old = MemoryContextSwitchTo(TopMemoryContext);
	c = palloc(sizeof(ChangedModel));
	c->model = pstrdup(model);
	c->level = GetCurrentTransactionNestLevel();
	changed_models = lappend(changed_models, c);
	MemoryContextSwitchTo(old);
}

PG_FUNCTION_INFO_V1(llm_param_note_change);

/* BEFORE INSERT OR UPDATE OR DELETE ... FOR EACH ROW on llm_param. */
Datum
llm_param_note_change(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TupleDesc	desc;

	llm_check_trigger_table(fcinfo, "llm_param_note_change", "llm_param");
	if (!TRIGGER_FIRED_FOR_ROW(td->tg_event) || !TRIGGER_FIRED_BEFORE(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_TRIGGERED_ACTION_EXCEPTION),
				 errmsg("llm_param_note_change() must be a BEFORE ... FOR EACH ROW trigger")));
	desc = RelationGetDescr(td->tg_relation);
	note_model(td->tg_trigtuple, desc);
	if (TRIGGER_FIRED_BY_UPDATE(td->tg_event))
	{
		note_model(td->tg_newtuple, desc);
		return PointerGetDatum(td->tg_newtuple);
	}
	return PointerGetDatum(td->tg_trigtuple);
}

PG_FUNCTION_INFO_V1(llm_param_bump_version);

/* AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ... FOR EACH STATEMENT on llm_param. */
Datum
llm_param_bump_version(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	ListCell   *lc;

	llm_check_trigger_table(fcinfo, "llm_param_bump_version", "llm_param");
	if (TRIGGER_FIRED_FOR_ROW(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_TRIGGERED_ACTION_EXCEPTION),
				 errmsg("llm_param_bump_version() must be a FOR EACH STATEMENT trigger")));
	SPI_connect();
	if (TRIGGER_FIRED_BY_TRUNCATE(td->tg_event))
		llm_spi_run("bumping weights_version",
					psprintf("UPDATE %s SET weights_version = pg_catalog.nextval('%s')",
							 llm_table("llm_model_config"), llm_table("llm_weights_version_seq")),
					0, NULL, NULL, false, 0, SPI_OK_UPDATE);
	else
	{
		foreach(lc, changed_models)
		{
			Oid			argtypes[1] = {TEXTOID};
			Datum		values[1] = {CStringGetTextDatum(((ChangedModel *) lfirst(lc))->model)};

			llm_spi_run("bumping weights_version",
						psprintf("UPDATE %s SET weights_version = pg_catalog.nextval('%s') "
								 "WHERE model OPERATOR(pg_catalog.=) $1",
								 llm_table("llm_model_config"), llm_table("llm_weights_version_seq")),
						1, argtypes, values, false, 0, SPI_OK_UPDATE);
		}
	}
	SPI_finish();
	drop_notes(0);
	return PointerGetDatum(NULL);
}
