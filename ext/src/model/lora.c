/*
 * lora.c: LoRA adapters of a model (model.h): their layout, their rows (llm_adapter and
 * llm_adapter_param), and llm_adapter_create, which initialises one as PEFT does (A uniform in
 * +-1/sqrt(IC), Kaiming's with a = sqrt(5); B zero, so that a new adapter changes nothing).
 */
#include "base/base.h"
#include "model/model.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"

/* The products an adapter may target, by their names in the state dict without ".weight". */
static const LlmParamKind target_kinds[] = {LLM_QKVW, LLM_ATTPROJW, LLM_FCW, LLM_FCPROJW};

#define RANK_MAX LORA_RANK_MAX

/* "attn.c_attn" for LLM_QKVW: tensors.def's name without ".weight". */
static void
target_name(LlmParamKind kind, char *buf, size_t len)
{
	const char *name = llm_kind_name(kind);
	size_t		n = strlen(name) - strlen(".weight");

	Assert(n < len && strcmp(name + n, ".weight") == 0);
	memcpy(buf, name, n);
	buf[n] = '\0';
}

/* The target kind named `name`, or -1. */
static int
target_kind(const char *name)
{
	char		buf[64];

	for (int i = 0; i < (int) lengthof(target_kinds); i++)
	{
		target_name(target_kinds[i], buf, sizeof(buf));
		if (strcmp(buf, name) == 0)
			return target_kinds[i];
	}
	return -1;
}

/* The targets' names, for a hint. */
static char *
target_list(void)
{
	StringInfoData s;
	char		buf[64];

	initStringInfo(&s);
	for (int i = 0; i < (int) lengthof(target_kinds); i++)
	{
		target_name(target_kinds[i], buf, sizeof(buf));
		appendStringInfo(&s, "%s%s", i > 0 ? ", " : "", buf);
	}
	return s.data;
}

/* Sizes and offsets of the adapter's block for the model cfg, its rank and its targets. */
static void
lora_layout(LlmLora *lora, const LlmConfig *cfg)
{
	size_t		offset = 0;

	lora->n_layer = cfg->n_layer;
	lora->num_tensors = 0;
	for (int k = 0; k < LLM_NUM_KINDS; k++)
	{
		int			shape[2];

		if (!lora->target[k])
			continue;
		llm_kind_shape(cfg, (LlmParamKind) k, shape);
		lora->in[k] = shape[0];
		lora->out[k] = shape[1];
		lora->a_size[k] = (size_t) lora->rank * shape[0];
		lora->b_size[k] = (size_t) shape[1] * lora->rank;
		lora->a_offset[k] = offset;
		offset += lora->a_size[k] * cfg->n_layer;
		lora->b_offset[k] = offset;
		offset += lora->b_size[k] * cfg->n_layer;
		lora->num_tensors += 2 * cfg->n_layer;
	}
	lora->numel = offset;
	lora->scale = lora->alpha / (float) lora->rank;
}

bool
llm_lora_fits(const LlmLora *lora, const LlmConfig *cfg)
{
	LlmLora		want = {0};

	if (lora->rank < 1 || lora->rank > RANK_MAX || !(lora->alpha > 0) || isinf(lora->alpha) ||
		memchr(lora->model, '\0', sizeof(lora->model)) == NULL || strcmp(lora->model, cfg->model) != 0)
		return false;
	want.rank = lora->rank;
	want.alpha = lora->alpha;
	for (int i = 0; i < (int) lengthof(target_kinds); i++)
		want.target[target_kinds[i]] = lora->target[target_kinds[i]];
	lora_layout(&want, cfg);
	return memcmp(want.target, lora->target, sizeof(want.target)) == 0 && want.numel == lora->numel &&
		want.num_tensors == lora->num_tensors && want.n_layer == lora->n_layer && want.scale == lora->scale &&
		memcmp(want.a_offset, lora->a_offset, sizeof(want.a_offset)) == 0 &&
		memcmp(want.b_offset, lora->b_offset, sizeof(want.b_offset)) == 0 &&
		memcmp(want.a_size, lora->a_size, sizeof(want.a_size)) == 0 &&
		memcmp(want.b_size, lora->b_size, sizeof(want.b_size)) == 0 &&
		memcmp(want.in, lora->in, sizeof(want.in)) == 0 && memcmp(want.out, lora->out, sizeof(want.out)) == 0;
}

void
llm_lora_tensor(const LlmLora *lora, int index, LlmTensorInfo *info)
{
	int			i = index;

	Assert(index >= 0 && index < lora->num_tensors);
	for (int k = 0; k < LLM_NUM_KINDS; k++)
	{
		char		base[64];
		bool		is_b;
		int			l;

		if (!lora->target[k])
			continue;
		if (i >= 2 * lora->n_layer)
		{
			i -= 2 * lora->n_layer;
			continue;
		}
		is_b = i >= lora->n_layer;
		l = i % lora->n_layer;
		target_name((LlmParamKind) k, base, sizeof(base));
		snprintf(info->name, sizeof(info->name), "h.%d.%s.lora_%c", l, base, is_b ? 'B' : 'A');
		info->kind = (LlmParamKind) k;
		info->layer = l;
		info->ndim = 2;
		info->shape[0] = is_b ? lora->out[k] : lora->rank;
		info->shape[1] = is_b ? lora->rank : lora->in[k];
		info->numel = is_b ? lora->b_size[k] : lora->a_size[k];
		info->offset = (is_b ? lora->b_offset[k] : lora->a_offset[k]) + (size_t) l * info->numel;
		info->decay = true;
		return;
	}
	elog(ERROR, "adapter tensor %d out of range", index);
}

/* The adapter's tensor named `name`, or -1. */
static int
lora_tensor_find(const LlmLora *lora, const char *name, LlmTensorInfo *info)
{
	for (int i = 0; i < lora->num_tensors; i++)
	{
		llm_lora_tensor(lora, i, info);
		if (strcmp(info->name, name) == 0)
			return i;
	}
	return -1;
}

/* targets text[] -> lora->target; ERROR for an unknown or repeated name, or none. */
static void
parse_targets(LlmLora *lora, ArrayType *arr)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	memset(lora->target, 0, sizeof(lora->target));
	if (n == 0)
		llm_bad_argument("an adapter needs at least one target", psprintf("Targets are %s.", target_list()));
	for (int i = 0; i < n; i++)
	{
		char	   *name;
		int			k;

		if (nulls[i])
			llm_bad_argument("targets must not contain NULL", psprintf("Targets are %s.", target_list()));
		name = TextDatumGetCString(elems[i]);
		k = target_kind(name);
		if (k < 0)
			llm_bad_argument(psprintf("\"%s\" is not a product an adapter can target", name),
							 psprintf("Targets are %s.", target_list()));
		if (lora->target[k])
			llm_bad_argument(psprintf("target \"%s\" is named twice", name), NULL);
		lora->target[k] = true;
	}
}

/* One row of llm_adapter_param into the adapter (and its moments). */
typedef struct LoadState
{
	LlmLora    *lora;
	float	   *m,
			   *v;
	bool	   *seen;
} LoadState;

static void
copy_tensor(const LlmLora *lora, const LlmTensorInfo *info, Datum raw, float *dst, const char *column)
{
	bytea	   *data = DatumGetByteaPP(raw);

	if (VARSIZE_ANY_EXHDR(data) != info->numel * sizeof(float))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("%s of tensor \"%s\" of adapter \"%s\" has %zu bytes, expected %zu",
						column, info->name, lora->name, (size_t) VARSIZE_ANY_EXHDR(data),
						info->numel * sizeof(float)),
				 errdetail("Its shape is (%d, %d) in float32.", info->shape[0], info->shape[1])));
	memcpy(dst + info->offset, VARDATA_ANY(data), info->numel * sizeof(float));
	if ((Pointer) data != DatumGetPointer(raw))
		pfree(data);
}

LlmLora *
llm_lora_load(const char *adapter, const LlmConfig *cfg, bool read_only, float **m, float **v)
{
	/* SPI's calls return to its own context: the result goes where the caller was */
	MemoryContext cxt = CurrentMemoryContext;
	LlmLora    *lora = MemoryContextAllocZero(cxt, sizeof(LlmLora));
	Datum		key = CStringGetTextDatum(adapter);
	Oid			type = TEXTOID;
	HeapTuple	tuple;
	TupleDesc	desc;
	bool		isnull;
	char	   *base;
	Portal		portal;
	bool	   *seen;
	int			n_seen = 0;

	llm_check_model_name(adapter);
	if (llm_spi_run("reading llm_adapter",
					psprintf("SELECT model, rank, alpha, dropout, targets, step, data_pos FROM %s WHERE adapter = $1",
							 llm_table("llm_adapter")),
					1, &type, &key, read_only, 1, SPI_OK_SELECT) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("adapter \"%s\" does not exist", adapter),
				 errhint("Create it with llm_adapter_create('%s', model).", adapter)));
	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	base = TextDatumGetCString(SPI_getbinval(tuple, desc, 1, &isnull));
	if (strcmp(base, cfg->model) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("adapter \"%s\" belongs to model \"%s\", not \"%s\"", adapter, base, cfg->model),
				 errhint("Name model \"%s\" with this adapter.", base)));
	strlcpy(lora->name, adapter, sizeof(lora->name));
	strlcpy(lora->model, base, sizeof(lora->model));
	lora->rank = DatumGetInt32(SPI_getbinval(tuple, desc, 2, &isnull));
	lora->alpha = DatumGetFloat4(SPI_getbinval(tuple, desc, 3, &isnull));
	lora->dropout = DatumGetFloat4(SPI_getbinval(tuple, desc, 4, &isnull));
	parse_targets(lora, DatumGetArrayTypeP(SPI_getbinval(tuple, desc, 5, &isnull)));
	lora->step = DatumGetInt32(SPI_getbinval(tuple, desc, 6, &isnull));
	lora->data_pos = DatumGetInt64(SPI_getbinval(tuple, desc, 7, &isnull));
	SPI_freetuptable(SPI_tuptable);
	lora_layout(lora, cfg);

	lora->memory = MemoryContextAllocHuge(cxt, lora->numel * sizeof(float));
	if (m != NULL)
	{
		*m = MemoryContextAllocHuge(cxt, lora->numel * sizeof(float));
		*v = MemoryContextAllocHuge(cxt, lora->numel * sizeof(float));
		memset(*m, 0, lora->numel * sizeof(float));
		memset(*v, 0, lora->numel * sizeof(float));
	}
	seen = palloc0(sizeof(bool) * lora->num_tensors);
	portal = SPI_cursor_open_with_args(NULL, psprintf("SELECT name, data, m, v FROM %s WHERE adapter = $1",
													  llm_table("llm_adapter_param")),
									   1, &type, &key, NULL, read_only, CURSOR_OPT_NO_SCROLL);
	for (;;)
	{
		SPI_cursor_fetch(portal, true, 16);
		if (SPI_processed == 0)
			break;
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			LlmTensorInfo info;
			char	   *name;
			int			index;

			CHECK_FOR_INTERRUPTS();
			tuple = SPI_tuptable->vals[r];
			desc = SPI_tuptable->tupdesc;
			name = TextDatumGetCString(SPI_getbinval(tuple, desc, 1, &isnull));
			index = lora_tensor_find(lora, name, &info);
			if (index < 0)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_EXCEPTION),
						 errmsg("adapter \"%s\" has a tensor \"%s\" that its rank and targets do not have",
								adapter, name)));
			seen[index] = true;
			n_seen++;
			copy_tensor(lora, &info, SPI_getbinval(tuple, desc, 2, &isnull), lora->memory, "data");
			if (m != NULL)
			{
				Datum		mv = SPI_getbinval(tuple, desc, 3, &isnull);

				if (!isnull)
				{
					copy_tensor(lora, &info, mv, *m, "m");
					mv = SPI_getbinval(tuple, desc, 4, &isnull);
					if (isnull)
						ereport(ERROR,
								(errcode(ERRCODE_DATA_CORRUPTED),
								 errmsg("tensor \"%s\" of adapter \"%s\" has an m and no v", name, adapter)));
					copy_tensor(lora, &info, mv, *v, "v");
				}
			}
		}
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);
	/* rows the caller cannot see (row-level security) or that were deleted: no adapter to serve */
	if (n_seen < lora->num_tensors)
		for (int i = 0; i < lora->num_tensors; i++)
			if (!seen[i])
			{
				LlmTensorInfo info;

				llm_lora_tensor(lora, i, &info);
				ereport(ERROR,
						(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						 errmsg("permission denied for the tensors of adapter \"%s\"", adapter),
						 errdetail("llm_adapter_param shows role \"%s\" %d of the adapter's %d tensors (\"%s\" is not among them).",
								   GetUserNameFromId(GetUserId(), false), n_seen, lora->num_tensors, info.name),
						 errhint("A row-level security policy on llm_adapter_param may hide them; an adapter's rows are "
								 "written by llm_adapter_create and llm_train.")));
			}
	pfree(seen);
	return lora;
}

const LlmLora *
llm_lora_get(const char *adapter, const LlmConfig *cfg)
{
	MemoryContext caller = CurrentMemoryContext;
	const LlmLora *lora;

	if (adapter == NULL)
		return NULL;
	SPI_connect();
	MemoryContextSwitchTo(caller);
	lora = llm_lora_load(adapter, cfg, true, NULL, NULL);
	SPI_finish();
	return lora;
}

char *
llm_lora_name_arg(FunctionCallInfo fcinfo, int argno)
{
	if (PG_NARGS() <= argno || PG_ARGISNULL(argno))
		return NULL;
	return text_to_cstring(PG_GETARG_TEXT_PP(argno));
}

/*
 * llm_adapter_create(adapter, model, rank, alpha, dropout, targets, seed): a new adapter of the
 * model, with PEFT's initial values (it changes nothing until trained).
 */
PG_FUNCTION_INFO_V1(llm_adapter_create);
Datum
llm_adapter_create(PG_FUNCTION_ARGS)
{
	char	   *adapter = llm_text_arg(fcinfo, 0, "adapter");
	char	   *model = llm_text_arg(fcinfo, 1, "model");
	LlmLora    *lora = palloc0(sizeof(LlmLora));
	LlmConfig	cfg;
	double		alpha,
				dropout;
	int64		seed;
	SPIPlanPtr	insert;
	Oid			types[4] = {TEXTOID, TEXTOID, INT4ARRAYOID, BYTEAOID};

	llm_check_model_name(adapter);
	llm_check_model_name(model);
	lora->rank = llm_int_arg(fcinfo, 2, "rank");
	alpha = llm_float_arg(fcinfo, 3, "alpha");
	dropout = llm_float_arg(fcinfo, 4, "dropout");
	llm_require_arg(fcinfo, 5, "targets");
	seed = PG_ARGISNULL(6) ? 1337 : PG_GETARG_INT64(6);
	if (lora->rank < 1 || lora->rank > RANK_MAX)
		llm_bad_argument(psprintf("rank must be between 1 and %d, got %d", RANK_MAX, lora->rank),
						 "PEFT's usual ranks are 4 to 64.");
	if (!(alpha > 0) || isinf(alpha))
		llm_bad_argument(psprintf("alpha must be a positive number, got %g", alpha),
						 "The update is scaled by alpha / rank; PEFT's default alpha is 8, often twice the rank.");
	if (!(dropout >= 0 && dropout < 1))
		llm_bad_argument(psprintf("dropout must be in [0, 1), got %g", dropout), NULL);
	parse_targets(lora, PG_GETARG_ARRAYTYPE_P(5));
	lora->alpha = (float) alpha;
	lora->dropout = (float) dropout;

	SPI_connect();
	llm_config_load(model, &cfg);
	lora_layout(lora, &cfg);
	if (llm_spi_run("reading llm_adapter", psprintf("SELECT 1 FROM %s WHERE adapter = $1", llm_table("llm_adapter")),
					1, (Oid[]) {TEXTOID}, (Datum[]) {CStringGetTextDatum(adapter)}, false, 1, SPI_OK_SELECT) > 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("adapter \"%s\" already exists", adapter),
				 errhint("Drop it first (llm_adapter_drop), or choose another name.")));
	{
		Datum		targets[lengthof(target_kinds)];
		int			n = 0;
		char		buf[64];

		for (int i = 0; i < (int) lengthof(target_kinds); i++)
			if (lora->target[target_kinds[i]])
			{
				target_name(target_kinds[i], buf, sizeof(buf));
				targets[n++] = CStringGetTextDatum(buf);
			}
		llm_spi_run("creating the adapter",
					psprintf("INSERT INTO %s (adapter, model, rank, alpha, dropout, targets) "
							 "VALUES ($1, $2, $3, $4, $5, $6)", llm_table("llm_adapter")),
					6, (Oid[]) {TEXTOID, TEXTOID, INT4OID, FLOAT4OID, FLOAT4OID, TEXTARRAYOID},
					(Datum[]) {CStringGetTextDatum(adapter), CStringGetTextDatum(model), Int32GetDatum(lora->rank),
					Float4GetDatum(lora->alpha), Float4GetDatum(lora->dropout),
					PointerGetDatum(construct_array(targets, n, TEXTOID, -1, false, TYPALIGN_INT))},
					false, 0, SPI_OK_INSERT);
	}
	insert = llm_spi_prepare("preparing the llm_adapter_param insert",
							 psprintf("INSERT INTO %s (adapter, name, shape, data) VALUES ($1, $2, $3, $4)",
									  llm_table("llm_adapter_param")), 4, types);
	for (int i = 0; i < lora->num_tensors; i++)
	{
		LlmTensorInfo info;
		float	   *x;
		bool		is_b;
		float		bound;

		CHECK_FOR_INTERRUPTS();
		llm_lora_tensor(lora, i, &info);
		x = palloc0(info.numel * sizeof(float));
		is_b = info.name[strlen(info.name) - 1] == 'B';
		bound = 1.0f / sqrtf((float) info.shape[1]);
		if (!is_b)
			for (size_t j = 0; j < info.numel; j++)
			{
				/* 24 random bits: uniform in [-bound, bound) */
				double		u = (double) (dropout_key((uint64) seed, (uint64) i, (uint64) j, 0) >> 40) / (double) (1 << 24);

				x[j] = (float) ((2.0 * u - 1.0) * bound);
			}
		llm_spi_run_plan("writing llm_adapter_param", insert,
						 (Datum[]) {CStringGetTextDatum(adapter), CStringGetTextDatum(info.name),
						 PointerGetDatum(construct_array((Datum[]) {Int32GetDatum(info.shape[0]), Int32GetDatum(info.shape[1])},
														 2, INT4OID, sizeof(int32), true, TYPALIGN_INT)),
						 llm_floats_bytea(NULL, x, info.numel)},
						 false, 0, SPI_OK_INSERT);
		pfree(x);
	}
	SPI_finish();
	PG_RETURN_VOID();
}

/*
 * llm_adapter_merge(adapter, model): a new model, a copy of the adapter's base (llm_model_copy:
 * its tokenizer and training state too) whose target products carry the adapter's update:
 * W (IC, OC) += scale * A^T B^T, as PEFT's merge_and_unload does.
 */
PG_FUNCTION_INFO_V1(llm_adapter_merge);
Datum
llm_adapter_merge(PG_FUNCTION_ARGS)
{
	char	   *adapter = llm_text_arg(fcinfo, 0, "adapter");
	char	   *model = llm_text_arg(fcinfo, 1, "model");
	Datum		key;
	char	   *base;
	bool		isnull;
	LlmConfig	cfg;
	LlmLora    *lora;
	SPIPlanPtr	read,
				write;

	llm_check_model_name(adapter);
	llm_check_model_name(model);
	key = CStringGetTextDatum(adapter);
	llm_blas_init();
	SPI_connect();
	if (llm_spi_run("reading llm_adapter", psprintf("SELECT model FROM %s WHERE adapter = $1", llm_table("llm_adapter")),
					1, (Oid[]) {TEXTOID}, &key, false, 1, SPI_OK_SELECT) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("adapter \"%s\" does not exist", adapter)));
	base = TextDatumGetCString(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	llm_config_load(base, &cfg);
	lora = llm_lora_load(adapter, &cfg, false, NULL, NULL);
	llm_spi_run("copying the base", psprintf("SELECT %s($1, $2)", llm_table("llm_model_copy")), 2,
				(Oid[]) {TEXTOID, TEXTOID}, (Datum[]) {CStringGetTextDatum(base), CStringGetTextDatum(model)},
				false, 0, SPI_OK_SELECT);
	read = llm_spi_prepare("preparing the llm_param read",
						   psprintf("SELECT data FROM %s WHERE model = $1 AND name = $2", llm_table("llm_param")),
						   2, (Oid[]) {TEXTOID, TEXTOID});
	write = llm_spi_prepare("preparing the llm_param update",
							psprintf("UPDATE %s SET data = $3 WHERE model = $1 AND name = $2", llm_table("llm_param")),
							3, (Oid[]) {TEXTOID, TEXTOID, BYTEAOID});
	for (int k = 0; k < LLM_NUM_KINDS; k++)
	{
		if (!lora->target[k])
			continue;
		for (int l = 0; l < lora->n_layer; l++)
		{
			char		name[64];
			Datum		args[3] = {CStringGetTextDatum(model), 0, 0};
			bytea	   *w;
			size_t		numel = (size_t) lora->in[k] * lora->out[k];

			CHECK_FOR_INTERRUPTS();
			snprintf(name, sizeof(name), "h.%d.%s", l, llm_kind_name((LlmParamKind) k));
			args[1] = CStringGetTextDatum(name);
			if (llm_spi_run_plan("reading llm_param", read, args, false, 1, SPI_OK_SELECT) != 1)
				ereport(ERROR,
						(errcode(ERRCODE_NO_DATA_FOUND),
						 errmsg("model \"%s\" has no tensor \"%s\"", base, name)));
			w = DatumGetByteaPCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
			if (VARSIZE_ANY_EXHDR(w) != numel * sizeof(float))
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("tensor \"%s\" of model \"%s\" has %zu bytes, expected %zu", name, base,
								(size_t) VARSIZE_ANY_EXHDR(w), numel * sizeof(float))));
			/* W (IC, OC) += scale * A^T (IC, r) @ B^T (r, OC) */
			llm_cblas_sgemm(LlmCblasRowMajor, LlmCblasTrans, LlmCblasTrans, lora->in[k], lora->out[k], lora->rank,
							lora->scale, llm_lora_a(lora, (LlmParamKind) k, l), lora->in[k],
							llm_lora_b(lora, (LlmParamKind) k, l), lora->rank, 1.0f, (float *) VARDATA(w),
							lora->out[k]);
			args[2] = PointerGetDatum(w);
			llm_spi_run_plan("writing llm_param", write, args, false, 0, SPI_OK_UPDATE);
			pfree(w);
		}
	}
	SPI_finish();
	PG_RETURN_VOID();
}
