/*
 * worker.c: the batch runner itself (see file.h for the design): a background worker that maps the
 * shared copy of the weights its sessions serve and runs their prompts and steps, each step one
 * pass over the weights for every sequence waiting, until it has been idle a while. The sessions'
 * side is client.c.
 */
#include "base/base.h"
#include "infer/infer.h"
#include "runner/file.h"
#include "runner/runner.h"
#include "weights/weights.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "tcop/tcopprot.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#define RUNNER_IDLE_MS 10000	/* a runner without sequences exits after this long */
#define GATHER_MS 5				/* a step waits at most this long for the sequences of the last */
#define BURST_QUIET_US 1000		/* an idle runner waits this long for more new prompts */
#define BURST_MOST_US 3000		/* ... and no longer than this in all (gather_burst) */

static RunnerHeader *runner_h = NULL;
static int	runner_fd = -1;
static char runner_path[MAXPGPATH];
static char weights_path[MAXPGPATH];	/* the shared copy it serves */
static struct stat weights_stat;

/* The adapters mapped, by their files' keys (file.h). */
typedef struct MappedAdapter
{
	char		key[sizeof(((RunnerSlot *) 0)->adapter)];
	LlmLora		lora;			/* memory points into the mapping */
} MappedAdapter;

static List *adapters = NIL;

/*
 * The adapter slot s's new sequence computes with (NULL: none), mapped once; *failed when its file
 * is missing or does not fit the model.
 */
static const LlmLora *
slot_adapter(RunnerHeader *h, int s, bool *failed)
{
	RunnerSlot *slot = slot_at(h, s);
	MappedAdapter *a;
	ListCell   *lc;
	RunnerAdapter *file;
	size_t		bytes;
	int			fd;

	*failed = false;
	if (slot->adapter[0] == '\0')
		return NULL;
	foreach(lc, adapters)
	{
		a = lfirst(lc);
		if (strncmp(a->key, slot->adapter, sizeof(a->key)) == 0)
			return &a->lora;
	}
	file = llm_shared_map(runner_adapter_path(runner_path, MyProcPid, slot->adapter), ADAPTER_DATA_AT, &bytes, &fd);
	if (file == NULL || file->magic != ADAPTER_MAGIC || file->file_bytes != bytes ||
		!llm_lora_fits(&file->lora, &h->cfg) || bytes != ADAPTER_DATA_AT + file->lora.numel * sizeof(float))
	{
		if (file != NULL)
			llm_shared_unmap(file, bytes, fd);
		*failed = true;
		return NULL;
	}
	a = MemoryContextAllocZero(TopMemoryContext, sizeof(MappedAdapter));
	memcpy(a->key, slot->adapter, sizeof(a->key));
	a->key[sizeof(a->key) - 1] = '\0';
	a->lora = file->lora;
	a->lora.memory = (float *) ((char *) file + ADAPTER_DATA_AT);
	close(fd);					/* the mapping stays */
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);	/* not the step's context */

		adapters = lappend(adapters, a);
		MemoryContextSwitchTo(old);
	}
	return &a->lora;
}

/* Unlinks this runner's adapter files (their names carry its pid). */
static void
unlink_adapters(void)
{
	const char *base = strrchr(runner_path, '/') ? strrchr(runner_path, '/') + 1 : runner_path;
	char	   *prefix = psprintf("%s.%d.lora_", base, MyProcPid);
	DIR		   *dir = opendir(LLM_SHARED_DIR);
	struct dirent *de;

	while (dir != NULL && (de = readdir(dir)) != NULL)
		if (strncmp(de->d_name, prefix, strlen(prefix)) == 0)
			(void) unlink(psprintf("%s/%s", LLM_SHARED_DIR, de->d_name));
	if (dir != NULL)
		closedir(dir);
}

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
	unlink_adapters();
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

static int
prompts_waiting(RunnerHeader *h)
{
	int			n = 0;

	for (int s = 0; s < h->n_slots; s++)
		n += pg_atomic_read_u32(&slot_at(h, s)->state) == SLOT_PROMPT;
	return n;
}

/*
 * New prompts while no sequence is in flight: sessions that start together (a pool's connections,
 * a fan-out) post theirs over a millisecond or two (bench.concurrent's 4 to 8 sessions: within
 * 0.2-1.6 ms, one gap of 1.1 ms). Waiting for the rest of the burst puts them all in one prompt
 * pass and then in the same steps; without it the first prompt took a pass of its own, and its
 * sequence a step apart from the others' (a 4-session round: a 1-row and a 3-row step in place of
 * one of 4 rows). A prompt alone waits BURST_QUIET_US.
 */
static void
gather_burst(RunnerHeader *h, int n)
{
	TimestampTz start = GetCurrentTimestamp(),
				last = start;

	while (n < h->n_slots)
	{
		TimestampTz now;
		int			m;

		pg_usleep(50L);
		CHECK_FOR_INTERRUPTS();
		now = GetCurrentTimestamp();
		m = prompts_waiting(h);
		if (m > n)
		{
			n = m;
			last = now;
		}
		if (now - last >= BURST_QUIET_US || now - start >= BURST_MOST_US)
			break;
	}
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
					requests = 0,
					in_flight = 0;
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
			in_flight += (state == SLOT_STEP || state == SLOT_RUNNING || state == SLOT_DONE);
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
		if (in_flight == 0)
			gather_burst(h, requests);

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
		/* each new sequence's adapter; one that cannot be read fails its sequence alone */
		for (int i = 0, kept = n_prompts; i < kept;)
		{
			bool		failed;
			const LlmLora *lora = slot_adapter(h, prompts[i], &failed);

			if (!failed)
			{
				llm_infer_set_adapter(inf, prompts[i], lora);
				i++;
				continue;
			}
			{
				RunnerSlot *slot = slot_at(h, prompts[i]);
				uint32		running = SLOT_RUNNING;

				if (pg_atomic_compare_exchange_u32(&slot->state, &running, SLOT_FAILED))
					wake(slot->owner_procno);
				else
					pg_atomic_write_u32(&slot->state, SLOT_FREE);	/* abandoned meanwhile */
			}
			prompts[i] = prompts[--kept];
			n_prompts = kept;
		}
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
	size_t		bytes;
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
	h = llm_shared_map(runner_path, RUNNER_HEADER_BYTES, &bytes, &runner_fd);
	if (h == NULL || flock(runner_fd, LOCK_EX | LOCK_NB) != 0 || h->magic != RUNNER_MAGIC ||
		h->file_bytes != (uint64) bytes || pg_atomic_read_u32(&h->state) != RUNNER_STARTING)
		proc_exit(0);			/* replaced, or another runner has it */
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
