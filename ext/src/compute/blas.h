/*
 * blas.h: the BLAS library, opened at run time with signals blocked (blas.c).
 *
 * Only the CBLAS entry points pg_llm uses are declared here, so that no BLAS header is needed
 * to build: the library is found with dlopen (OpenBLAS first). Opening it, and what to say when
 * none opens, is the caller's (base/blas_setting.c, with the setting pg_llm.blas_library).
 */
#ifndef PG_LLM_BLAS_H
#define PG_LLM_BLAS_H

#include <stdbool.h>

/*
 * Opens `library` (NULL or "": the system's OpenBLAS, then the reference CBLAS) unless a library is
 * open already; false when none opens. From then on BLAS runs llm_compute_threads() threads.
 */
extern bool llm_blas_open(const char *library);

/* The library opened (NULL before). */
extern const char *llm_blas_name(void);

/* The libraries tried when none is named, for messages. */
extern const char *const llm_blas_candidates[];

/*
 * Threads BLAS itself uses from now on; 1 when the caller splits products over the worker pool.
 * llm_blas_follow_threads: llm_compute_threads() again, asked before each product.
 */
extern void llm_blas_set_threads(int n);
extern void llm_blas_follow_threads(void);

enum LlmCblasOrder { LlmCblasRowMajor = 101, LlmCblasColMajor = 102 };
enum LlmCblasTranspose { LlmCblasNoTrans = 111, LlmCblasTrans = 112 };

typedef void (*llm_sgemm_fn) (int order, int transa, int transb, int m, int n, int k,
							  float alpha, const float *a, int lda, const float *b, int ldb,
							  float beta, float *c, int ldc);

/* Set by llm_blas_open. */
extern llm_sgemm_fn llm_cblas_sgemm;

/*
 * C(M,N) = A(M,K) op(B) + beta C, row-major, op(B) = B(K,N) or, with transb = LlmCblasTrans, the
 * transpose of B(N,K): the same to the last bit on any number of threads (llm_parallel_for's
 * threads, BLAS single-threaded on each), so that a parallel worker with fewer threads computes
 * what a serial plan does. After llm_blas_init.
 */
extern void llm_sgemm_repeatable(int transb, int M, int N, int K, const float *A, int lda, const float *B,
								 int ldb, float beta, float *C, int ldc);

#endif							/* PG_LLM_BLAS_H */
