/*
 * base.c: what every module uses to reach the extension's tables (their qualified names, the SPI
 * helpers), the rule for SQL functions' arguments, memory for float blocks, and the functions
 * about the extension itself (pg_llm_version, pg_llm_limits).
 */
#include "base/base.h"

#include <stdlib.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(pg_llm_version);
Datum
pg_llm_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(PG_LLM_VERSION));
}

/*
 * pg_llm_limits() -> rows (name, value): the limits of llm_limits.h, for clients, which ask the
 * server instead of keeping copies.
 */
PG_FUNCTION_INFO_V1(pg_llm_limits);
Datum
pg_llm_limits(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	static const struct
	{
		const char *name;
		int64		value;
	}			limits[] = {
		{"model_name_bytes_max", LLM_MODEL_NAME_MAX},
		{"n_layer_max", LLM_N_LAYER_MAX},
		{"n_head_max", LLM_N_HEAD_MAX},
		{"d_model_max", LLM_D_MODEL_MAX},
		{"n_positions_max", LLM_N_POSITIONS_MAX},
		{"vocab_max", LLM_VOCAB_MAX},
		{"token_id_max", LLM_TOKEN_ID_MAX},
		{"batch_size_max", LLM_BATCH_SIZE_MAX},
		{"grad_accum_max", LLM_GRAD_ACCUM_MAX},
		{"beam_width_max", LLM_BEAM_WIDTH_MAX},
		{"batch_rows_max", LLM_BATCH_ROWS_MAX},
	};

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < (int) lengthof(limits); i++)
	{
		Datum		values[2] = {CStringGetTextDatum(limits[i].name), Int64GetDatum(limits[i].value)};
		bool		nulls[2] = {false, false};

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * Tables are always named with the extension's schema, so that a caller's search_path can
 * neither hide them nor substitute others.
 *
 * Every table access comes through here, so this is also where a library meets a schema of
 * another version: after `make install` of a new library but before ALTER EXTENSION pg_llm
 * UPDATE (or on a standby whose library is not the primary's), the tables may lack what the
 * library reads and writes. That is an error that says what to do, never a guess.
 */
static Oid
extension_schema(void)
{
	Relation	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	Oid			schema = InvalidOid;
	char	   *version = NULL;

	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum("pg_llm"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
	{
		bool		isnull;
		Datum		d = heap_getattr(tuple, Anum_pg_extension_extversion, RelationGetDescr(rel), &isnull);

		schema = ((Form_pg_extension) GETSTRUCT(tuple))->extnamespace;
		version = isnull ? "" : TextDatumGetCString(d);
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	if (!OidIsValid(schema))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"pg_llm\" is not installed in this database"),
				 errhint("Run pgllm install, or CREATE EXTENSION pg_llm.")));
	if (strcmp(version, PG_LLM_VERSION) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the pg_llm library is version %s but this database has pg_llm %s", PG_LLM_VERSION, version),
				 errdetail("The library only works with the tables of its own version."),
				 errhint("Run pgllm install, or ALTER EXTENSION pg_llm UPDATE, to bring the database to the library's version.")));
	return schema;
}

char *
llm_table(const char *name)
{
	Oid			schema = extension_schema();

	return psprintf("%s.%s", quote_identifier(get_namespace_name(schema)), quote_identifier(name));
}

Oid
llm_table_oid(const char *name)
{
	Oid			relid = get_relname_relid(name, extension_schema());

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("the table %s of pg_llm is missing", name),
				 errhint("Recreate the extension, or restore the table from a backup.")));
	return relid;
}

float *
llm_alloc_floats(size_t n)
{
	size_t		bytes = (n * sizeof(float) + 63) & ~(size_t) 63;

	return (float *) aligned_alloc(64, bytes == 0 ? 64 : bytes);
}

Datum
llm_floats_bytea(bytea *buf, const float *x, size_t n)
{
	if (buf == NULL)
		buf = palloc(VARHDRSZ + n * sizeof(float));
	SET_VARSIZE(buf, VARHDRSZ + n * sizeof(float));
	memcpy(VARDATA(buf), x, n * sizeof(float));
	return PointerGetDatum(buf);
}

/* ---- SPI ----------------------------------------------------------------------------------- */

static void
spi_failed(const char *purpose, int ret, const char *sql)
{
	ereport(ERROR,
			(errcode(ERRCODE_INTERNAL_ERROR),
			 errmsg("%s failed: %s", purpose, SPI_result_code_string(ret)),
			 sql ? errdetail_internal("Statement: %s", sql) : 0));
}

uint64
llm_spi_run(const char *purpose, const char *sql, int nargs, Oid *types, Datum *values,
			bool read_only, long count, int expect)
{
	int			ret = SPI_execute_with_args(sql, nargs, types, values, NULL, read_only, count);

	if (ret != expect)
		spi_failed(purpose, ret, sql);
	return SPI_processed;
}

uint64
llm_spi_run_plan(const char *purpose, SPIPlanPtr plan, Datum *values, bool read_only, long count, int expect)
{
	int			ret = SPI_execute_plan(plan, values, NULL, read_only, count);

	if (ret != expect)
		spi_failed(purpose, ret, NULL);
	return SPI_processed;
}

SPIPlanPtr
llm_spi_prepare(const char *purpose, const char *sql, int nargs, Oid *types)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, types);

	if (plan == NULL)
		spi_failed(purpose, SPI_result, sql);
	return plan;
}

void
llm_require_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

char *
llm_text_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	llm_require_arg(fcinfo, argno, name);
	return text_to_cstring(PG_GETARG_TEXT_PP(argno));
}

int32
llm_int_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	llm_require_arg(fcinfo, argno, name);
	return PG_GETARG_INT32(argno);
}

double
llm_float_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	llm_require_arg(fcinfo, argno, name);
	return PG_GETARG_FLOAT8(argno);
}

void
llm_bad_argument(const char *msg, const char *hint)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("%s", msg),
			 hint ? errhint("%s", hint) : 0));
	pg_unreachable();
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
