/*
 * pg_llm.c: module entry point, settings, version and limits, and what every module uses to reach
 * the extension's tables (their qualified names, the SPI helpers).
 */
#include "pg_llm.h"

#include <stdlib.h>
#include <unistd.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/fmgroids.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/tuplestore.h"

PG_MODULE_MAGIC;

int			llm_threads = 0;

void		_PG_init(void);

void
_PG_init(void)
{
	DefineCustomIntVariable("pg_llm.threads",
							"Worker threads for matrix products and kernels (0 = one per CPU core).",
							"Applies from the next call that uses the model engine.",
							&llm_threads,
							0, 0, 256,
							PGC_USERSET, 0,
							NULL, NULL, NULL);
	MarkGUCPrefixReserved("pg_llm");
}

int
llm_num_threads(void)
{
	/* sysconf reads /sys on every call, and this runs before every parallel kernel: ask once */
	static int	cores = 0;

	if (llm_threads > 0)
		return llm_threads;
	if (cores == 0)
		cores = Max(1, (int) sysconf(_SC_NPROCESSORS_ONLN));
	return cores;
}

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
 */
char *
llm_table(const char *name)
{
	Relation	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	Oid			schema = InvalidOid;

	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum("pg_llm"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
		schema = ((Form_pg_extension) GETSTRUCT(tuple))->extnamespace;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	if (!OidIsValid(schema))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"pg_llm\" is not installed in this database"),
				 errhint("Run pgllm install, or CREATE EXTENSION pg_llm.")));
	return psprintf("%s.%s", quote_identifier(get_namespace_name(schema)), quote_identifier(name));
}

float *
llm_alloc_floats(size_t n)
{
	size_t		bytes = (n * sizeof(float) + 63) & ~(size_t) 63;

	return (float *) aligned_alloc(64, bytes == 0 ? 64 : bytes);
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
