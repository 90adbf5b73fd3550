/*
 * pg_llm.c: module entry point, GUCs, version.
 */
#include "pg_llm.h"
#include "weights_cache.h"

#include <stdlib.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "fmgr.h"
#include "utils/fmgroids.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

PG_MODULE_MAGIC;

int			llm_threads = 0;
int			llm_server_threads = 0;

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
	DefineCustomIntVariable("pg_llm.server_threads",
							"Threads that all sessions computing at once share (0 = one per CPU core).",
							"Each computing session gets an equal share, at least one, and at most pg_llm.threads.",
							&llm_server_threads,
							0, 0, 4096,
							PGC_SUSET, 0,
							NULL, NULL, NULL);
	llm_wc_init();
	MarkGUCPrefixReserved("pg_llm");
}

PG_FUNCTION_INFO_V1(pg_llm_version);
Datum
pg_llm_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(PG_LLM_VERSION));
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
char *
llm_table(const char *name)
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
	return psprintf("%s.%s", quote_identifier(get_namespace_name(schema)), quote_identifier(name));
}

float *
llm_alloc_floats(size_t n)
{
	size_t		bytes = (n * sizeof(float) + 63) & ~(size_t) 63;

	return (float *) aligned_alloc(64, bytes == 0 ? 64 : bytes);
}
