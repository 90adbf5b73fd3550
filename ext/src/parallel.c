/*
 * parallel.c: a small pool of worker threads for the plain-C kernels.
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
 */
#include "pg_llm.h"

#include <pthread.h>
#include <signal.h>
#include <time.h>

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
	int			n_workers;		/* threads besides the caller */
	bool		stopping;		/* under lock */
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

static void *
worker_main(void *p)
{
	uint64		seen = TICKET_JOB(__atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST));

	for (;;)
	{
		uint64		t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST);
		uint64		deadline = now_ns() + SPIN_NS;

		for (int i = 1; TICKET_JOB(t) == seen; i++)
		{
			if (i % 64 == 0 && now_ns() > deadline)
			{
				pthread_mutex_lock(&pool.lock);
				while (TICKET_JOB(t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST)) == seen && !pool.stopping)
				{
					pool.sleeping++;
					pthread_cond_wait(&pool.work_ready, &pool.lock);
					pool.sleeping--;
				}
				if (pool.stopping)
				{
					pthread_mutex_unlock(&pool.lock);
					return NULL;
				}
				pthread_mutex_unlock(&pool.lock);
				break;
			}
			cpu_relax();
			t = __atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST);
		}
		seen = TICKET_JOB(t);
		run_shares(t);
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
		if (pthread_create(&pool.threads[i], NULL, worker_main, NULL) != 0)
			break;
		pool.n_workers++;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

void
llm_parallel_for(size_t n, llm_task_fn fn, void *arg)
{
	int			want = llm_num_threads();
	int			parts;
	uint64		ticket;
	uint64		deadline;

	if (pool.n_workers != want - 1 && !(want - 1 > pool.n_workers && pool.n_workers == MAX_WORKERS))
		pool_resize(want);
	if (pool.n_workers == 0 || n < 2)
	{
		fn(arg, 0, n);
		return;
	}

	parts = (int) Min(n, (size_t) pool.n_workers + 1);
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
