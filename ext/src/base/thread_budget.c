/*
 * thread_budget.c: how many threads this session may use now (llm_num_threads), the source of
 * the compute layer's thread count (compute/pool.h).
 *
 * pg_llm.threads caps one session (0 = one per core). Alone, a session uses every core. But each
 * backend has its own worker pool (parallel.c) and BLAS threads, so sessions computing at once
 * would together run more threads than there are cores, and spend the difference spinning and
 * waiting for each other's time slices (bench/sessions.py measures it). So the sessions of a
 * server share pg_llm.server_threads threads (0 = one per core): each session that is computing
 * gets an equal share of them, at least one.
 *
 * Sessions find each other through a small file, pgsql_tmp_pg_llm/threads in the data directory
 * (a shared file, shared_file.c, beside the shared weights), that every
 * backend which computes maps: one slot per backend, holding its pid and when it last asked
 * for threads (CLOCK_MONOTONIC). A session counts as computing from its last request until its
 * transaction ends, and for ACTIVE_NS at most: a session idle in its transaction, or one that
 * died, stops counting by itself. The batch runner (runner.c), which has no transaction, says
 * when it has no sequence left (llm_threads_idle): else a session computing alone just after a
 * burst of generation would get half the cores for ACTIVE_NS. Nothing needs
 * shared_preload_libraries; the slots are read and written with atomics only, and a backend that
 * cannot map the file uses pg_llm.threads alone.
 */
#include "base/base.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "access/xact.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/guc.h"

#define BUDGET_FILE LLM_SHARED_DIR "/threads"
#define BUDGET_MAGIC UINT64CONST(0x706731746872310a)	/* the layout below, version 1 */
#define SLOTS 1024
#define ACTIVE_NS (UINT64CONST(2) * 1000000000) /* computing: asked for threads this recently */
#define TOUCH_NS 1000000		/* write the slot's time at most every 1 ms */
#define RECOUNT_NS 10000000		/* count the computing sessions at most every 10 ms */

static int	llm_threads = 0;	/* pg_llm.threads: worker threads for BLAS and kernels; 0 = one per core */
static int	llm_server_threads = 0; /* pg_llm.server_threads: threads all computing sessions share; 0 = one per core */

void
llm_thread_budget_init(void)
{
	DefineCustomIntVariable("pg_llm.threads",
							"Worker threads for matrix products and kernels (0 = one per CPU core).",
							"Applies from the next call that uses the model engine.",
							&llm_threads,
							0, 0, 256,
							PGC_USERSET, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("pg_llm.server_threads",
							"Threads that all sessions computing at once share (0 = one per CPU core).",
							"Each computing session gets an equal share, at least one, and at most pg_llm.threads.",
							&llm_server_threads,
							0, 0, 4096,
							PGC_SUSET, 0,
							NULL, NULL, NULL);
}

typedef struct Slot
{
	int32		pid;			/* atomic: the backend that owns the slot, 0 = free */
	int32		unused;
	uint64		asked;			/* atomic: when it last asked for threads, 0 = not computing */
} Slot;

typedef struct Budget
{
	uint64		magic;			/* atomic: BUDGET_MAGIC once initialised */
	Slot		slots[SLOTS];
} Budget;

static Budget *budget = NULL;	/* the mapped file; NULL until mapped or when it cannot be */
static bool budget_tried = false;
static int	my_slot = -1;
static uint64 last_touch = 0;
static uint64 last_count = 0;
static uint64 next_claim = 0;	/* when every slot was taken: when to look for a free one again */
static int	my_share = 1;		/* of the budget, at the last count */

static uint64
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64) ts.tv_sec * 1000000000 + (uint64) ts.tv_nsec;
}

/* Cores this process may run on (its CPU affinity), asked once. */
static int
cores(void)
{
	static int	n = 0;

	if (n == 0)
	{
		cpu_set_t	set;

		n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : (int) sysconf(_SC_NPROCESSORS_ONLN);
		n = Max(n, 1);
	}
	return n;
}

void
llm_threads_idle(void)
{
	if (budget != NULL && my_slot >= 0)
	{
		__atomic_store_n(&budget->slots[my_slot].asked, 0, __ATOMIC_RELAXED);
		last_touch = 0;
	}
}

/*
 * The transaction ended: this session stops counting as computing until it asks again. A parallel
 * worker (its own slot, sharing the budget like any session) ends its part of the query with the
 * PARALLEL events, before the leader's query returns: else the leader's next statement would count
 * the workers of its last one for ACTIVE_NS and get a fraction of the threads.
 */
static void
budget_xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT || event == XACT_EVENT_PREPARE ||
		event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT)
		llm_threads_idle();
}

static void
budget_map(void)
{
	int			err;
	void	   *p;
	uint64		zero = 0;

	budget_tried = true;
	p = llm_shared_map_or_create(BUDGET_FILE, sizeof(Budget), &err);
	if (p == NULL)
	{
		ereport(LOG,
				(errmsg("pg_llm: sessions will not share threads: cannot map \"%s\": %s", BUDGET_FILE, strerror(err)),
				 errhint("Each session uses pg_llm.threads threads.")));
		return;
	}
	/* a new file is all zeros: claim it; a file of another layout is left alone */
	if (!__atomic_compare_exchange_n(&((Budget *) p)->magic, &zero, BUDGET_MAGIC, false,
									 __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST) && zero != BUDGET_MAGIC)
	{
		munmap(p, sizeof(Budget));
		ereport(LOG,
				(errmsg("pg_llm: sessions will not share threads: \"%s\" has an unknown layout", BUDGET_FILE),
				 errhint("Remove the file; the next session creates it again.")));
		return;
	}
	budget = p;
	RegisterXactCallback(budget_xact_callback, NULL);
}

/* A free slot for this backend (one whose backend has exited, or its own from before); -1: none. */
static int
claim_slot(void)
{
	for (int k = 0; k < SLOTS; k++)
	{
		int			i = (int) ((MyProcPid + k) % SLOTS);
		int32		pid = __atomic_load_n(&budget->slots[i].pid, __ATOMIC_SEQ_CST);

		if (pid == MyProcPid)
			return i;
		if ((pid == 0 || (kill(pid, 0) != 0 && errno == ESRCH)) &&
			__atomic_compare_exchange_n(&budget->slots[i].pid, &pid, MyProcPid, false,
										__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
			return i;
	}
	return -1;
}

/*
 * This session's share of `total` threads: an equal part for every computing session, the
 * remainder one each to the sessions in the first slots.
 */
static int
count_share(int total, uint64 now)
{
	int			computing = 0;
	int			before_me = 0;

	for (int i = 0; i < SLOTS; i++)
	{
		uint64		asked = __atomic_load_n(&budget->slots[i].asked, __ATOMIC_RELAXED);

		/* signed: another backend's clock read may be a little later than ours */
		if (asked != 0 && (int64) (now - asked) < (int64) ACTIVE_NS)
		{
			computing++;
			if (i < my_slot)
				before_me++;
		}
	}
	computing = Max(computing, 1);
	return Max(1, total / computing + (before_me < total % computing ? 1 : 0));
}

int
llm_num_threads(void)
{
	int			want = llm_threads > 0 ? llm_threads : cores();
	int			total = llm_server_threads > 0 ? llm_server_threads : cores();
	uint64		now;

	if (!budget_tried)
		budget_map();
	if (budget == NULL)
		return want;
	now = now_ns();
	if (now - last_touch > TOUCH_NS)
	{
		if ((my_slot < 0 && now >= next_claim) ||
			(my_slot >= 0 && __atomic_load_n(&budget->slots[my_slot].pid, __ATOMIC_SEQ_CST) != MyProcPid))
			my_slot = claim_slot();
		if (my_slot < 0)
		{
			next_claim = now + RECOUNT_NS;
			return 1;			/* more sessions have computed than there are slots */
		}
		__atomic_store_n(&budget->slots[my_slot].asked, now, __ATOMIC_RELAXED);
		if (last_touch == 0)
			last_count = 0;		/* just started: count at once */
		last_touch = now;
	}
	if (now - last_count > RECOUNT_NS)
	{
		my_share = count_share(total, now);
		last_count = now;
	}
	return Min(want, my_share);
}
