/*
 * blas.c: open the BLAS library at run time.
 *
 * OpenBLAS starts its worker threads when it is loaded. Threads inherit the signal mask of the
 * thread that creates them, so we open the library with every signal blocked: PostgreSQL's
 * handlers (SIGINT for cancel, SIGALRM for statement_timeout, ...) then only ever run on the
 * backend's own thread, which is the only thread that may touch PostgreSQL state.
 */
#include "pg_llm.h"
#include "blas.h"
#include "parallel.h"

#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"

llm_sgemm_fn llm_cblas_sgemm = NULL;

/* pg_llm.blas_library: a BLAS of the administrator's choice, tried alone ("" = the list below). */
static char *blas_library = NULL;

typedef void (*set_threads_fn) (int);
typedef int (*get_threads_fn) (void);

static void blas_threads(int want);
static void sgemm_in_share(int order, int transa, int transb, int m, int n, int k, float alpha,
						   const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);

static void *blas_handle = NULL;
static const char *blas_name = NULL;
static llm_sgemm_fn blas_sgemm = NULL;	/* the library's own */
static set_threads_fn blas_set_threads = NULL;
static int	blas_threads_set = -1;
static bool blas_follow_share = false;	/* set threads to llm_num_threads() before each product */

/* Libraries tried in order: OpenBLAS (Debian's libopenblas0), then the reference CBLAS. */
static const char *const blas_candidates[] = {
	"libopenblas.so.0", "libopenblas.so", "libcblas.so.3", "libblas.so.3",
};

/*
 * Prefixes of the symbols: none, or scipy_ (PyPI's scipy-openblas32 wheel, which a server installed
 * without root uses: its libscipy_openblas.so exports scipy_cblas_sgemm).
 */
static const char *const blas_prefixes[] = {"", "scipy_"};

void
llm_blas_define_settings(void)
{
	/* sighup: only an administrator may make the server load a library */
	DefineCustomStringVariable("pg_llm.blas_library",
							   "BLAS library to load: a path, or a name the dynamic linker finds.",
							   "Empty: the system's OpenBLAS (libopenblas.so.0), else the reference CBLAS.",
							   &blas_library, "", PGC_SIGHUP, 0, NULL, NULL, NULL);
}

/* dlopen's handle with cblas_sgemm under one of blas_prefixes, or NULL. */
static void *
open_blas(const char *name)
{
	void	   *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);

	if (h == NULL)
		return NULL;
	for (size_t p = 0; p < lengthof(blas_prefixes); p++)
	{
		blas_sgemm = (llm_sgemm_fn) dlsym(h, psprintf("%scblas_sgemm", blas_prefixes[p]));
		if (blas_sgemm != NULL)
		{
			blas_set_threads = (set_threads_fn) dlsym(h, psprintf("%sopenblas_set_num_threads",
																	blas_prefixes[p]));
			return h;
		}
	}
	dlclose(h);
	return NULL;
}

void
llm_blas_init(void)
{
	if (blas_handle == NULL)
	{
		sigset_t	all,
					old;
		bool		chosen = blas_library != NULL && blas_library[0] != '\0';

		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);

		/*
		 * OpenBLAS's idle workers spin (sched_yield) for 2^28 cycles after each call, competing
		 * with our own worker pool for the cores while plain-C kernels run between products:
		 * about 15% of a training step's CPU time. Let them sleep at once (a wake-up costs
		 * microseconds per product). A value set by the server's environment wins.
		 */
		setenv("OPENBLAS_THREAD_TIMEOUT", "4", 0);
		if (chosen)
		{
			blas_handle = open_blas(blas_library);
			blas_name = MemoryContextStrdup(TopMemoryContext, blas_library);
		}
		for (size_t i = 0; !chosen && i < lengthof(blas_candidates) && blas_handle == NULL; i++)
		{
			blas_handle = open_blas(blas_candidates[i]);
			blas_name = blas_candidates[i];
		}
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

		if (blas_handle == NULL && chosen)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("pg_llm could not load the BLAS library \"%s\"", blas_library),
					 errdetail("It does not open, or has no cblas_sgemm (nor scipy_cblas_sgemm)."),
					 errhint("Set pg_llm.blas_library to an OpenBLAS, or empty for the system's.")));
		if (blas_handle == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("pg_llm could not load a BLAS library"),
					 errdetail("Tried libopenblas.so.0, libopenblas.so, libcblas.so.3 and libblas.so.3."),
					 errhint("Install OpenBLAS on the database server, e.g. apt-get install libopenblas0, "
							 "or set pg_llm.blas_library to the library of pip's scipy-openblas32.")));
	}

	blas_threads(llm_num_threads());
	blas_follow_share = true;
}

/*
 * Threads that BLAS itself uses from now on (until llm_blas_init or this is called again). Callers
 * that split a product over llm_parallel_for and call BLAS from every worker ask for 1.
 */
void
llm_blas_set_threads(int want)
{
	blas_follow_share = false;
	blas_threads(want);
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
 * cblas_sgemm as pg_llm calls it. After llm_blas_init, BLAS runs its own threads (training calls
 * it from the backend's thread): match them first to the session's share of the server's threads,
 * which changes as other sessions start and stop computing.
 */
static void
sgemm_in_share(int order, int transa, int transb, int m, int n, int k, float alpha, const float *a,
			   int lda, const float *b, int ldb, float beta, float *c, int ldc)
{
	if (blas_follow_share)
		blas_threads(llm_num_threads());
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

PG_FUNCTION_INFO_V1(pg_llm_blas_info);
Datum
pg_llm_blas_info(PG_FUNCTION_ARGS)
{
	llm_blas_init();
	PG_RETURN_TEXT_P(cstring_to_text(psprintf("%s, %d threads", blas_name, llm_num_threads())));
}
