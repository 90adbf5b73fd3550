/*
 * train_lock.c: one trainer per model at a time.
 *
 * Training a model reads and advances its step counter, and a run of pgllm train spreads one
 * learning-rate schedule over many transactions (chunks). Two runs at once would interleave their
 * chunks: both would plan the same steps and the later steps would run outside either schedule.
 * So each model has an advisory lock (classid LLM_TRAIN_LOCK_CLASS, objid a hash of the model's
 * name, objsubid 2: visible in pg_locks as such), which
 *   - llm_train takes for its transaction, waiting for it (a plain SQL call queues behind a run);
 *   - llm_train_lock(model) takes for the session without waiting: pgllm train calls it first,
 *     so that a second run is refused at once with the first one's pid, instead of queuing.
 * An adapter has its own lock (LLM_ADAPTER_LOCK_CLASS), taken the same two ways: by llm_train(...,
 * adapter => ...) and by llm_adapter_train_lock(adapter) (pgllm train --adapter).
 * The holder's own llm_train calls do not conflict with its session lock.
 */
#include "base/base.h"
#include "model/model.h"
#include "train/lock.h"

#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/builtins.h"

/* "llmt" */
#define LLM_TRAIN_LOCK_CLASS 0x6C6C6D74
/* "llma": adapters have names of their own */
#define LLM_ADAPTER_LOCK_CLASS 0x6C6C6D61

/* The lock of a model (LLM_TRAIN_LOCK_CLASS) or an adapter (LLM_ADAPTER_LOCK_CLASS) of that name. */
static void
train_lock_tag(LOCKTAG *tag, const char *name, uint32 lock_class)
{
	uint32		h = hash_bytes((const unsigned char *) name, strlen(name));

	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, lock_class, h, 2);
}

void
llm_train_lock_xact(const char *model)
{
	LOCKTAG		tag;

	train_lock_tag(&tag, model, LLM_TRAIN_LOCK_CLASS);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
}

void
llm_train_lock_adapter_xact(const char *adapter)
{
	LOCKTAG		tag;

	train_lock_tag(&tag, adapter, LLM_ADAPTER_LOCK_CLASS);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
}

/* The pid of the session that holds the lock of `name` in `lock_class`, or 0 when it is not known. */
static int
train_lock_holder(const char *name, uint32 lock_class)
{
	LOCKTAG		tag;
	int			pid = 0;
	bool		isnull;

	train_lock_tag(&tag, name, lock_class);
	SPI_connect();
	if (llm_spi_run("looking for the training session",
					"SELECT pid FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted "
					"AND database = $1 AND classid = $2 AND objid = $3 AND objsubid = 2 AND pid <> pg_backend_pid()",
					3, (Oid[]) {OIDOID, OIDOID, OIDOID},
					(Datum[]) {ObjectIdGetDatum(tag.locktag_field1), ObjectIdGetDatum(tag.locktag_field2),
					ObjectIdGetDatum(tag.locktag_field3)},
					true, 1, SPI_OK_SELECT) == 1)
		pid = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	return pid;
}

/* Holds the lock of `name` ("model" or "adapter": `what`) for the session, or fails at once. */
static void
train_lock_session(const char *what, const char *name, uint32 lock_class)
{
	LOCKTAG		tag;
	int			pid;

	train_lock_tag(&tag, name, lock_class);
	if (LockAcquire(&tag, ExclusiveLock, true, true) != LOCKACQUIRE_NOT_AVAIL)
		return;
	pid = train_lock_holder(name, lock_class);
	ereport(ERROR,
			(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
			 pid > 0 ? errmsg("%s \"%s\" is being trained by another session (pid %d)", what, name, pid)
			 : errmsg("%s \"%s\" is being trained by another session", what, name),
			 errdetail("Two runs at once would share the %s's step counter and learning-rate schedule; "
					   "this one did nothing.", what),
			 pid > 0 ? errhint("Wait for that run to finish, or stop it with SELECT pg_cancel_backend(%d).", pid)
			 : errhint("Wait for that run to finish.")));
}

/*
 * llm_train_lock(model text) -> void: hold model's training lock until the session ends, or fail
 * at once when another session holds it.
 */
PG_FUNCTION_INFO_V1(llm_train_lock);
Datum
llm_train_lock(PG_FUNCTION_ARGS)
{
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(0));

	llm_check_model_name(model);
	llm_check_may_train(model);
	train_lock_session("model", model, LLM_TRAIN_LOCK_CLASS);
	PG_RETURN_VOID();
}

/*
 * llm_adapter_train_lock(adapter text) -> void: the same for an adapter (pgllm train --adapter),
 * the lock that llm_train(..., adapter => ...) takes for its transaction.
 */
PG_FUNCTION_INFO_V1(llm_adapter_train_lock);
Datum
llm_adapter_train_lock(PG_FUNCTION_ARGS)
{
	char	   *adapter = text_to_cstring(PG_GETARG_TEXT_PP(0));

	llm_check_model_name(adapter);
	llm_check_may_train_adapter();
	train_lock_session("adapter", adapter, LLM_ADAPTER_LOCK_CLASS);
	PG_RETURN_VOID();
}
