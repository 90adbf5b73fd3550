/*
 * dataset.c: reading training blocks from llm_dataset (see dataset.h).
 *
 * The ids are read once per call (in id order); each block is then one indexed lookup, so a
 * dataset of any size costs 8 bytes per row of memory.
 */
#include "pg_llm.h"
#include "dataset.h"

#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"

bool		llm_check_dataset_tokenizer = true;

void
llm_dataset_init(void)
{
	DefineCustomBoolVariable("pg_llm.check_dataset_tokenizer",
							 "Refuse to train or evaluate a model on a dataset tokenized with another tokenizer.",
							 "Off: use the dataset's token ids with any model (an explicit override).",
							 &llm_check_dataset_tokenizer,
							 true,
							 PGC_USERSET, 0,
							 NULL, NULL, NULL);
}

/*
 * The rule lives in SQL, llm_dataset_check_tokenizer (the upgrade script): datasets record the
 * tokenizer their rows were made with, and a model with another one is refused. Every reader and
 * writer of llm_dataset in the server comes through here (caller connected to SPI).
 */
void
llm_dataset_check_tokenizer(const char *dataset, const char *model, bool for_training)
{
	if (for_training && !llm_check_dataset_tokenizer)
		return;
	llm_spi_run("checking the dataset's tokenizer",
				psprintf("SELECT %s($1, $2, $3)", llm_table("llm_dataset_check_tokenizer")),
				3, (Oid[]) {TEXTOID, TEXTOID, BOOLOID},
				(Datum[]) {CStringGetTextDatum(dataset), CStringGetTextDatum(model), BoolGetDatum(for_training)},
				false, 0, SPI_OK_SELECT);
}

static void
row_disappeared(int64 id)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATA_EXCEPTION),
			 errmsg("llm_dataset row %lld disappeared during training", (long long) id)));
}

void
llm_dataset_open(LlmDataset *ds, const LlmConfig *cfg, const char *dataset, int64 max_rows)
{
	Portal		portal;
	int64		cap = 1024;
	bool		isnull;
	Oid			argtypes[1] = {INT8OID};
	Oid			name_type[1] = {TEXTOID};
	Datum		name[1] = {CStringGetTextDatum(dataset)};

	ds->ids = palloc(cap * sizeof(int64));
	ds->n = 0;
	ds->name = pstrdup(dataset);
	llm_dataset_check_tokenizer(dataset, cfg->model, true);
	portal = SPI_cursor_open_with_args(NULL, psprintf("SELECT id FROM %s WHERE dataset = $1 ORDER BY id",
													  llm_table("llm_dataset")),
									   1, name_type, name, NULL, true, CURSOR_OPT_NO_SCROLL);
	while (max_rows <= 0 || ds->n < max_rows)
	{
		SPI_cursor_fetch(portal, true, max_rows > 0 ? Min(65536, max_rows - ds->n) : 65536);
		if (SPI_processed == 0)
			break;
		if (ds->n + (int64) SPI_processed > cap)
		{
			while (ds->n + (int64) SPI_processed > cap)
				cap *= 2;
			ds->ids = repalloc_huge(ds->ids, cap * sizeof(int64));
		}
		for (uint64 r = 0; r < SPI_processed; r++)
			ds->ids[ds->n++] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull));
		SPI_freetuptable(SPI_tuptable);
		CHECK_FOR_INTERRUPTS();
	}
	SPI_cursor_close(portal);
	if (ds->n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("dataset \"%s\" of llm_dataset is empty", dataset),
				 errhint("Fill it with pgllm dataset --dataset %s --input FILES (or --query SQL).", dataset)));

	ds->fetch = llm_spi_prepare("preparing the llm_dataset query",
								psprintf("SELECT tokens, target FROM %s WHERE id = $1", llm_table("llm_dataset")),
								1, argtypes);

	/* the block size is the first row's length; every row read later must match it */
	if (llm_spi_run_plan("reading llm_dataset", ds->fetch, (Datum[]) {Int64GetDatum(ds->ids[0])},
						 true, 1, SPI_OK_SELECT) != 1)
		row_disappeared(ds->ids[0]);
	{
		ArrayType  *tokens = DatumGetArrayTypeP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));

		ds->T = ArrayGetNItems(ARR_NDIM(tokens), ARR_DIMS(tokens));
	}
	SPI_freetuptable(SPI_tuptable);
	if (ds->T > cfg->n_positions)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the block size %d of dataset \"%s\" is larger than model \"%s\"'s n_positions %d",
						ds->T, dataset, cfg->model, cfg->n_positions),
				 errhint("Rebuild the dataset with pgllm dataset --block-size %d or less.", cfg->n_positions)));
}

/* Copy one int[] of the row into out[T], checking its shape and every id against V. */
static void
read_ids(Datum d, int32 *out, int T, int V, int64 id, const char *column)
{
	ArrayType  *arr = DatumGetArrayTypeP(d);
	int			n = ArrayGetNItems(ARR_NDIM(arr), ARR_DIMS(arr));
	const int32 *vals = (const int32 *) ARR_DATA_PTR(arr);

	if (ARR_NDIM(arr) != 1 || ARR_ELEMTYPE(arr) != INT4OID || ARR_HASNULL(arr) || n != T)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("llm_dataset row %lld: %s must be a one-dimensional int[] of %d ids without NULLs",
						(long long) id, column, T),
				 errdetail("Every row of llm_dataset must have the same length (the block size) as the first."),
				 errhint("Rebuild the dataset with pgllm dataset --truncate.")));
	for (int i = 0; i < T; i++)
	{
		if (vals[i] < 0 || vals[i] >= V)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("llm_dataset row %lld: %s id %d is outside the model's vocabulary (0 .. %d)",
							(long long) id, column, vals[i], V - 1),
					 errhint("Tokenize the dataset with the model's tokenizer.")));
		out[i] = vals[i];
	}
	if ((Pointer) arr != DatumGetPointer(d))
		pfree(arr);
}

void
llm_dataset_batch(LlmDataset *ds, int64 pos, int B, int V, int32 *inputs, int32 *targets)
{
	for (int b = 0; b < B; b++)
	{
		int64		id = ds->ids[(pos + b) % ds->n];
		bool		isnull1,
					isnull2;
		Datum		tokens,
					target;

		if (llm_spi_run_plan("reading llm_dataset", ds->fetch, (Datum[]) {Int64GetDatum(id)}, true, 1,
							 SPI_OK_SELECT) != 1)
			row_disappeared(id);
		tokens = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull1);
		target = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull2);
		read_ids(tokens, inputs + (size_t) b * ds->T, ds->T, V, id, "tokens");
		read_ids(target, targets + (size_t) b * ds->T, ds->T, V, id, "target");
		SPI_freetuptable(SPI_tuptable);
	}
}
