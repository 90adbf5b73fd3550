/*
 * base.h: what every PostgreSQL-side module of pg_llm shares (base.c, thread_budget.c,
 * blas_setting.c, privileges.c, shared_file.c): the version and the PostgreSQL versions it
 * builds for, the names of its tables and running statements on them, the rule for arguments, the
 * threads a session may use, the files shared by the server's processes, memory for float blocks.
 *
 * It brings in PostgreSQL (postgres.h first, as every backend file must) and the compute layer
 * (compute/compute.h), which sits below it and never includes PostgreSQL.
 */
#ifndef PG_LLM_BASE_H
#define PG_LLM_BASE_H

#include "postgres.h"

#include "executor/spi.h"
#include "fmgr.h"
#include "nodes/parsenodes.h"

#include "base/limits.h"
#include "compute/compute.h"

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

/* ---- thread_budget.c: the threads the sessions of a server share ----------------------------- */

/* _PG_init: the settings pg_llm.threads and pg_llm.server_threads. */
extern void llm_thread_budget_init(void);
/* The threads this session may use now (its share of the server's, at most pg_llm.threads). */
extern int	llm_num_threads(void);
/* This process stops counting as computing until it asks again (a transaction's end does it for sessions). */
extern void llm_threads_idle(void);

/* ---- blas_setting.c: the BLAS library ------------------------------------------------------- */

/* _PG_init: the setting pg_llm.blas_library. */
extern void llm_blas_define_settings(void);
/* Opens the library on first use (ERROR when there is none); BLAS then follows llm_num_threads(). */
extern void llm_blas_init(void);

/* ---- base.c: tables, statements, arguments, memory ------------------------------------------ */

/* Schema-qualified, quoted name of a pg_llm table, so that search_path cannot redirect it. */
extern char *llm_table(const char *name);

/* The OID of that table (ERROR when it is missing). */
extern Oid	llm_table_oid(const char *name);

/* malloc'd, 64-byte aligned; NULL when out of memory. */
extern float *llm_alloc_floats(size_t n);

/* x[0..n) as a bytea value (little-endian float32, the tables' tensors): in buf, which has room
 * for n floats, or palloc'd when buf is NULL. */
extern Datum llm_floats_bytea(bytea *buf, const float *x, size_t n);

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

/*
 * The rule for the arguments of every SQL function: a NULL where a value is needed is ERROR
 * null_value_not_allowed "<name> must not be null"; a value out of range or of the wrong kind is
 * ERROR invalid_parameter_value (llm_bad_argument). The *_arg functions read argument argno,
 * refusing NULL by that rule.
 */
extern void llm_require_arg(FunctionCallInfo fcinfo, int argno, const char *name);
extern char *llm_text_arg(FunctionCallInfo fcinfo, int argno, const char *name);
extern int32 llm_int_arg(FunctionCallInfo fcinfo, int argno, const char *name);
extern double llm_float_arg(FunctionCallInfo fcinfo, int argno, const char *name);
extern pg_noreturn void llm_bad_argument(const char *msg, const char *hint);

/* A model name, checked before it is used anywhere (length, no control characters). */
extern void llm_check_model_name(const char *model);

/* ---- shared_file.c: files the server's processes share --------------------------------------- */

/* The folder, relative to the data directory (base backups skip pgsql_tmp* entries). */
#define LLM_SHARED_DIR "pgsql_tmp_pg_llm"

/* Makes the folder unless it exists; false when it cannot. */
extern bool llm_shared_dir_create(void);

/* Waits for flock `op` on fd, the backend's cancel and statement_timeout working meanwhile. */
extern void llm_shared_wait_flock(int fd, int op, const char *path);

/*
 * path opened (created when `create`) and locked with flock `op`, waiting as long as it takes;
 * *slot holds the descriptor while it waits, so that the caller's cleanup after a cancel closes it.
 * -1 (errno ENOENT) when the file is absent or was replaced while waiting: the caller starts again.
 */
extern int	llm_shared_open_locked(const char *path, int op, bool create, int *slot);

/* The whole file at path mapped read-write (*bytes, *fd set); NULL when absent or under min_bytes. */
extern void *llm_shared_map(const char *path, size_t min_bytes, size_t *bytes, int *fd);

/*
 * A new file for path: made as path.new, its blocks allocated, mapped read-write for the caller to
 * fill (NULL when it cannot be made); llm_shared_publish then renames it into place, so that no
 * process ever maps it half made (false, everything released, when it cannot).
 */
extern void *llm_shared_create(const char *path, size_t bytes, int *fd);
extern bool llm_shared_publish(const char *path, void *map, size_t bytes, int fd);

/*
 * The file at path mapped read-write, made (all zeros) when absent, as every process maps the same
 * one and claims it with atomics; NULL with *err (an errno) when it cannot be.
 */
extern void *llm_shared_map_or_create(const char *path, size_t bytes, int *err);

extern void llm_shared_unmap(void *map, size_t bytes, int fd);

/* Whether another process holds an exclusive flock on the file open at fd (its owner is alive). */
extern bool llm_shared_held(int fd);

/* ---- privileges.c: rights on the tables ------------------------------------------------------ */

/* _PG_init: the hint on "permission denied" for pg_llm's objects. */
extern void llm_privileges_init(void);

/* Whether the current user has `mode` on table relid, or on each of these columns of it. */
extern bool llm_granted(Oid relid, const char *const *columns, int n_columns, AclMode mode);

/* ERROR unless the current user may write models' weights (UPDATE on llm_param), as the write would. */
extern void llm_check_may_train(const char *model);
/* The same for training adapters: the right to write llm_adapter_param's tensors and moments. */
extern void llm_check_may_train_adapter(void);

/*
 * ERROR unless the trigger of fcinfo fires on pg_llm's table `table`: a trigger function of the
 * extension reads that table's columns by position, and must never run anywhere else.
 */
extern void llm_check_trigger_table(FunctionCallInfo fcinfo, const char *function, const char *table);

#endif							/* PG_LLM_BASE_H */
