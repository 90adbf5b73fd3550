/*
 * pg_llm.h: what every module of the pg_llm extension shares: the version, the settings, the
 * names of its tables and running statements on them, memory for float blocks.
 *
 * It also brings in the worker pool (parallel.h) and the kernel library (kernels.h, with the one
 * SIMD dispatch macro), which most modules use.
 */
#ifndef PG_LLM_H
#define PG_LLM_H

#include "postgres.h"

#include "executor/spi.h"

#include "kernels.h"
#include "llm_limits.h"
#include "parallel.h"

/* The extension's version: default_version of pg_llm.control, passed in by the Makefile. */
#ifndef PG_LLM_VERSION
#error "PG_LLM_VERSION must be defined (see ext/Makefile)"
#endif

/*
 * The PostgreSQL versions pg_llm builds for: 15 and newer (README.md says which are tested).
 * pgllm install reads this number too, to refuse an older server before building anything.
 */
#define PG_LLM_MIN_PG_VERSION_NUM 150000
#if PG_VERSION_NUM < PG_LLM_MIN_PG_VERSION_NUM
#error "pg_llm needs PostgreSQL 15 or newer"
#endif

/*
 * Where the server's C API differs between those versions: the only place that tests
 * PG_VERSION_NUM (make test builds and runs pg_llm on 15 and on 18).
 */
#if PG_VERSION_NUM >= 170000
#define LLM_MY_LXID (MyProc->vxid.lxid)	/* this backend's local transaction id */
#else
#define LLM_MY_LXID (MyProc->lxid)
#endif
#if PG_VERSION_NUM >= 170000
#define LLM_MY_PROCNO ((int) GetNumberFromPGProc(MyProc))	/* this backend's PGPROC slot */
#else
#define LLM_MY_PROCNO (MyProc->pgprocno)
#endif
#if PG_VERSION_NUM < 180000
#define pg_noreturn _Noreturn	/* 18 replaced the trailing pg_attribute_noreturn() with it */
#endif
/* common/jsonapi.h: semantic actions return a status since 16; 17 lets the caller own the lexer. */
#if PG_VERSION_NUM >= 160000
#define LLM_JSON_ACTION JsonParseErrorType
#define LLM_JSON_ACTION_DONE return JSON_SUCCESS
#else
#define LLM_JSON_ACTION void
#define LLM_JSON_ACTION_DONE return
#endif
#if PG_VERSION_NUM >= 170000
#define llm_json_lexer(json, len) makeJsonLexContextCstringLen(NULL, (json), (len), PG_UTF8, true)
#else
#define llm_json_lexer(json, len) makeJsonLexContextCstringLen((json), (len), PG_UTF8, true)
#endif

/* GUCs (see pg_llm.c) */
extern int	llm_threads;		/* pg_llm.threads: worker threads for BLAS and kernels; 0 = one per core */
extern int	llm_server_threads;	/* pg_llm.server_threads: threads all computing sessions share; 0 = one per core */

/* threads.c: the threads this session may use now (its share of the server's, at most pg_llm.threads). */
extern int	llm_num_threads(void);
/* This process stops counting as computing until it asks again (a transaction's end does it for sessions). */
extern void llm_threads_idle(void);

/* Schema-qualified, quoted name of a pg_llm table, so that search_path cannot redirect it. */
extern char *llm_table(const char *name);

/* The OID of that table (ERROR when it is missing). */
extern Oid	llm_table_oid(const char *name);

/* malloc'd, 64-byte aligned; NULL when out of memory. */
extern float *llm_alloc_floats(size_t n);

/*
 * Running statements through SPI (the caller is connected). Each runs one statement and raises
 * an ERROR naming its purpose ("reading llm_train_state") unless SPI returns `expect`
 * (SPI_OK_SELECT, SPI_OK_INSERT, ...). They return SPI_processed.
 */
extern uint64 llm_spi_run(const char *purpose, const char *sql, int nargs, Oid *types, Datum *values,
						  bool read_only, long count, int expect);
extern uint64 llm_spi_run_plan(const char *purpose, SPIPlanPtr plan, Datum *values, bool read_only,
							   long count, int expect);
/* A prepared statement (SPI_prepare), or an ERROR naming its purpose. */
extern SPIPlanPtr llm_spi_prepare(const char *purpose, const char *sql, int nargs, Oid *types);

/* ERROR invalid_parameter_value with msg (and hint, unless NULL): a bad argument of a SQL function. */
extern pg_noreturn void llm_bad_argument(const char *msg, const char *hint);

#endif							/* PG_LLM_H */
