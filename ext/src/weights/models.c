/*
 * models.c: the backend's models with their weights: the copy inference reads (the server's shared
 * copy in the session's precision, or a private one) and the float32 block training writes into,
 * each derived from llm_param (cache.c holds the copies, served.c their precisions), and the check
 * that the caller may read them on every call (rights.c).
 */
#include "base/base.h"
#include "model/model.h"
#include "weights/weights.h"

#include <stdlib.h>

#include "access/detoast.h"
#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

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

	llm_require_arg(fcinfo, 0, "model");
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
