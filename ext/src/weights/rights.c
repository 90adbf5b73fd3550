/*
 * rights.c: who may read a model's weights.
 *
 * Serving computes with a copy of the weights (the server's shared copy, built by whichever role
 * asked first, or this backend's private one), not with llm_param, where PostgreSQL would check
 * the caller's rights itself. So every call that serves a model asks here whether its caller could
 * read all of that model's rows of llm_param, row-level security included: the shared copy is then
 * only a cache of what the caller may read anyway.
 */
#include "base/base.h"
#include "weights/weights.h"

#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/rls.h"

/* mode on the table, or on each of the columns. */
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

	if (!llm_granted(relid, columns, lengthof(columns), ACL_SELECT))
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

	if (!llm_granted(relid, columns, lengthof(columns), ACL_SELECT) || (rows_filtered(relid, false) && !row_security))
		return false;
	SPI_connect();
	found = llm_config_lookup(model, &cfg, LLM_CONFIG_NO_LOCK);
	SPI_finish();
	return found && llm_may_read_weights(&cfg, false);
}
