/*
 * pg_llm.c: module entry point, GUCs, version.
 */
#include "pg_llm.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/guc.h"

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

PG_FUNCTION_INFO_V1(pg_llm_version);
Datum
pg_llm_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(PG_LLM_VERSION));
}
