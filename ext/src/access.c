/*
 * access.c: a hint on "permission denied" for pg_llm's objects.
 *
 * Every function of pg_llm runs with its caller's rights: a role reads and writes pg_llm's tables
 * only as far as it was granted (llm_grant / llm_revoke in the upgrade script, pgllm grant and
 * pgllm revoke on the command line). Without a grant, PostgreSQL's own error ("permission denied
 * for table llm_model_config") says what failed but not what to do; this hook adds that, in one
 * place for every entry point and for plain SQL on the tables alike. It only sets a hint where
 * there is none, and reads nothing from the catalogs (the transaction is failing).
 */
#include "pg_llm.h"
#include "access.h"

#include "utils/elog.h"

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
access_hint(ErrorData *edata)
{
	const char *name;

	if (edata->elevel >= ERROR && edata->sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE &&
		edata->hint == NULL && edata->message != NULL &&
		strncmp(edata->message, "permission denied for ", 22) == 0 &&
		(name = pg_llm_object(edata->message)) != NULL)
	{
		if (strcmp(name, "pg_llm_import_npz") == 0 || strcmp(name, "pg_llm_export_npz") == 0)
			edata->hint = pstrdup("Files on the server are for superusers and members of pg_read_server_files "
								  "or pg_write_server_files; pgllm import and pgllm export send the file "
								  "over the connection instead.");
		else
			edata->hint = pstrdup("The database owner grants pg_llm's rights: \"pgllm grant ROLE\" to serve "
								  "(generate, stream, beams, logits, encode/decode), \"pgllm grant ROLE --train\" "
								  "to train and load models too (SQL: SELECT llm_grant('ROLE', train => true)).");
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

void
llm_access_init(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = access_hint;
}
