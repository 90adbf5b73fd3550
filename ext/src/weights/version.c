/*
 * version.c: llm_model_config.weights_version, bumped once per statement for each model whose rows
 * of llm_param changed (the triggers of llm_param), so that every copy of the weights (shared,
 * private, a runner's) knows when it is stale with one indexed lookup.
 */
#include "base/base.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

/* ---- weights_version: bumped once per statement for each model whose parameters changed ---- */

/*
 * A row trigger notes the models and a statement trigger bumps them. Transition tables would
 * do it in one trigger, but they copy every row written, and a row here is a whole tensor.
 * A statement that fails leaves no note behind: the notes of an aborted (sub)transaction are
 * dropped with it, so that a later statement never bumps a model it did not write.
 */
typedef struct ChangedModel
{
	char	   *model;
	int			level;			/* transaction nesting level that noted it */
} ChangedModel;

static List *changed_models = NIL;	/* of ChangedModel *, in TopMemoryContext */

static void
drop_notes(int from_level)
{
	List	   *keep = NIL;
	ListCell   *lc;

	foreach(lc, changed_models)
	{
		ChangedModel *c = lfirst(lc);

		if (c->level < from_level)
			keep = lappend(keep, c);
		else
		{
			pfree(c->model);
			pfree(c);
		}
	}
	list_free(changed_models);
	changed_models = keep;
}

static void
notes_xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		drop_notes(0);
}

static void
notes_subxact_callback(SubXactEvent event, SubTransactionId mySubid, SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		drop_notes(GetCurrentTransactionNestLevel());
}

static void
note_model(HeapTuple tuple, TupleDesc desc)
{
	static bool callbacks = false;
	bool		isnull;
	Datum		d = heap_getattr(tuple, 1, desc, &isnull);	/* llm_param.model */
	char	   *model;
	ListCell   *lc;
	MemoryContext old;
	ChangedModel *c;

	if (isnull)
		return;
	if (!callbacks)
	{
		RegisterXactCallback(notes_xact_callback, NULL);
		RegisterSubXactCallback(notes_subxact_callback, NULL);
		callbacks = true;
	}
	model = TextDatumGetCString(d);
	foreach(lc, changed_models)
		if (strcmp(((ChangedModel *) lfirst(lc))->model, model) == 0)
			return;
	old = MemoryContextSwitchTo(TopMemoryContext);
	c = palloc(sizeof(ChangedModel));
	c->model = pstrdup(model);
	c->level = GetCurrentTransactionNestLevel();
	changed_models = lappend(changed_models, c);
	MemoryContextSwitchTo(old);
}

PG_FUNCTION_INFO_V1(llm_param_note_change);

/* BEFORE INSERT OR UPDATE OR DELETE ... FOR EACH ROW on llm_param. */
Datum
llm_param_note_change(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TupleDesc	desc;

	llm_check_trigger_table(fcinfo, "llm_param_note_change", "llm_param");
	if (!TRIGGER_FIRED_FOR_ROW(td->tg_event) || !TRIGGER_FIRED_BEFORE(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_TRIGGERED_ACTION_EXCEPTION),
				 errmsg("llm_param_note_change() must be a BEFORE ... FOR EACH ROW trigger")));
	desc = RelationGetDescr(td->tg_relation);
	note_model(td->tg_trigtuple, desc);
	if (TRIGGER_FIRED_BY_UPDATE(td->tg_event))
	{
		note_model(td->tg_newtuple, desc);
		return PointerGetDatum(td->tg_newtuple);
	}
	return PointerGetDatum(td->tg_trigtuple);
}

PG_FUNCTION_INFO_V1(llm_param_bump_version);

/* AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ... FOR EACH STATEMENT on llm_param. */
Datum
llm_param_bump_version(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	ListCell   *lc;

	llm_check_trigger_table(fcinfo, "llm_param_bump_version", "llm_param");
	if (TRIGGER_FIRED_FOR_ROW(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_TRIGGERED_ACTION_EXCEPTION),
				 errmsg("llm_param_bump_version() must be a FOR EACH STATEMENT trigger")));
	SPI_connect();
	if (TRIGGER_FIRED_BY_TRUNCATE(td->tg_event))
		llm_spi_run("bumping weights_version",
					psprintf("UPDATE %s SET weights_version = pg_catalog.nextval('%s')",
							 llm_table("llm_model_config"), llm_table("llm_weights_version_seq")),
					0, NULL, NULL, false, 0, SPI_OK_UPDATE);
	else
	{
		foreach(lc, changed_models)
		{
			Oid			argtypes[1] = {TEXTOID};
			Datum		values[1] = {CStringGetTextDatum(((ChangedModel *) lfirst(lc))->model)};

			llm_spi_run("bumping weights_version",
						psprintf("UPDATE %s SET weights_version = pg_catalog.nextval('%s') "
								 "WHERE model OPERATOR(pg_catalog.=) $1",
								 llm_table("llm_model_config"), llm_table("llm_weights_version_seq")),
						1, argtypes, values, false, 0, SPI_OK_UPDATE);
		}
	}
	SPI_finish();
	drop_notes(0);
	return PointerGetDatum(NULL);
}
