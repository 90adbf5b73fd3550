/*
 * file.h: the file a model's batch runner and its sessions share (client.c is the sessions' side,
 * worker.c the runner's): continuous batching across sessions. One background worker per (database, model,
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
#ifndef PG_LLM_RUNNER_FILE_H
#define PG_LLM_RUNNER_FILE_H

#include "base/base.h"
#include "model/model.h"

#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/proc.h"

#define RUNNER_SUFFIX ".runner"
#define RUNNER_MAGIC UINT64CONST(0x706c6c6d72756e33)	/* this layout, version 3 */
#define RUNNER_HEADER_BYTES 4096
#define LIVENESS_MS 1000		/* a waiting session checks this often that its runner lives */

/* A slot's state: who acts next. */
enum
{
	SLOT_FREE,					/* a session may claim it */
	SLOT_OWNED,					/* a session's, between requests */
	SLOT_PROMPT,				/* request: a new sequence, n_tokens prompt tokens */
	SLOT_STEP,					/* request: the next token, tokens[0] */
	SLOT_RUNNING,				/* the runner computes it */
	SLOT_DONE,					/* logits ready; the session's again */
	SLOT_FAILED,				/* no logits: the runner could not read the slot's adapter */
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
	char		adapter[24];	/* the sequence's adapter file (runner_adapter_path), "" for none;
								 * read by the runner with each prompt */
} RunnerSlot;

#define SLOT_TOKENS_AT 64
StaticAssertDecl(sizeof(RunnerSlot) <= SLOT_TOKENS_AT, "a slot's header must fit before its tokens");

/*
 * An adapter that sequences of a runner compute with: a file beside the runner's, named by a hash
 * of its contents (so a changed adapter is another file), written by the first session that needs
 * it, with the adapter it read with its own rights, and mapped by the runner; the runner checks
 * its layout against the model's before computing with it, and unlinks its adapters' files when it
 * exits. Layout: this header, then the LlmLora's block of floats at
 * ADAPTER_DATA_AT.
 */
#define ADAPTER_MAGIC UINT64CONST(0x706c6c6d6c6f7231)
#define ADAPTER_DATA_AT 4096

typedef struct RunnerAdapter
{
	uint64		magic;
	uint64		file_bytes;
	LlmLora		lora;			/* lora.memory is the writer's: the reader points it at its mapping */
} RunnerAdapter;

StaticAssertDecl(sizeof(RunnerAdapter) <= ADAPTER_DATA_AT, "an adapter's header must fit its page");

/*
 * The adapter file `key` of the runner (process pid) whose file is runner_path: the pid in the name,
 * so that a runner that exits unlinks its own and never a file made for the runner after it.
 */
static inline char *
runner_adapter_path(const char *runner_path, int pid, const char *key)
{
	return psprintf("%s.%d.lora_%s", runner_path, pid, key);
}

static inline size_t
tokens_bytes(int max_prompt)
{
	return TYPEALIGN(64, sizeof(int32) * (size_t) max_prompt);
}

static inline size_t
slot_bytes(int max_prompt, int vocab)
{
	return SLOT_TOKENS_AT + tokens_bytes(max_prompt) + TYPEALIGN(64, sizeof(float) * (size_t) vocab);
}

static inline RunnerSlot *
slot_at(RunnerHeader *h, int s)
{
	return (RunnerSlot *) ((char *) h + RUNNER_HEADER_BYTES + h->slot_bytes * (size_t) s);
}

static inline int32 *
slot_tokens(RunnerHeader *h, int s)
{
	return (int32 *) ((char *) slot_at(h, s) + SLOT_TOKENS_AT);
}

static inline float *
slot_logits(RunnerHeader *h, int s)
{
	return (float *) ((char *) slot_tokens(h, s) + tokens_bytes(h->max_prompt));
}

static inline void
wake(int procno)
{
	if (procno >= 0)
		SetLatch(&GetPGProcByNumber(procno)->procLatch);
}

#endif							/* PG_LLM_RUNNER_FILE_H */
