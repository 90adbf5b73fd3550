/*
 * client.c: the sessions' side of the batch runner (see file.h for the design): finding the runner
 * of the weights a session serves, starting one when there is none, claiming a slot, posting a
 * prompt or a token and waiting for its logits, giving the slot back however the statement ends;
 * and pg_llm_batch_runners(). The runner's own side is worker.c.
 */
#include "base/base.h"
#include "runner/file.h"
#include "runner/runner.h"
#include "weights/weights.h"

#include <dirent.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/hashfn.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/fd.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

int			llm_batch_sessions = 16;

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
	size_t		bytes;			/* mapped */
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
	llm_shared_unmap(map->h, map->bytes, map->fd);
	pfree(map);
}

/* Maps the runner file at path; NULL when absent or not one. */
static RunnerMap *
map_file(const char *path)
{
	size_t		bytes;
	int			fd;
	RunnerHeader *h = llm_shared_map(path, RUNNER_HEADER_BYTES, &bytes, &fd);
	RunnerMap  *map;

	if (h == NULL)
		return NULL;
	map = MemoryContextAllocZero(TopMemoryContext, sizeof(RunnerMap));
	strlcpy(map->path, path, sizeof(map->path));
	map->fd = fd;
	map->h = h;
	map->bytes = bytes;
	if (h->magic != RUNNER_MAGIC || h->file_bytes != (uint64) bytes)
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
		a->n_positions == b->n_positions && a->vocab == b->vocab && llm_shared_held(map->fd);
}

/* A new runner file at path for m (the caller holds the start lock); NULL when it cannot be made. */
static RunnerMap *
create_file(const char *path, const LlmModel *m, int n_slots)
{
	size_t		per_slot = slot_bytes(m->cfg.n_positions, m->cfg.vocab);
	size_t		bytes = RUNNER_HEADER_BYTES + per_slot * n_slots;
	int			fd;
	RunnerHeader *h = llm_shared_create(path, bytes, &fd);
	RunnerMap  *map;

	if (h == NULL)
		return NULL;
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
	if (!llm_shared_publish(path, h, bytes, fd))
		return NULL;
	map = MemoryContextAllocZero(TopMemoryContext, sizeof(RunnerMap));
	strlcpy(map->path, path, sizeof(map->path));
	map->fd = fd;
	map->h = h;
	map->bytes = bytes;
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
		while ((lock = llm_shared_open_locked(lock_path, LOCK_EX, true, (int *) &lock)) < 0)
			if (errno != ENOENT)
				break;
		if (lock >= 0)
		{
			bool		other = false;	/* a live runner that serves sessions of another pg_llm.simd */

			map = map_file(path);
			if (map != NULL && !serves(map, m))
			{
				other = llm_shared_held(map->fd);
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

/*
 * The slot's sequence computes with lora (NULL: none): its file for the runner is written unless it
 * is there already (the same contents, named by their hash). False when it cannot be written.
 */
static bool
slot_adapter(LlmRunnerSeq *q, const LlmLora *lora)
{
	RunnerHeader *h = q->map->h;
	RunnerSlot *slot = slot_at(h, q->slot);
	char		key[sizeof(slot->adapter)];
	struct
	{
		int32		rank;
		float		alpha;
		bool		target[LLM_NUM_KINDS];
	}			shape = {0};
	uint64		hash;
	char	   *path;
	struct stat st;

	if (lora == NULL)
	{
		slot->adapter[0] = '\0';
		return true;
	}
	shape.rank = lora->rank;
	shape.alpha = lora->alpha;
	memcpy(shape.target, lora->target, sizeof(shape.target));
	hash = hash_bytes_extended((const unsigned char *) lora->memory, lora->numel * sizeof(float),
							   hash_bytes_extended((const unsigned char *) &shape, sizeof(shape), 0));
	snprintf(key, sizeof(key), "%016llx", (unsigned long long) hash);
	path = runner_adapter_path(q->map->path, h->pid, key);
	if (stat(path, &st) != 0)
	{
		size_t		bytes = ADAPTER_DATA_AT + lora->numel * sizeof(float);
		int			fd;
		RunnerAdapter *file = llm_shared_create(path, bytes, &fd);

		if (file == NULL)
			return false;
		file->file_bytes = bytes;
		file->lora = *lora;
		file->lora.memory = NULL;
		memcpy((char *) file + ADAPTER_DATA_AT, lora->memory, lora->numel * sizeof(float));
		pg_write_barrier();
		file->magic = ADAPTER_MAGIC;
		if (!llm_shared_publish(path, file, bytes, fd))
			return false;
		llm_shared_unmap(file, bytes, fd);
	}
	strlcpy(slot->adapter, key, sizeof(slot->adapter));
	return true;
}

LlmRunnerSeq *
llm_runner_begin(const LlmModel *m, const LlmLora *lora)
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
		if (pg_atomic_read_u32(&h->state) != RUNNER_READY || !slot_adapter(q, lora))
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
		if (pg_atomic_read_u32(&slot->state) == SLOT_FAILED)
		{
			pg_atomic_write_u32(&slot->state, SLOT_OWNED);
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("the batch runner of model \"%s\" could not read the sequence's adapter", h->cfg.model),
					 errdetail("Its file %s is missing or does not fit the model.",
							   runner_adapter_path(q->map->path, h->pid, slot->adapter)),
					 errhint("Run the statement again.")));
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
		if ((rc & WL_TIMEOUT) && !llm_shared_held(q->map->fd))
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
	dir = AllocateDir(LLM_SHARED_DIR);
	while (dir != NULL && (de = ReadDir(dir, LLM_SHARED_DIR)) != NULL)
	{
		size_t		len = strlen(de->d_name);
		RunnerMap  *map;

		if (len <= strlen(RUNNER_SUFFIX) || strcmp(de->d_name + len - strlen(RUNNER_SUFFIX), RUNNER_SUFFIX) != 0)
			continue;
		map = map_file(psprintf("%s/%s", LLM_SHARED_DIR, de->d_name));
		if (map == NULL)
			continue;
		if (map->h->database == MyDatabaseId && pg_atomic_read_u32(&map->h->state) == RUNNER_READY &&
			llm_shared_held(map->fd) && llm_may_see_model(map->h->cfg.model))
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
