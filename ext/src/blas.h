/*
 * blas.h: the BLAS library, opened at run time with signals blocked (blas.c).
 *
 * Only the CBLAS entry points pg_llm uses are declared here, so that no BLAS header is needed
 * to build: the library is found with dlopen (OpenBLAS first) on first use.
 */
#ifndef PG_LLM_BLAS_H
#define PG_LLM_BLAS_H

/* _PG_init: the setting pg_llm.blas_library. */
extern void llm_blas_define_settings(void);

/* Opens the library on first use (ERROR when there is none) and sets its threads to llm_num_threads(). */
extern void llm_blas_init(void);

/* Threads BLAS itself uses from now on; 1 when the caller splits products over the worker pool. */
extern void llm_blas_set_threads(int n);

enum LlmCblasOrder { LlmCblasRowMajor = 101, LlmCblasColMajor = 102 };
enum LlmCblasTranspose { LlmCblasNoTrans = 111, LlmCblasTrans = 112 };

typedef void (*llm_sgemm_fn) (int order, int transa, int transb, int m, int n, int k,
							  float alpha, const float *a, int lda, const float *b, int ldb,
							  float beta, float *c, int ldc);

/* Set by llm_blas_init. */
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
