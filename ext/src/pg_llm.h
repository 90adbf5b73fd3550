/*
 * pg_llm.h: shared declarations of the pg_llm extension.
 */
#ifndef PG_LLM_H
#define PG_LLM_H

#include "postgres.h"

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

/* Where the server's C API differs between those versions. */
#if PG_VERSION_NUM >= 170000
#define LLM_MY_LXID (MyProc->vxid.lxid)	/* this backend's local transaction id */
#else
#define LLM_MY_LXID (MyProc->lxid)
#endif

/* GUCs (see pg_llm.c) */
extern int	llm_threads;		/* worker threads for BLAS and kernels; 0 = one per core */
extern int	llm_server_threads;	/* threads all computing sessions share; 0 = one per core */

/* pg_llm.c */
extern char *llm_table(const char *name);	/* schema-qualified, quoted name of a pg_llm table */
extern float *llm_alloc_floats(size_t n);	/* malloc'd, 64-byte aligned; NULL when out of memory */

/* parallel.c: a fixed pool of worker threads for plain-C kernels */
typedef void (*llm_task_fn) (void *arg, size_t start, size_t end);
extern void llm_parallel_for(size_t n, llm_task_fn fn, void *arg);

/* blas.c */
extern void llm_blas_init(void);
extern void llm_blas_set_threads(int n);	/* after llm_blas_init; 1 when calling BLAS from workers */

/* threads.c: threads this session may use now (its share of the server's) */
extern int	llm_num_threads(void);

/* Signatures of the CBLAS entry points we use (declared here so that no BLAS header is needed). */
enum LlmCblasOrder { LlmCblasRowMajor = 101, LlmCblasColMajor = 102 };
enum LlmCblasTranspose { LlmCblasNoTrans = 111, LlmCblasTrans = 112 };

typedef void (*llm_sgemm_fn) (int order, int transa, int transb, int m, int n, int k,
							  float alpha, const float *a, int lda, const float *b, int ldb,
							  float beta, float *c, int ldc);
typedef void (*llm_sgemv_fn) (int order, int trans, int m, int n, float alpha,
							  const float *a, int lda, const float *x, int incx,
							  float beta, float *y, int incy);

extern llm_sgemm_fn llm_cblas_sgemm;
extern llm_sgemv_fn llm_cblas_sgemv;

#endif							/* PG_LLM_H */
