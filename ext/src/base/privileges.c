/*
 * privileges.c: what a role may do with pg_llm's models.
 *
 * Every function of pg_llm runs with its caller's rights: a role reads and writes pg_llm's tables
 * only as far as it was granted (llm_grant / llm_revoke, pgllm grant and pgllm revoke), and most
 * functions reach the tables through SPI, where PostgreSQL checks those rights itself. Serving is
 * the exception: it computes with a copy of the weights (the server's shared copy, built by
 * whichever role asked first, or this backend's private one), so every call that serves a model
 * asks here whether its caller could read all of that model's rows of llm_param, row-level
 * security included. The shared copy is then only a cache of what the caller may read anyway.
 *
 * Also here: the check that a trigger function of the extension fires on its own table, and a
 * hint on "permission denied" for pg_llm's objects.
 */
#include "base/base.h"
#include "base/privileges.h"

#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/elog.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/rls.h"

/* ---- rights on the models -------------------------------------------------------------------- */

/* mode on the table, or on each of the columns. */
static bool
granted(Oid relid, const char *const *columns, int n_columns, AclMode mode)
{
	Oid			user = GetUserId();

	if (pg_class_aclcheck(relid, user, mode) == ACLCHECK_OK)
		return true;
	for (int i = 0; i < n_columns; i++)
	{
		AttrNumber	att = get_attnum(relid, columns[i]);

		if (att == InvalidAttrNumber || pg_attribute_aclcheck(relid, att, user, mode) != ACLCHECK_OK)
			return false;
	}
	return true;
}

/*
 * Whether row-level security filters what the current user reads of relid: RLS_ENABLED, or
 * RLS_NONE(_ENV). With row_security = off where it would apply, the query would fail: that is
 * PostgreSQL's own error with `error`, and "filtered" without.
 */
static bool
rows_filtered(Oid relid, bool error)
{
	return check_enable_rls(relid, InvalidOid, !error) == RLS_ENABLED;
}

/* The tensors of cfg's model (as its layout names them) that the current user sees in llm_param. */
static int64
visible_tensors(const LlmConfig *cfg, int *total)
{
	LlmLayout	layout;
	Datum	   *names;
	Datum		values[2];
	Oid			types[2] = {TEXTOID, TEXTARRAYOID};
	bool		isnull;
	int64		n;

	llm_layout_init(cfg, &layout);
	names = palloc(sizeof(Datum) * layout.num_tensors);
	for (int i = 0; i < layout.num_tensors; i++)
	{
		LlmTensorInfo info;

		llm_tensor_info(cfg, &layout, i, &info);
		names[i] = CStringGetTextDatum(info.name);
	}
	values[0] = CStringGetTextDatum(cfg->model);
	values[1] = PointerGetDatum(construct_array(names, layout.num_tensors, TEXTOID, -1, false, TYPALIGN_INT));
	SPI_connect();
	llm_spi_run("reading which rows of llm_param the role sees",
				psprintf("SELECT pg_catalog.count(*) FROM %s WHERE model OPERATOR(pg_catalog.=) $1 "
						 "AND name OPERATOR(pg_catalog.=) ANY ($2)", llm_table("llm_param")),
				2, types, values, true, 1, SPI_OK_SELECT);
	n = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	*total = layout.num_tensors;
	return n;
}

bool
llm_may_read_weights(const LlmConfig *cfg, bool error)
{
	static const char *const columns[] = {"model", "name", "shape", "data"};
	Oid			relid = llm_table_oid("llm_param");
	int64		seen;
	int			total;

	if (!granted(relid, columns, lengthof(columns), ACL_SELECT))
	{
		if (error)
			aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_TABLE, "llm_param");
		return false;
	}
	if (!rows_filtered(relid, error))
		return true;
	if (!row_security)
		return false;			/* without `error` only: with it, check_enable_rls raised */
	seen = visible_tensors(cfg, &total);
	if (seen == total)
		return true;
	if (error)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for the weights of model \"%s\"", cfg->model),
				 errdetail("Row-level security on llm_param shows role \"%s\" " INT64_FORMAT " of the model's %d tensors.",
						   GetUserNameFromId(GetUserId(), false), seen, total),
				 errhint("Serving a model needs every row of its weights; the policies of llm_param decide which a role sees.")));
	return false;
}

bool
llm_may_see_model(const char *model)
{
	static const char *const columns[] = {"model", "n_layer", "n_head", "d_model", "n_positions", "vocab",
	"weights_version"};
	Oid			relid = llm_table_oid("llm_model_config");
	LlmConfig	cfg;
	bool		found;

	if (!granted(relid, columns, lengthof(columns), ACL_SELECT) || (rows_filtered(relid, false) && !row_security))
		return false;
	SPI_connect();
	found = llm_config_lookup(model, &cfg, false);
	SPI_finish();
	return found && llm_may_read_weights(&cfg, false);
}

void
llm_check_may_train(const char *model)
{
	static const char *const columns[] = {"data"};

	/* what writing the weights back would say, before any work */
	if (!granted(llm_table_oid("llm_param"), columns, lengthof(columns), ACL_UPDATE))
		aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_TABLE, "llm_param");
}

void
llm_check_trigger_table(FunctionCallInfo fcinfo, const char *function, const char *table)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_TRIGGERED_ACTION_EXCEPTION),
				 errmsg("%s() must be called as a trigger", function)));
	if (RelationGetRelid(td->tg_relation) != llm_table_oid(table))
		ereport(ERROR,
				(errcode(ERRCODE_TRIGGERED_ACTION_EXCEPTION),
				 errmsg("%s() is a trigger of pg_llm's table %s only", function, table),
				 errdetail("It fired on table \"%s\".", RelationGetRelationName(td->tg_relation))));
}

/* ---- a hint on "permission denied" ------------------------------------------------------------ */

/*
 * PostgreSQL's own error ("permission denied for table llm_model_config") says what failed but not
 * what to do; this hook adds that, in one place for every entry point and for plain SQL on the
 * tables alike. It only sets a hint where there is none, and reads nothing from the catalogs (the
 * transaction is failing).
 */

static emit_log_hook_type prev_emit_log_hook = NULL;

/* The object a "permission denied for <kind> <name>" message names, when it is pg_llm's. */
static const char *
pg_llm_object(const char *message)
{
	const char *name = strrchr(message, ' ');

	if (name == NULL)
		return NULL;
	name++;
	if (strncmp(name, "llm_", 4) == 0 || strncmp(name, "pg_llm_", 7) == 0)
		return name;
	return NULL;
}

static void
permission_hint(ErrorData *edata)
{
	const char *name;

	if (edata->elevel >= ERROR && edata->sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE &&
		edata->hint == NULL && edata->message != NULL &&
		strncmp(edata->message, "permission denied for ", 22) == 0 &&
		(name = pg_llm_object(edata->message)) != NULL)
	{
		if (strcmp(name, "pg_llm_import_npz") == 0 || strcmp(name, "pg_llm_export_npz") == 0 ||
			strcmp(name, "pg_llm_load_bpe_vocab") == 0 || strcmp(name, "pg_llm_load_bpe_merges") == 0)
			edata->hint = pstrdup("Files on the server are for superusers and members of pg_read_server_files "
								  "or pg_write_server_files; pgllm import and pgllm export send the file over the "
								  "connection instead, as pgllm tokenizer does with tokenizer files.");
		else
			edata->hint = pstrdup("The database owner grants pg_llm's rights: \"pgllm grant ROLE\" to serve "
								  "(generate, stream, beams, logits, encode/decode), \"pgllm grant ROLE --train\" "
								  "to train and load models too (SQL: SELECT llm_grant('ROLE', train => true)).");
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

void
llm_privileges_init(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = permission_hint;
}
