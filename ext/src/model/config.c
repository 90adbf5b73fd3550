/*
 * config.c: a model's architecture, its row of llm_model_config.
 */
#include "base/base.h"
#include "model/model.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"

/* The model's row of llm_model_config, locked as `lock` says (model.h); false when there is none.
 * LLM_CONFIG_FOR_CHANGE is FOR NO KEY UPDATE: a FOR UPDATE lock would wait for every open
 * transaction that inserted a row referencing the model, such as an uncommitted llm_train_log row.
 * The caller is connected to SPI. */
bool
llm_config_lookup(const char *model, LlmConfig *cfg, LlmConfigLock lock)
{
	static const char *const clause[] = {
		[LLM_CONFIG_NO_LOCK] = "", [LLM_CONFIG_FOR_CHANGE] = " FOR NO KEY UPDATE", [LLM_CONFIG_FOR_SHARE] = " FOR SHARE",
	};
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	TupleDesc	desc;
	HeapTuple	tuple;
	bool		isnull;

	llm_check_model_name(model);
	values[0] = CStringGetTextDatum(model);
	if (llm_spi_run("reading llm_model_config",
					psprintf("SELECT n_layer, n_head, d_model, n_positions, vocab, weights_version, tableoid "
							 "FROM %s WHERE model = $1%s", llm_table("llm_model_config"),
							 clause[lock]),
					1, argtypes, values, lock == LLM_CONFIG_NO_LOCK, 1, SPI_OK_SELECT) == 0)
		return false;
	desc = SPI_tuptable->tupdesc;
	tuple = SPI_tuptable->vals[0];
	memset(cfg, 0, sizeof(*cfg));
	strlcpy(cfg->model, model, sizeof(cfg->model));
	cfg->n_layer = DatumGetInt32(SPI_getbinval(tuple, desc, 1, &isnull));
	cfg->n_head = DatumGetInt32(SPI_getbinval(tuple, desc, 2, &isnull));
	cfg->d_model = DatumGetInt32(SPI_getbinval(tuple, desc, 3, &isnull));
	cfg->n_positions = DatumGetInt32(SPI_getbinval(tuple, desc, 4, &isnull));
	cfg->vocab = DatumGetInt32(SPI_getbinval(tuple, desc, 5, &isnull));
	cfg->weights_version = DatumGetInt64(SPI_getbinval(tuple, desc, 6, &isnull));
	cfg->table_oid = DatumGetObjectId(SPI_getbinval(tuple, desc, 7, &isnull));
	return true;
}

void
llm_config_load(const char *model, LlmConfig *cfg)
{
	bool		found;

	SPI_connect();
	found = llm_config_lookup(model, cfg, LLM_CONFIG_NO_LOCK);
	SPI_finish();
	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" does not exist", model),
				 errhint("Register it with pgllm import or pgllm init, or insert a row into llm_model_config.")));
}
