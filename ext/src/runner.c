/*
 * runner.c: continuous batching across sessions. One background worker per (database, model,
 * weights_version, precision), the model's batch runner, runs the forward passes of every session
 * that generates with that copy of the weights: each step is one pass over the weights for all the
 * sequences waiting at that moment, which join and leave as they start and finish.
 *
 * Why this design, on PostgreSQL 15 without shared_preload_libraries:
 * - A background worker, registered on demand (RegisterDynamicBackgroundWorker), not a leader
 *   elected among the waiting backends: a leader's own statement would end, be cancelled or fail
 *   while others still need the steps it runs, and its key/value caches would have to move. The
 *   runner belongs to no statement; each session's cancel, timeout and errors stay its own.
 * - Decode is bound by reading the weights, so a step for 8 sequences costs little more than a step
 *   for one (infer.h's row slots, the engine of llm_generate_batch, whose rows never affect each
 *   other's results: a sequence gets the very logits it would compute alone).
 * - The runner returns logits; the session samples and decides when to stop, as it does alone
 *   (sample.c, the tokenizer, streaming): the runner runs no user-controlled code besides the
 *   forward pass, and an error in one sequence (a non-finite logit, a cancel) is its caller's only.
 * - Sessions and runner share one small file per runner, beside the weights it serves:
 *   pgsql_tmp_pg_llm/<the weights' file>.runner, mapped by both (a header, then one slot per
 *   sequence: state, prompt tokens, logits). It is found by its name, which a DSM segment could
 *   not be without a registry in shared memory that PG 15 gives an extension only at server start.
 *   Base backups skip it (pgsql_tmp*), it never goes to WAL, and a standby runs its own runners.
 * - Signals are latches: a session sets the runner's latch when it posts a request, the runner
 *   sets the session's when the logits are ready. Slot states change with atomics only.
 * - The runner holds an exclusive flock on its file while it lives: the kernel drops it however the
 *   runner ends, so a session never waits on a runner that is gone; a runner that exits sets its
 *   state to stopped and wakes its sessions, which end their statements with an error. A runner
 *   killed by a signal makes the postmaster restart the server, as any crashed backend does.
 * - An idle runner exits after RUNNER_IDLE_MS; the next session starts a new one (a few ms).
 *
 * A session computes alone when the runner is not available: pg_llm.batch_sessions = 0, a private
 * copy of the weights, no free background worker (max_worker_processes) or no free slot.
 */
#include "pg_llm.h"
#include "infer.h"
#include "privileges.h"
#include "runner.h"
#include "served.h"
#include "weights_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file_perm.h"
#include "storage/fd.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "port/atomics.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#define RUNNER_SUFFIX ".runner"
#define RUNNER_MAGIC UINT64CONST(0x706c6c6d72756e32)	/* this layout, version 2 */
#define RUNNER_HEADER_BYTES 4096
#define RUNNER_IDLE_MS 10000	/* a runner without sequences exits after this long */
#define GATHER_MS 5				/* a step waits at most this long for the sequences of the last */
#define LIVENESS_MS 1000		/* a waiting session checks this often that its runner lives */

int			llm_batch_sessions = 16;

/* A slot's state: who acts next. */
enum
{
	SLOT_FREE,					/* a session may claim it */
	SLOT_OWNED,					/* a session's, between requests */
	SLOT_PROMPT,				/* request: a new sequence, n_tokens prompt tokens */
	SLOT_STEP,					/* request: the next token, tokens[0] */
	SLOT_RUNNING,				/* the runner computes it */
	SLOT_DONE,					/* logits ready; the session's again */
	SLOT_ABANDONED				/* the session left (error, cancel): the runner frees it */
};

/* The runner's state. */
enum
{
	RUNNER_STARTING,
	RUNNER_READY,
	RUNNER_STOPPING,			/* idle, about to exit unless a session claimed a slot meanwhile */
	RUNNER_STOPPED
};

typedef struct RunnerHeader
{
	uint64		magic;
	uint64		file_bytes;
	LlmConfig	cfg;
	Oid			database;
	int32		precision;		/* LlmPrecision */
	int32		simd;			/* LlmSimdLevel of the kernels: results depend on it */
	int32		n_slots;
	int32		max_prompt;		/* tokens a slot's prompt may have */
	int32		max_positions;	/* positions a slot's sequence may have, prompt and generated */
	uint64		slot_bytes;
	pg_atomic_uint32 state;
	int32		starter_procno; /* the session that started it, woken when it is ready */
	int32		pid;			/* the runner's, once ready */
	int32		procno;
	/* figures, written by the runner only */
	pg_atomic_uint64 sequences; /* prompts run */
	pg_atomic_uint64 steps;		/* decode steps run */
	pg_atomic_uint64 rows;		/* sequences those steps ran (rows / steps: the batch) */
	pg_atomic_uint32 active;	/* slots not free at the last look */
	uint64		cache_bytes;	/* the key/value cache the runner reserved, once ready */
} RunnerHeader;

StaticAssertDecl(sizeof(RunnerHeader) <= RUNNER_HEADER_BYTES, "the header must fit its page");

/* One sequence's place; then int32 tokens[max_prompt] and float logits[V], each 64-byte aligned. */
typedef struct RunnerSlot
{
	pg_atomic_uint32 state;
	int32		owner_pid;		/* 0 while free */
	int32		owner_procno;
	int32		n_tokens;
} RunnerSlot;

#define SLOT_TOKENS_AT 64

static size_t
tokens_bytes(int max_prompt)
{
	return TYPEALIGN(64, sizeof(int32) * (size_t) max_prompt);
}

static size_t
slot_bytes(int max_prompt, int vocab)
{
	return SLOT_TOKENS_AT + tokens_bytes(max_prompt) + TYPEALIGN(64, sizeof(float) * (size_t) vocab);
}

static RunnerSlot *
slot_at(RunnerHeader *h, int s)
{
	return (RunnerSlot *) ((char *) h + RUNNER_HEADER_BYTES + h->slot_bytes * (size_t) s);
}

static int32 *
slot_tokens(RunnerHeader *h, int s)
{
	return (int32 *) ((char *) slot_at(h, s) + SLOT_TOKENS_AT);
}

static float *
slot_logits(RunnerHeader *h, int s)
{
	return (float *) ((char *) slot_tokens(h, s) + tokens_bytes(h->max_prompt));
}

static void
wake(int procno)
{
	if (procno >= 0)
		SetLatch(&GetPGProcByNumber(procno)->procLatch);
}

/* Whether a runner holds its exclusive lock on the file open at fd. */
static bool
runner_alive(int fd)
{
	if (flock(fd, LOCK_SH | LOCK_NB) == 0)
	{
		(void) flock(fd, LOCK_UN);
		return false;
	}
	return errno == EWOULDBLOCK;
}

void
llm_runner_init(void)
{
	DefineCustomIntVariable("pg_llm.batch_sessions",
							"Sequences that a model's batch runner decodes at once for all sessions (0 = each session computes alone).",
							"Sessions generating with the same model and precision at the same time share each pass over the weights. "
							"The session that starts a runner sets its number of slots; when all are taken, a session computes alone.",
							&llm_batch_sessions,
							16, 0, LLM_BATCH_ROWS_MAX,
							PGC_SUSET, 0,
							NULL, NULL, NULL);
}

/* ---- the session's side -------------------------------------------------------------------- */

/* A runner's file mapped by this session. */
typedef struct RunnerMap
{
	char		path[MAXPGPATH];
	int			fd;
	RunnerHeader *h;
	int			users;			/* this session's sequences in it: mapped until they end */
} RunnerMap;

struct LlmRunnerSeq
{
	RunnerMap  *map;
	int			slot;
	ResourceOwner owner;		/* released: the sequence is abandoned */
};

static RunnerMap *current_map = NULL;	/* the runner this session used last */
static TimestampTz start_failed_at = 0; /* no runner could start: computing alone for a while */
static List *held = NIL;		/* LlmRunnerSeq *, in TopMemoryContext */
static bool callback_registered = false;

static void
unmap(RunnerMap *map)
{
	if (map->h != NULL)
		(void) munmap(map->h, map->h->file_bytes);
	if (map->fd >= 0)
		close(map->fd);
	pfree(map);
}

/* Maps the runner file at path; NULL when absent or not one. */
static RunnerMap *
map_file(const char *path)
{
	int			fd = open(path, O_RDWR | O_CLOEXEC);
	struct stat st;
	RunnerMap  *map;
	void	   *base;

	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) != 0 || st.st_size < RUNNER_HEADER_BYTES ||
		(base = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED)
	{
		close(fd);
		return NULL;
	}
	map = MemoryContextAllocZero(TopMemoryContext, sizeof(RunnerMap));
	strlcpy(map->path, path, sizeof(map->path));
	map->fd = fd;
	map->h = base;
	if (map->h->magic != RUNNER_MAGIC || map->h->file_bytes != (uint64) st.st_size)
	{
		unmap(map);
		return NULL;
	}
	return map;
}

/* A live, ready runner of exactly m's weights. */
static bool
serves(RunnerMap *map, const LlmModel *m)
{
	RunnerHeader *h = map->h;
	const LlmConfig *a = &h->cfg,
			   *b = &m->cfg;

	return pg_atomic_read_u32(&h->state) == RUNNER_READY && h->database == MyDatabaseId &&
		h->precision == m->precision && h->simd == (int32) llm_simd_level() && strcmp(a->model, b->model) == 0 &&
		a->weights_version == b->weights_version && a->table_oid == b->table_oid &&
		a->n_layer == b->n_layer && a->n_head == b->n_head && a->d_model == b->d_model &&
		a->n_positions == b->n_positions && a->vocab == b->vocab && runner_alive(map->fd);
}

/* A new runner file at path for m (the caller holds the start lock); NULL when it cannot be made. */
static RunnerMap *
create_file(const char *path, const LlmModel *m, int n_slots)
{
	char	   *tmp = psprintf("%s.new", path);
	size_t		per_slot = slot_bytes(m->cfg.n_positions, m->cfg.vocab);
	size_t		bytes = RUNNER_HEADER_BYTES + per_slot * n_slots;
	int			fd;
	RunnerHeader *h;
	RunnerMap  *map;

	(void) unlink(tmp);
	fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, pg_file_create_mode);
	if (fd < 0)
		return NULL;
	/* blocks allocated now: a full disk is a failure here, never a SIGBUS through the mapping */
	if (posix_fallocate(fd, 0, (off_t) bytes) != 0 ||
		(h = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED)
	{
		close(fd);
		(void) unlink(tmp);
		return NULL;
	}
	memset(h, 0, RUNNER_HEADER_BYTES);
	h->file_bytes = bytes;
	h->cfg = m->cfg;
	h->database = MyDatabaseId;
	h->precision = m->precision;
	h->simd = (int32) llm_simd_level();
	h->n_slots = n_slots;
	h->max_prompt = m->cfg.n_positions;
	h->max_positions = m->cfg.n_positions;	/* a prompt and what follows it fit the context */
	h->slot_bytes = per_slot;
	pg_atomic_init_u32(&h->state, RUNNER_STARTING);
	h->starter_procno = LLM_MY_PROCNO;
	h->pid = 0;
	h->procno = -1;
	pg_atomic_init_u64(&h->sequences, 0);
	pg_atomic_init_u64(&h->steps, 0);
	pg_atomic_init_u64(&h->rows, 0);
	pg_atomic_init_u32(&h->active, 0);
	for (int s = 0; s < n_slots; s++)
	{
		RunnerSlot *slot = slot_at(h, s);

		pg_atomic_init_u32(&slot->state, SLOT_FREE);
		slot->owner_pid = 0;
		slot->owner_procno = -1;
	}
	pg_write_barrier();
	h->magic = RUNNER_MAGIC;
	if (rename(tmp, path) != 0)
	{
		(void) munmap(h, bytes);
		close(fd);
		(void) unlink(tmp);
		return NULL;
	}
	map = MemoryContextAllocZero(TopMemoryContext, sizeof(RunnerMap));
	strlcpy(map->path, path, sizeof(map->path));
	map->fd = fd;
	map->h = h;
	return map;
}

/* Starts the runner of the new file; true once it is ready. */
static bool
start_runner(RunnerMap *map)
{
	BackgroundWorker worker = {0};
	BackgroundWorkerHandle *handle;
	pid_t		pid;

	if (strlen(map->path) >= sizeof(worker.bgw_extra))
		return false;
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_ConsistentState;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "pg_llm", sizeof(worker.bgw_library_name));
	strlcpy(worker.bgw_function_name, "llm_runner_main", sizeof(worker.bgw_function_name));
	snprintf(worker.bgw_name, sizeof(worker.bgw_name), "pg_llm batch runner for model %s", map->h->cfg.model);
	strlcpy(worker.bgw_type, "pg_llm batch runner", sizeof(worker.bgw_type));
	strlcpy(worker.bgw_extra, map->path, sizeof(worker.bgw_extra));
	worker.bgw_notify_pid = MyProcPid;
	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
	{
		ereport(DEBUG1,
				(errmsg_internal("pg_llm: no background worker free for a batch runner (max_worker_processes): computing alone")));
		return false;
	}
	if (WaitForBackgroundWorkerStartup(handle, &pid) != BGWH_STARTED)
		return false;
	for (;;)
	{
		uint32		state = pg_atomic_read_u32(&map->h->state);

		if (state == RUNNER_READY)
			return true;
		if (state != RUNNER_STARTING || GetBackgroundWorkerPid(handle, &pid) == BGWH_STOPPED)
			return false;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 10, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/* The runner of m's weights (whose shared file is weights_path), started first if need be. */
static RunnerMap *
find_runner(const char *weights_path, const LlmModel *m)
{
	char	   *path = psprintf("%s%s", weights_path, RUNNER_SUFFIX);
	char	   *lock_path = psprintf("%s.start", path);
	RunnerMap  *volatile map = NULL;
	volatile int lock = -1;

	if (current_map != NULL && strcmp(current_map->path, path) == 0 && serves(current_map, m))
		return current_map;
	if (current_map != NULL)
	{
		/* a stream of this session still in it (an open cursor) unmaps it when it ends */
		if (current_map->users == 0)
			unmap(current_map);
		current_map = NULL;
	}
	map = map_file(path);
	if (map != NULL && serves(map, m))
		return current_map = map;
	if (map != NULL)
		unmap(map);
	map = NULL;

	/* none running: start one, unless another session is starting it (then use that one) */
	if (start_failed_at != 0 && !TimestampDifferenceExceeds(start_failed_at, GetCurrentTimestamp(), LIVENESS_MS))
		return NULL;
	PG_TRY();
	{
		/* the slot argument holds the descriptor while it waits, for the cleanup below */
		while ((lock = llm_open_locked(lock_path, LOCK_EX, true, (int *) &lock)) < 0)
			if (errno != ENOENT)
				break;
		if (lock >= 0)
		{
			bool		other = false;	/* a live runner that serves sessions of another pg_llm.simd */

			map = map_file(path);
			if (map != NULL && !serves(map, m))
			{
				other = runner_alive(map->fd);
				unmap(map);
				map = NULL;
			}
			if (map == NULL && !other && (map = create_file(path, m, llm_batch_sessions)) != NULL && !start_runner(map))
			{
				unmap(map);
				map = NULL;
				start_failed_at = GetCurrentTimestamp();
			}
			close(lock);
			lock = -1;
		}
	}
	PG_CATCH();
	{
		/* a cancel while the new runner starts: its file stays for it, this session lets go */
		if (map != NULL)
			unmap(map);
		if (lock >= 0)
			close(lock);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return current_map = map;
}

/* Leaves the sequence's slot: free for the next one, or abandoned while the runner may hold it. */
static void
seq_release(LlmRunnerSeq *q)
{
	RunnerHeader *h = q->map->h;
	RunnerSlot *slot = slot_at(h, q->slot);
	uint32		state = pg_atomic_read_u32(&slot->state);

	slot->owner_pid = 0;
	for (;;)
	{
		uint32		next = (state == SLOT_OWNED || state == SLOT_DONE) ? SLOT_FREE : SLOT_ABANDONED;

		if (pg_atomic_compare_exchange_u32(&slot->state, &state, next))
			break;
	}
	wake(h->procno);
	held = list_delete_ptr(held, q);
	if (--q->map->users == 0 && q->map != current_map)
		unmap(q->map);
	pfree(q);
}

/* Statement, cursor or transaction ends (an error or cancel too): its sequences are given back. */
static void
release_callback(ResourceReleasePhase phase, bool isCommit, bool isTopLevel, void *arg)
{
	ListCell   *lc;

	if (phase != RESOURCE_RELEASE_AFTER_LOCKS)
		return;
	foreach(lc, held)
	{
		LlmRunnerSeq *q = lfirst(lc);

		if (q->owner == CurrentResourceOwner)
		{
			seq_release(q);
			release_callback(phase, isCommit, isTopLevel, arg);	/* the list changed */
			return;
		}
	}
}

LlmRunnerSeq *
llm_runner_begin(const LlmModel *m)
{
	const char *weights_path;
	RunnerMap  *map;
	RunnerHeader *h;
	LlmRunnerSeq *q;

	if (llm_batch_sessions == 0 || CurrentResourceOwner == NULL ||
		(weights_path = llm_model_shared_path(m)) == NULL)
		return NULL;
	if ((map = find_runner(weights_path, m)) == NULL)
		return NULL;
	h = map->h;
	for (int s = 0; s < h->n_slots; s++)
	{
		RunnerSlot *slot = slot_at(h, s);
		uint32		state = SLOT_FREE;

		if (pg_atomic_read_u32(&slot->state) != SLOT_FREE ||
			!pg_atomic_compare_exchange_u32(&slot->state, &state, SLOT_OWNED))
			continue;
		slot->owner_procno = LLM_MY_PROCNO;
		slot->owner_pid = MyProcPid;
		if (!callback_registered)
		{
			RegisterResourceReleaseCallback(release_callback, NULL);
			callback_registered = true;
		}
		q = MemoryContextAllocZero(TopMemoryContext, sizeof(LlmRunnerSeq));
		q->map = map;
		map->users++;
		q->slot = s;
		q->owner = CurrentResourceOwner;
		{
			MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

			held = lappend(held, q);
			MemoryContextSwitchTo(old);
		}

		/* claimed while the runner was deciding to exit: it may be gone, compute alone */
		if (pg_atomic_read_u32(&h->state) != RUNNER_READY)
		{
			seq_release(q);
			return NULL;
		}
		return q;
	}
	return NULL;				/* every slot taken */
}

/* Posts the slot's request and waits for its logits. */
static const float *
request(LlmRunnerSeq *q, uint32 what)
{
	RunnerHeader *h = q->map->h;
	RunnerSlot *slot = slot_at(h, q->slot);

	pg_atomic_write_u32(&slot->state, what);
	pg_memory_barrier();
	wake(h->procno);
	for (;;)
	{
		int			rc;

		if (pg_atomic_read_u32(&slot->state) == SLOT_DONE)
		{
			pg_read_barrier();
			return slot_logits(h, q->slot);
		}
		if (pg_atomic_read_u32(&h->state) == RUNNER_STOPPED)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("the batch runner of model \"%s\" stopped during generation", h->cfg.model),
					 errdetail("Sessions generating with this model at the same time share one background worker; it exited (see the server log)."),
					 errhint("Run the statement again.")));
		rc = WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, LIVENESS_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		/* killed without its exit callback: nobody else says so */
		if ((rc & WL_TIMEOUT) && !runner_alive(q->map->fd))
			pg_atomic_write_u32(&h->state, RUNNER_STOPPED);
	}
}

const float *
llm_runner_prompt(LlmRunnerSeq *q, const int32 *tokens, int T)
{
	RunnerHeader *h = q->map->h;

	Assert(T >= 1 && T <= h->max_prompt);
	memcpy(slot_tokens(h, q->slot), tokens, sizeof(int32) * T);
	slot_at(h, q->slot)->n_tokens = T;
	pg_write_barrier();
	return request(q, SLOT_PROMPT);
}

const float *
llm_runner_step(LlmRunnerSeq *q, int32 token)
{
	RunnerHeader *h = q->map->h;

	slot_tokens(h, q->slot)[0] = token;
	slot_at(h, q->slot)->n_tokens = 1;
	pg_write_barrier();
	return request(q, SLOT_STEP);
}

void
llm_runner_end(LlmRunnerSeq *q)
{
	if (q != NULL)
		seq_release(q);
}

/* ---- the runner ---------------------------------------------------------------------------- */

static RunnerHeader *runner_h = NULL;
static int	runner_fd = -1;
static char runner_path[MAXPGPATH];
static char weights_path[MAXPGPATH];	/* the shared copy it serves */
static struct stat weights_stat;

/* A new weights_version (or the eviction of this one) unlinked the copy: no new sequence will come. */
static bool
weights_replaced(void)
{
	struct stat st;

	return stat(weights_path, &st) != 0 || st.st_ino != weights_stat.st_ino || st.st_dev != weights_stat.st_dev;
}

/* However the runner ends: its sessions learn it now, and the file goes if nobody starts another. */
static void
runner_exit(int code, Datum arg)
{
	RunnerHeader *h = runner_h;
	char	   *lock_path;
	int			lock;

	if (h == NULL)
		return;
	llm_threads_idle();
	pg_atomic_write_u32(&h->state, RUNNER_STOPPED);
	pg_memory_barrier();
	wake(h->starter_procno);
	for (int s = 0; s < h->n_slots; s++)
		if (pg_atomic_read_u32(&slot_at(h, s)->state) != SLOT_FREE)
			wake(slot_at(h, s)->owner_procno);

	/* remove the file (and its lock file) unless a session is starting a new runner right now */
	lock_path = psprintf("%s.start", runner_path);
	lock = open(lock_path, O_RDWR | O_CLOEXEC);
	if (lock >= 0 && flock(lock, LOCK_EX | LOCK_NB) == 0)
	{
		struct stat a,
					b;

		if (stat(runner_path, &a) == 0 && fstat(runner_fd, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev)
			(void) unlink(runner_path);
		(void) unlink(lock_path);
	}
	if (lock >= 0)
		close(lock);
	runner_h = NULL;
}

/* The slot's logits are written: the session's turn (or the slot is free when it left). */
static void
complete(RunnerHeader *h, int s)
{
	RunnerSlot *slot = slot_at(h, s);
	uint32		running = SLOT_RUNNING;

	pg_write_barrier();
	if (pg_atomic_compare_exchange_u32(&slot->state, &running, SLOT_DONE))
		wake(slot->owner_procno);
	else
		pg_atomic_write_u32(&slot->state, SLOT_FREE);	/* abandoned meanwhile */
}

/* Frees the slots of sessions that left or are gone; counts those in use (none: stops counting as computing). */
static int
sweep(RunnerHeader *h, bool check_owners)
{
	int			active = 0;

	for (int s = 0; s < h->n_slots; s++)
	{
		RunnerSlot *slot = slot_at(h, s);
		uint32		state = pg_atomic_read_u32(&slot->state);

		if (state == SLOT_ABANDONED)
		{
			slot->owner_pid = 0;
			if (pg_atomic_compare_exchange_u32(&slot->state, &state, SLOT_FREE))
				continue;
		}
		if (state == SLOT_FREE)
			continue;
		/* a backend that ended without giving its slot back (it exited before its cleanup) */
		if (check_owners && slot->owner_pid != 0 && kill(slot->owner_pid, 0) != 0 && errno == ESRCH &&
			pg_atomic_compare_exchange_u32(&slot->state, &state, SLOT_FREE))
			continue;
		active++;
	}
	if (active == 0)
		llm_threads_idle();		/* no sequence left: the cores are the sessions' again */
	pg_atomic_write_u32(&h->active, active);
	return active;
}

/* Whether a slot of the last step is still with its session (sampling its next token). */
static bool
awaiting(RunnerHeader *h, const int *rows, int n)
{
	for (int i = 0; i < n; i++)
		if (pg_atomic_read_u32(&slot_at(h, rows[i])->state) == SLOT_DONE)
			return true;
	return false;
}

static void
runner_wait(long ms)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
}

/* Runs the requests: the new sequences' prompts (sharing passes), then one step for all the others. */
static void
serve(RunnerHeader *h, LlmInfer *inf)
{
	MemoryContext step_cxt = AllocSetContextCreate(TopMemoryContext, "pg_llm runner step", ALLOCSET_DEFAULT_SIZES);
	int			V = h->cfg.vocab;
	int		   *rows = palloc(sizeof(int) * h->n_slots);	/* of the step */
	int32	   *tokens = palloc(sizeof(int32) * h->n_slots);
	int		   *prompts = palloc(sizeof(int) * h->n_slots);	/* new sequences */
	const int32 **prompt_ids = palloc(sizeof(int32 *) * h->n_slots);
	int		   *prompt_len = palloc(sizeof(int) * h->n_slots);
	int		   *last = palloc(sizeof(int) * h->n_slots);	/* the slots served last time */
	int			n_last = 0;
	TimestampTz last_end = 0,
				idle_since = GetCurrentTimestamp(),
				last_sweep = 0;

	for (;;)
	{
		int			n = 0,
					n_prompts = 0,
					requests = 0;
		TimestampTz now = GetCurrentTimestamp();
		bool		check_owners = TimestampDifferenceExceeds(last_sweep, now, LIVENESS_MS);
		int			active;

		CHECK_FOR_INTERRUPTS();
		if (check_owners)
			last_sweep = now;
		active = sweep(h, check_owners);
		for (int s = 0; s < h->n_slots; s++)
		{
			uint32		state = pg_atomic_read_u32(&slot_at(h, s)->state);

			requests += (state == SLOT_PROMPT || state == SLOT_STEP);
		}
		if (requests == 0)
		{
			if (active > 0)
				idle_since = now;
			else if (TimestampDifferenceExceeds(idle_since, now, RUNNER_IDLE_MS) || weights_replaced())
			{
				uint32		ready = RUNNER_READY;

				/* a session that claims a slot now sees STOPPING and computes alone */
				if (pg_atomic_compare_exchange_u32(&h->state, &ready, RUNNER_STOPPING))
				{
					pg_memory_barrier();
					if (sweep(h, false) == 0)
						proc_exit(0);
					pg_atomic_write_u32(&h->state, RUNNER_READY);
				}
				idle_since = now;
			}
			runner_wait(LIVENESS_MS);
			continue;
		}
		idle_since = now;

		/* the sequences served last come back within microseconds: one step for them all */
		if (n_last > 0 && awaiting(h, last, n_last) &&
			!TimestampDifferenceExceeds(last_end, now, GATHER_MS))
		{
			runner_wait(1);
			continue;
		}

		MemoryContextReset(step_cxt);
		MemoryContextSwitchTo(step_cxt);
		for (int s = 0; s < h->n_slots; s++)
		{
			RunnerSlot *slot = slot_at(h, s);
			uint32		state = SLOT_PROMPT;

			if (pg_atomic_compare_exchange_u32(&slot->state, &state, SLOT_RUNNING))
				prompts[n_prompts++] = s;
			else if (state == SLOT_STEP && pg_atomic_compare_exchange_u32(&slot->state, &state, SLOT_RUNNING))
			{
				rows[n] = s;
				tokens[n++] = slot_tokens(h, s)[0];
			}
		}
		pg_read_barrier();
		if (n_prompts > 0)
		{
			/* the new sequences' prompts share passes over the weights */
			const float *logits;

			for (int i = 0; i < n_prompts; i++)
			{
				prompt_ids[i] = slot_tokens(h, prompts[i]);
				prompt_len[i] = Min(Max(slot_at(h, prompts[i])->n_tokens, 1), h->max_prompt);
			}
			logits = llm_infer_prompt_rows(inf, n_prompts, prompts, prompt_ids, prompt_len);
			for (int i = 0; i < n_prompts; i++)
			{
				memcpy(slot_logits(h, prompts[i]), logits + (size_t) i * V, sizeof(float) * V);
				complete(h, prompts[i]);
			}
		}
		if (n > 0)
		{
			const float *logits = llm_infer_step_rows(inf, rows, n, tokens);

			for (int i = 0; i < n; i++)
			{
				memcpy(slot_logits(h, rows[i]), logits + (size_t) i * V, sizeof(float) * V);
				complete(h, rows[i]);
			}
			pg_atomic_fetch_add_u64(&h->steps, 1);
			pg_atomic_fetch_add_u64(&h->rows, n);
		}
		pg_atomic_fetch_add_u64(&h->sequences, n_prompts);
		MemoryContextSwitchTo(TopMemoryContext);
		memcpy(last, prompts, sizeof(int) * n_prompts);
		memcpy(last + n_prompts, rows, sizeof(int) * n);
		n_last = n_prompts + n;
		last_end = GetCurrentTimestamp();
	}
}

void
llm_runner_main(Datum arg)
{
	RunnerHeader *h;
	struct stat st;
	LlmModel   *m;
	LlmInfer   *inf;

	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	/* no database: the runner reads only its file and the weights; DROP DATABASE never waits for it */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	strlcpy(runner_path, MyBgworkerEntry->bgw_extra, sizeof(runner_path));
	strlcpy(weights_path, runner_path, sizeof(weights_path));
	weights_path[strlen(weights_path) - strlen(RUNNER_SUFFIX)] = '\0';
	if (stat(weights_path, &weights_stat) != 0)
		proc_exit(0);
	runner_fd = open(runner_path, O_RDWR | O_CLOEXEC);
	if (runner_fd < 0 || flock(runner_fd, LOCK_EX | LOCK_NB) != 0 || fstat(runner_fd, &st) != 0 ||
		st.st_size < RUNNER_HEADER_BYTES)
		proc_exit(0);			/* replaced, or another runner has it */
	h = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, runner_fd, 0);
	if (h == MAP_FAILED || h->magic != RUNNER_MAGIC || h->file_bytes != (uint64) st.st_size ||
		pg_atomic_read_u32(&h->state) != RUNNER_STARTING)
		proc_exit(0);
	runner_h = h;
	on_shmem_exit(runner_exit, 0);

	m = llm_model_map_shared(h->database, &h->cfg, h->precision);
	if (m == NULL)
	{
		ereport(LOG,
				(errmsg("pg_llm: the batch runner of model \"%s\" found no shared copy of its weights", h->cfg.model)));
		proc_exit(0);
	}
	/* the level of the session that started it (pg_llm.simd): sessions at another level compute alone */
	if (llm_simd_set_level((LlmSimdLevel) h->simd) != (LlmSimdLevel) h->simd)
		proc_exit(0);
	inf = llm_infer_create_rows(m, h->n_slots, h->max_prompt, h->max_positions);
	h->cache_bytes = llm_infer_cache_bytes(inf);
	h->pid = MyProcPid;
	h->procno = LLM_MY_PROCNO;
	pg_write_barrier();
	pg_atomic_write_u32(&h->state, RUNNER_READY);
	wake(h->starter_procno);
	ereport(DEBUG1,
			(errmsg_internal("pg_llm: batch runner of model \"%s\" (weights_version " INT64_FORMAT ", %d slots) ready",
							 h->cfg.model, h->cfg.weights_version, h->n_slots)));
	serve(h, inf);
}

/* ---- SQL: pg_llm_batch_runners() ----------------------------------------------------------- */

PG_FUNCTION_INFO_V1(pg_llm_batch_runners);

/*
 * pg_llm_batch_runners() -> rows (model, weights_version, inference_precision, pid, slots, active,
 * sequences, steps, rows, cache_bytes): the live batch runners of this database, of the models the
 * caller may read.
 */
Datum
pg_llm_batch_runners(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	DIR		   *dir;
	struct dirent *de;

	InitMaterializedSRF(fcinfo, 0);
	dir = AllocateDir(LLM_WC_DIR);
	while (dir != NULL && (de = ReadDir(dir, LLM_WC_DIR)) != NULL)
	{
		size_t		len = strlen(de->d_name);
		RunnerMap  *map;

		if (len <= strlen(RUNNER_SUFFIX) || strcmp(de->d_name + len - strlen(RUNNER_SUFFIX), RUNNER_SUFFIX) != 0)
			continue;
		map = map_file(psprintf("%s/%s", LLM_WC_DIR, de->d_name));
		if (map == NULL)
			continue;
		if (map->h->database == MyDatabaseId && pg_atomic_read_u32(&map->h->state) == RUNNER_READY &&
			runner_alive(map->fd) && llm_may_see_model(map->h->cfg.model))
		{
			RunnerHeader *h = map->h;
			Datum		values[10];
			bool		nulls[10] = {0};

			values[0] = CStringGetTextDatum(h->cfg.model);
			values[1] = Int64GetDatum(h->cfg.weights_version);
			values[2] = CStringGetTextDatum(llm_precision_name((LlmPrecision) h->precision));
			values[3] = Int32GetDatum(h->pid);
			values[4] = Int32GetDatum(h->n_slots);
			values[5] = Int32GetDatum((int32) pg_atomic_read_u32(&h->active));
			values[6] = Int64GetDatum((int64) pg_atomic_read_u64(&h->sequences));
			values[7] = Int64GetDatum((int64) pg_atomic_read_u64(&h->steps));
			values[8] = Int64GetDatum((int64) pg_atomic_read_u64(&h->rows));
			values[9] = Int64GetDatum((int64) h->cache_bytes);
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
		unmap(map);
	}
	if (dir != NULL)
		FreeDir(dir);
	return (Datum) 0;
}
