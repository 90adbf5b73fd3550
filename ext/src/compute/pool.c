/*
 * pool.c: a small pool of worker threads for the plain-C kernels.
 *
 * The workers run only the kernel functions handed to llm_parallel_for: pure C over float
 * arrays, never PostgreSQL (no palloc, ereport, SPI). They are created with every signal blocked,
 * so PostgreSQL's signal handlers only ever run on the backend's own thread.
 *
 * A job is cut into one share per thread, and shares are claimed, not assigned: the calling
 * thread and the workers each take the next unclaimed share until none is left, and the caller
 * then waits only for shares that a worker has started. A worker that the OS has not scheduled
 * yet (the machine is busy) therefore delays nothing: the caller runs its share too. Threads spin
 * for a short while before they sleep, because in a forward pass jobs follow each other within
 * microseconds, and waking a sleeping thread takes longer than that.
 *
 * The caller writes a job's fields, then publishes its ticket: the job number and the count of
 * shares not yet claimed. A thread claims a share by a compare-and-swap that lowers that count
 * on the very ticket after which it read the fields. A successful claim therefore proves that the
 * job was unfinished when the fields were read (the caller rewrites them only after every share
 * of the job has been claimed and has finished), so they were this job's; a thread that read the
 * fields too late, when the caller was already writing the next job's, finds no share left on
 * the old ticket, or another job's ticket, and claims nothing. The check needs nothing but the
 * ticket: had it compared the shares claimed against the `parts` field it had just read, a late
 * reader could take the next job's larger `parts` for the old job's and claim a share twice.
 *
 * Each call runs on llm_compute_threads() threads, which may change from call to call (the
 * session's share of the server's threads: see base/thread_budget.c). The pool grows to the most threads ever asked
 * for and never shrinks; workers beyond the current count park, without spinning, until a call
 * wants them again.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE				/* sched_getaffinity */
#endif
#include "compute/pool.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#define Min(x, y) ((x) < (y) ? (x) : (y))

typedef uint64_t uint64;

#define MAX_WORKERS 255
#define SPIN_NS 100000			/* spin this long (0.1 ms) before sleeping */

/* The job ticket: job number in the high 48 bits, shares not yet claimed in the low 16. */
#define TICKET_JOB(t) ((t) >> 16)
#define TICKET_LEFT(t) ((int) ((t) & 0xFFFF))

typedef struct Pool
{
	pthread_mutex_t lock;
	pthread_cond_t work_ready;
	pthread_cond_t work_done;
	pthread_cond_t unparked;
	int			n_workers;		/* threads started besides the caller (only the caller reads it) */
	int			most_workers;	/* no more after a thread could not be started (only the caller) */
	int			active;			/* atomic: workers [0, active) take part in jobs, the others park */
	int			sleeping;		/* workers waiting on work_ready, under lock */
	bool		caller_sleeping;	/* the caller waits on work_done, under lock */

	/*
	 * The current job, written by the caller before it publishes the job's ticket, read by
	 * workers that may be late (hence atomic, relaxed: their claim on the ticket orders them).
	 */
	llm_task_fn fn;
	void	   *arg;
	size_t		n;
	int			parts;
	uint64		ticket;			/* atomic */
	int			done;			/* atomic: shares of the current job finished */

	pthread_t	threads[MAX_WORKERS];
} Pool;

static Pool pool = {
	.most_workers = MAX_WORKERS,
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.work_ready = PTHREAD_COND_INITIALIZER,
	.work_done = PTHREAD_COND_INITIALIZER,
	.unparked = PTHREAD_COND_INITIALIZER,
};

/* Share `part` of `parts` of [0, n): contiguous ranges of near-equal size. */
static void
share(size_t n, int part, int parts, size_t *start, size_t *end)
{
	*start = n * (size_t) part / (size_t) parts;
	*end = n * (size_t) (part + 1) / (size_t) parts;
}

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#endif
}

static uint64
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64) ts.tv_sec * 1000000000 + (uint64) ts.tv_nsec;
}

/*
 * Claim and run shares of the job whose ticket this thread saw as `t`, until none is left (or
 * another job has started: this thread came too late, and the job's shares were all claimed).
 */
static void
run_shares(uint64 t)
{
	uint64		job = TICKET_JOB(t);
	llm_task_fn fn = __atomic_load_n(&pool.fn, __ATOMIC_RELAXED);
	void	   *arg = __atomic_load_n(&pool.arg, __ATOMIC_RELAXED);
	size_t		n = __atomic_load_n(&pool.n, __ATOMIC_RELAXED);
	int			parts = __atomic_load_n(&pool.parts, __ATOMIC_RELAXED);

	while (TICKET_JOB(t) == job && TICKET_LEFT(t) > 0)
	{
		size_t		start,
					end;

		/* success proves the fields read above are this job's (see the top of the file) */
		if (!__atomic_compare_exchange_n(&pool.ticket, &t, t - 1, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
			continue;			/* t now holds the current ticket */
		share(n, parts - TICKET_LEFT(t), parts, &start, &end);
		if (start < end)
			fn(arg, start, end);
		if (__atomic_add_fetch(&pool.done, 1, __ATOMIC_SEQ_CST) == parts)
		{
			pthread_mutex_lock(&pool.lock);
			if (pool.caller_sleeping)
				pthread_cond_signal(&pool.work_done);
			pthread_mutex_unlock(&pool.lock);
		}
		t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST);
	}
}

/* Sleep while this worker is beyond the number taking part (the session's share of threads). */
static void
park(int self)
{
	pthread_mutex_lock(&pool.lock);
	while (self >= __atomic_load_n(&pool.active, __ATOMIC_SEQ_CST))
		pthread_cond_wait(&pool.unparked, &pool.lock);
	pthread_mutex_unlock(&pool.lock);
}

static void *
worker_main(void *p)
{
	int			self = (int) (intptr_t) p;
	uint64		seen = TICKET_JOB(__atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST));

	for (;;)
	{
		uint64		t;
		uint64		deadline;

		if (self >= __atomic_load_n(&pool.active, __ATOMIC_SEQ_CST))
			park(self);
		t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST);
		deadline = now_ns() + SPIN_NS;
		for (int i = 1; TICKET_JOB(t) == seen; i++)
		{
			if (i % 64 == 0 && (now_ns() > deadline || self >= __atomic_load_n(&pool.active, __ATOMIC_SEQ_CST)))
			{
				pthread_mutex_lock(&pool.lock);
				while (TICKET_JOB(t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST)) == seen &&
					   self < __atomic_load_n(&pool.active, __ATOMIC_SEQ_CST))
				{
					pool.sleeping++;
					pthread_cond_wait(&pool.work_ready, &pool.lock);
					pool.sleeping--;
				}
				pthread_mutex_unlock(&pool.lock);
				break;
			}
			cpu_relax();
			t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST);
		}
		if (TICKET_JOB(t) != seen)
		{
			seen = TICKET_JOB(t);
			run_shares(t);
		}
	}
	return NULL;
}

/* Start workers up to `workers` in all; on failure run with fewer from then on, never fail the caller. */
static void
pool_grow(int workers)
{
	sigset_t	all,
				old;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	while (pool.n_workers < workers)
	{
		if (pthread_create(&pool.threads[pool.n_workers], NULL, worker_main, (void *) (intptr_t) pool.n_workers) != 0)
		{
			pool.most_workers = pool.n_workers;
			break;
		}
		pool.n_workers++;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Let workers [0, workers) take part in the next jobs, and park the others. */
static void
pool_activate(int workers)
{
	int			before = __atomic_load_n(&pool.active, __ATOMIC_RELAXED);

	if (workers == before)
		return;
	__atomic_store_n(&pool.active, workers, __ATOMIC_SEQ_CST);
	if (workers > before)
	{
		pthread_mutex_lock(&pool.lock);
		pthread_cond_broadcast(&pool.unparked);
		pthread_mutex_unlock(&pool.lock);
	}
}

static llm_thread_source thread_source = NULL;

void
llm_compute_set_thread_source(llm_thread_source source)
{
	thread_source = source;
}

int
llm_compute_threads(void)
{
	static int	cpus = 0;

	if (thread_source != NULL)
		return thread_source();
	if (cpus == 0)
	{
		cpu_set_t	set;

		cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
	}
	return cpus;
}

void
llm_parallel_for(size_t n, llm_task_fn fn, void *arg)
{
	llm_parallel_for_shares(n, 1, fn, arg);
}

void
llm_parallel_for_shares(size_t n, int per_thread, llm_task_fn fn, void *arg)
{
	int			workers = Min(llm_compute_threads() - 1, pool.most_workers);
	int			parts;
	uint64		ticket;
	uint64		deadline;

	if (workers > pool.n_workers)
		pool_grow(workers);
	workers = Min(workers, pool.n_workers);
	pool_activate(workers);
	if (workers == 0 || n < 2)
	{
		fn(arg, 0, n);
		return;
	}

	parts = (int) Min(Min(n, ((size_t) workers + 1) * (size_t) per_thread), (size_t) 0xFFFF);
	__atomic_store_n(&pool.fn, fn, __ATOMIC_RELAXED);
	__atomic_store_n(&pool.arg, arg, __ATOMIC_RELAXED);
	__atomic_store_n(&pool.n, n, __ATOMIC_RELAXED);
	__atomic_store_n(&pool.parts, parts, __ATOMIC_RELAXED);
	__atomic_store_n(&pool.done, 0, __ATOMIC_RELAXED);
	ticket = ((TICKET_JOB(__atomic_load_n(&pool.ticket, __ATOMIC_RELAXED)) + 1) << 16) | (uint64) parts;
	__atomic_store_n(&pool.ticket, ticket, __ATOMIC_SEQ_CST);	/* publishes the job */
	pthread_mutex_lock(&pool.lock);
	if (pool.sleeping > 0)
		pthread_cond_broadcast(&pool.work_ready);
	pthread_mutex_unlock(&pool.lock);

	run_shares(ticket);

	/* what is left are shares that workers claimed and are running */
	deadline = now_ns() + SPIN_NS;
	for (int i = 1; __atomic_load_n(&pool.done, __ATOMIC_SEQ_CST) < parts; i++)
	{
		if (i % 64 == 0 && now_ns() > deadline)
		{
			pthread_mutex_lock(&pool.lock);
			while (__atomic_load_n(&pool.done, __ATOMIC_SEQ_CST) < parts)
			{
				pool.caller_sleeping = true;
				pthread_cond_wait(&pool.work_done, &pool.lock);
				pool.caller_sleeping = false;
			}
			pthread_mutex_unlock(&pool.lock);
			break;
		}
		cpu_relax();
	}
}
