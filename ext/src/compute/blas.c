/*
 * blas.c: open the BLAS library at run time.
 *
 * OpenBLAS starts its worker threads when it is loaded. Threads inherit the signal mask of the
 * thread that creates them, so we open the library with every signal blocked: PostgreSQL's
 * handlers (SIGINT for cancel, SIGALRM for statement_timeout, ...) then only ever run on the
 * backend's own thread, which is the only thread that may touch PostgreSQL state.
 */
#include "compute/blas.h"
#include "compute/pool.h"

#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define Min(x, y) ((x) < (y) ? (x) : (y))
#define Max(x, y) ((x) > (y) ? (x) : (y))

llm_sgemm_fn llm_cblas_sgemm = NULL;

typedef void (*set_threads_fn) (int);

static void blas_threads(int want);
static void sgemm_in_share(int order, int transa, int transb, int m, int n, int k, float alpha,
						   const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);

static void *blas_handle = NULL;
static char blas_name[1024];
static llm_sgemm_fn blas_sgemm = NULL;	/* the library's own */
static set_threads_fn blas_set_threads = NULL;
static int	blas_threads_set = -1;
static bool blas_follow_share = false;	/* set threads to llm_compute_threads() before each product */

/* Libraries tried in order: OpenBLAS (Debian's libopenblas0), then the reference CBLAS. */
const char *const llm_blas_candidates[] = {
	"libopenblas.so.0", "libopenblas.so", "libcblas.so.3", "libblas.so.3", NULL
};

/*
 * Prefixes of the symbols: none, or scipy_ (PyPI's scipy-openblas32 wheel, which a server installed
 * without root uses: its libscipy_openblas.so exports scipy_cblas_sgemm).
 */
static const char *const blas_prefixes[] = {"", "scipy_"};

/* dlopen's handle with cblas_sgemm under one of blas_prefixes, or NULL. */
static void *
open_blas(const char *name)
{
	void	   *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
	char		symbol[64];

	if (h == NULL)
		return NULL;
	for (size_t p = 0; p < sizeof(blas_prefixes) / sizeof(blas_prefixes[0]); p++)
	{
		snprintf(symbol, sizeof(symbol), "%scblas_sgemm", blas_prefixes[p]);
		blas_sgemm = (llm_sgemm_fn) dlsym(h, symbol);
		if (blas_sgemm != NULL)
		{
			snprintf(symbol, sizeof(symbol), "%sopenblas_set_num_threads", blas_prefixes[p]);
			blas_set_threads = (set_threads_fn) dlsym(h, symbol);
			return h;
		}
	}
	dlclose(h);
	return NULL;
}

bool
llm_blas_open(const char *library)
{
	if (blas_handle == NULL)
	{
		sigset_t	all,
					old;
		bool		chosen = library != NULL && library[0] != '\0';

		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);

		/*
		 * OpenBLAS's idle workers spin (sched_yield) for 2^28 cycles after each call, competing
		 * with our own worker pool for the cores while plain-C kernels run between products:
		 * about 15% of a training step's CPU time. Let them sleep at once (a wake-up costs
		 * microseconds per product). A value set by the server's environment wins.
		 */
		setenv("OPENBLAS_THREAD_TIMEOUT", "4", 0);
		if (chosen && (blas_handle = open_blas(library)) != NULL)
			snprintf(blas_name, sizeof(blas_name), "%s", library);
		for (int i = 0; !chosen && llm_blas_candidates[i] != NULL && blas_handle == NULL; i++)
			if ((blas_handle = open_blas(llm_blas_candidates[i])) != NULL)
				snprintf(blas_name, sizeof(blas_name), "%s", llm_blas_candidates[i]);
		if (blas_handle != NULL)
		{
			/* a first tiny product, still with signals blocked, so any lazily made threads inherit the mask */
			float		a = 1.0f,
						b = 1.0f,
						c = 0.0f;

			blas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, LlmCblasNoTrans, 1, 1, 1,
					   1.0f, &a, 1, &b, 1, 0.0f, &c, 1);
			llm_cblas_sgemm = sgemm_in_share;
		}
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		if (blas_handle == NULL)
			return false;
	}
	llm_blas_follow_threads();
	return true;
}

const char *
llm_blas_name(void)
{
	return blas_handle != NULL ? blas_name : NULL;
}

/*
 * Threads that BLAS itself uses from now on (until llm_blas_follow_threads). Callers that split a
 * product over llm_parallel_for and call BLAS from every worker ask for 1.
 */
void
llm_blas_set_threads(int want)
{
	blas_follow_share = false;
	blas_threads(want);
}

void
llm_blas_follow_threads(void)
{
	blas_threads(llm_compute_threads());
	blas_follow_share = true;
}

static void
blas_threads(int want)
{
	if (blas_set_threads != NULL && want != blas_threads_set)
	{
		sigset_t	all,
					old;

		/* OpenBLAS may start new threads here: same rule, signals blocked. */
		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);
		blas_set_threads(want);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		blas_threads_set = want;
	}
}

/*
 * cblas_sgemm as pg_llm calls it. Following the thread count, BLAS runs its own threads (training
 * calls it from the backend's thread): match them first to the session's share of the server's
 * threads, which changes as other sessions start and stop computing.
 */
static void
sgemm_in_share(int order, int transa, int transb, int m, int n, int k, float alpha, const float *a,
			   int lda, const float *b, int ldb, float beta, float *c, int ldc)
{
	if (blas_follow_share)
		blas_threads(llm_compute_threads());
	blas_sgemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/*
 * llm_sgemm_repeatable: BLAS's own threads make a product depend on their number (OpenBLAS with one
 * thread cuts K otherwise than with several: the sums differ in the last bits), so the columns are
 * cut into tasks whose widths depend on N alone, each a single-threaded sgemm on a thread of the
 * pool. Every task is the same call whatever the thread count, and so is every result.
 */
#define REPEATABLE_TASKS 24		/* tasks per product: even shares for 1, 2, 3, 4, 6, 8, 12 and 24 threads */
#define REPEATABLE_MIN_COLUMNS 32

typedef struct
{
	int			transb,
				M,
				N,
				K,
				lda,
				ldb,
				ldc,
				width;
	const float *A,
			   *B;
	float		beta;
	float	   *C;
}			RepeatableArgs;

static void
repeatable_task(void *arg, size_t start, size_t end)
{
	RepeatableArgs *a = arg;

	for (size_t t = start; t < end; t++)
	{
		size_t		j0 = t * (size_t) a->width;
		int			n = (int) Min((size_t) a->width, (size_t) a->N - j0);
		const float *b = a->transb == LlmCblasTrans ? a->B + j0 * a->ldb : a->B + j0;

		blas_sgemm(LlmCblasRowMajor, LlmCblasNoTrans, a->transb, a->M, n, a->K, 1.0f, a->A, a->lda, b, a->ldb,
				   a->beta, a->C + j0, a->ldc);
	}
}

void
llm_sgemm_repeatable(int transb, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
					 float beta, float *C, int ldc)
{
	RepeatableArgs a = {.transb = transb, .M = M, .N = N, .K = K, .lda = lda, .ldb = ldb, .ldc = ldc,
	.A = A, .B = B, .beta = beta, .C = C};
	bool		follow = blas_follow_share;
	int			before = blas_threads_set;

	/* a multiple of 16 columns: each task's B and C start on a 64-byte boundary when the whole does */
	a.width = Max(REPEATABLE_MIN_COLUMNS, (N + REPEATABLE_TASKS - 1) / REPEATABLE_TASKS);
	a.width = (a.width + 15) & ~15;
	blas_threads(1);
	llm_parallel_for(((size_t) N + a.width - 1) / a.width, repeatable_task, &a);
	blas_follow_share = follow;
	if (!follow)
		blas_threads(before);
}
