/*
 * parallel.c: a small pool of worker threads for the plain-C kernels.
 *
 * The workers run only the kernel functions handed to llm_parallel_for: pure C over float
 * arrays, never PostgreSQL (no palloc, ereport, SPI). They are created with every signal blocked,
 * so PostgreSQL's signal handlers only ever run on the backend's own thread. The calling thread
 * takes the first share of the work itself and returns when all shares are done.
 */
#include "pg_llm.h"

#include <pthread.h>
#include <signal.h>

#define MAX_WORKERS 255

typedef struct Pool
{
	pthread_mutex_t lock;
	pthread_cond_t work_ready;
	pthread_cond_t work_done;
	int			n_workers;		/* threads besides the caller */
	uint64		generation;		/* bumped for each job */
	int			pending;		/* workers still running the current job */
	bool		stopping;
	llm_task_fn fn;
	void	   *arg;
	size_t		n;
	pthread_t	threads[MAX_WORKERS];
} Pool;

static Pool pool = {
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.work_ready = PTHREAD_COND_INITIALIZER,
	.work_done = PTHREAD_COND_INITIALIZER,
};

/* Share `part` of `parts` of [0, n): contiguous ranges of near-equal size. */
static void
share(size_t n, int part, int parts, size_t *start, size_t *end)
{
	*start = n * (size_t) part / (size_t) parts;
	*end = n * (size_t) (part + 1) / (size_t) parts;
}

static void *
worker_main(void *p)
{
	int			id = (int) (intptr_t) p;	/* 1 .. n_workers; the caller is 0 */
	uint64		seen = 0;

	for (;;)
	{
		llm_task_fn fn;
		void	   *arg;
		size_t		n,
					start,
					end;
		int			parts;

		pthread_mutex_lock(&pool.lock);
		while (pool.generation == seen && !pool.stopping)
			pthread_cond_wait(&pool.work_ready, &pool.lock);
		if (pool.stopping)
		{
			pthread_mutex_unlock(&pool.lock);
			return NULL;
		}
		seen = pool.generation;
		fn = pool.fn, arg = pool.arg, n = pool.n, parts = pool.n_workers + 1;
		pthread_mutex_unlock(&pool.lock);

		share(n, id, parts, &start, &end);
		if (start < end)
			fn(arg, start, end);

		pthread_mutex_lock(&pool.lock);
		if (--pool.pending == 0)
			pthread_cond_signal(&pool.work_done);
		pthread_mutex_unlock(&pool.lock);
	}
}

static void
pool_stop(void)
{
	pthread_mutex_lock(&pool.lock);
	pool.stopping = true;
	pthread_cond_broadcast(&pool.work_ready);
	pthread_mutex_unlock(&pool.lock);
	for (int i = 0; i < pool.n_workers; i++)
		pthread_join(pool.threads[i], NULL);
	pool.n_workers = 0;
	pool.stopping = false;
}

/* (Re)start the pool with want-1 workers; on failure run with fewer, never fail the caller. */
static void
pool_resize(int want)
{
	sigset_t	all,
				old;
	int			workers = Min(want - 1, MAX_WORKERS);

	if (pool.n_workers > 0)
		pool_stop();
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (int i = 0; i < workers; i++)
	{
		if (pthread_create(&pool.threads[i], NULL, worker_main, (void *) (intptr_t) (i + 1)) != 0)
			break;
		pool.n_workers++;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

void
llm_parallel_for(size_t n, llm_task_fn fn, void *arg)
{
	int			want = llm_num_threads();
	size_t		start,
				end;

	if (pool.n_workers != want - 1 && !(want - 1 > pool.n_workers && pool.n_workers == MAX_WORKERS))
		pool_resize(want);
	if (pool.n_workers == 0 || n < 2)
	{
		fn(arg, 0, n);
		return;
	}

	pthread_mutex_lock(&pool.lock);
	pool.fn = fn, pool.arg = arg, pool.n = n;
	pool.pending = pool.n_workers;
	pool.generation++;
	pthread_cond_broadcast(&pool.work_ready);
	pthread_mutex_unlock(&pool.lock);

	share(n, 0, pool.n_workers + 1, &start, &end);
	if (start < end)
		fn(arg, start, end);

	pthread_mutex_lock(&pool.lock);
	while (pool.pending > 0)
		pthread_cond_wait(&pool.work_done, &pool.lock);
	pthread_mutex_unlock(&pool.lock);
}
