/*
 * privileges.c: rights on pg_llm's tables.
 *
 * Every function of pg_llm runs with its caller's rights: a role reads and writes pg_llm's tables
 * only as far as it was granted (llm_grant / llm_revoke, pgllm grant and pgllm revoke), and most
 * functions reach the tables through SPI, where PostgreSQL checks those rights itself. Here: a
 * check of table or column rights (llm_granted; serving uses it through weights/rights.c, since
 * the weights it computes with are a copy), the right to train, the check that a trigger function
 * of the extension fires on its own table, and a hint on "permission denied" for pg_llm's objects.
 */
#include "base/base.h"

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

bool
llm_granted(Oid relid, const char *const *columns, int n_columns, AclMode mode)
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

void
llm_check_may_train(const char *model)
{
	static const char *const columns[] = {"data"};

	/* what writing the weights back would say, before any work */
	if (!llm_granted(llm_table_oid("llm_param"), columns, lengthof(columns), ACL_UPDATE))
		aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_TABLE, "llm_param");
}

void
llm_check_may_train_adapter(void)
{
	static const char *const columns[] = {"data", "m", "v"};

	if (!llm_granted(llm_table_oid("llm_adapter_param"), columns, lengthof(columns), ACL_UPDATE))
		aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_TABLE, "llm_adapter_param");
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
