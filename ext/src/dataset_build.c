/*
 * dataset_build.c: llm_dataset_build, a dataset of llm_dataset from the documents a query returns.
 *
 * The query runs through an SPI cursor with the caller's privileges (the function is not SECURITY
 * DEFINER), a batch of documents at a time. Each document is tokenized with the model's tokenizer
 * (bpe.c, the encoder of llm_encode) and followed by <|endoftext|>, which gives the token stream
 * of `pgllm dataset`: rows of block_size tokens, each with its target (the same tokens shifted by
 * one, so consecutive rows share one token), and the tokens after the last full row left over.
 * Rows are written by one INSERT per TOKENS_PER_INSERT tokens or so; memory holds one batch of
 * documents and one insert's worth of tokens, whatever the size of the table.
 */
#include "pg_llm.h"
#include "bpe.h"
#include "bpe_tokenizer.h"
#include "dataset.h"
#include "model.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "nodes/parsenodes.h"
#include "utils/memutils.h"
#include "utils/plancache.h"
#include "utils/portal.h"

/* Documents fetched from the query at a time. */
#define DOCS_PER_FETCH 256
/* Tokens per INSERT (rounded down to whole rows, at least one row). */
#define TOKENS_PER_INSERT ((int64) 1 << 20)

typedef struct Builder
{
	Datum		dataset;		/* text */
	int			T;				/* block size */
	int			vocab;			/* the model's; every id is checked against it */
	const char *model;
	int64		rows_per_insert;
	int32	   *stream;			/* tokens not yet written; stream[0] starts the next row */
	int64		n;
	int64		cap;
	int64		rows;			/* written so far */
	Datum		tokenizer;		/* text: what every row records it was tokenized with */
	Datum		fingerprint;	/* text: llm_tokenizer_fingerprint(model) */
	SPIPlanPtr	insert;
} Builder;

/* Writes every full row of the stream (at most rows_per_insert unless all), keeping the rest. */
static void
write_rows(Builder *b, bool all)
{
	while (b->n > b->T && (all || (b->n - 1) / b->T >= b->rows_per_insert))
	{
		int64		rows = Min((b->n - 1) / b->T, b->rows_per_insert);
		int64		used = rows * b->T;
		ArrayType  *arr;
		Datum		values[6];

		/* ids of the tokenizer beyond the model's vocabulary would fail training later: refuse now */
		for (int64 i = 0; i <= used; i++)
			if (b->stream[i] >= b->vocab)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_EXCEPTION),
						 errmsg("token id %d is outside model \"%s\"'s vocabulary (0 .. %d)",
								b->stream[i], b->model, b->vocab - 1),
						 errdetail("The model's tokenizer has more tokens than the model has embeddings."),
						 errhint("Load the tokenizer that belongs to the model; nothing was written.")));
		/* the rows' tokens and targets, stream[0 .. used], as one int[] that the INSERT slices */
		arr = (ArrayType *) palloc(ARR_OVERHEAD_NONULLS(1) + (used + 1) * sizeof(int32));
		SET_VARSIZE(arr, ARR_OVERHEAD_NONULLS(1) + (used + 1) * sizeof(int32));
		arr->ndim = 1;
		arr->dataoffset = 0;
		arr->elemtype = INT4OID;
		ARR_DIMS(arr)[0] = (int) (used + 1);
		ARR_LBOUND(arr)[0] = 1;
		memcpy(ARR_DATA_PTR(arr), b->stream, (used + 1) * sizeof(int32));
		values[0] = b->dataset;
		values[1] = PointerGetDatum(arr);
		values[2] = Int32GetDatum(b->T);
		values[3] = Int32GetDatum((int32) rows);
		values[4] = b->tokenizer;
		values[5] = b->fingerprint;
		llm_spi_run_plan("writing llm_dataset", b->insert, values, false, 0, SPI_OK_INSERT);
		pfree(arr);
		b->rows += rows;
		/* the last token of the last row's target starts the next row */
		memmove(b->stream, b->stream + used, (b->n - used) * sizeof(int32));
		b->n -= used;
		CHECK_FOR_INTERRUPTS();
	}
}

static void
append(Builder *b, const int32 *ids, int64 n)
{
	if (b->n + n > b->cap)
	{
		while (b->n + n > b->cap)
			b->cap *= 2;
		b->stream = repalloc_huge(b->stream, b->cap * sizeof(int32));
	}
	memcpy(b->stream + b->n, ids, n * sizeof(int32));
	b->n += n;
}

/* The query's first column must be text (or varchar): refuse anything else before reading a row. */
static void
check_first_column(TupleDesc desc)
{
	Oid			type;

	if (desc == NULL || desc->natts < 1)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("the query of llm_dataset_build returns no columns"),
				 errhint("Select one document per row, as text: SELECT body FROM articles.")));
	type = TupleDescAttr(desc, 0)->atttypid;
	if (type != TEXTOID && type != VARCHAROID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("the first column of the query of llm_dataset_build is of type %s, not text",
						format_type_be(type)),
				 errhint("Cast it: SELECT body::text FROM ...")));
}

PG_FUNCTION_INFO_V1(llm_dataset_build);
Datum
llm_dataset_build(PG_FUNCTION_ARGS)
{
	Builder		b;
	LlmConfig	cfg;
	char	   *query,
			   *model;
	bool		replace;
	int32		eot;
	SPIPlanPtr	plan;
	List	   *sources;
	Portal		portal;
	MemoryContext batch_ctx;
	MemoryContext old;

	memset(&b, 0, sizeof(b));
	if (PG_ARGISNULL(0))
		llm_bad_argument("query must not be NULL", "Give a SELECT that returns one document per row.");
	if (PG_ARGISNULL(1))
		llm_bad_argument("dataset must not be NULL", NULL);
	if (PG_ARGISNULL(2))
		llm_bad_argument("model must not be NULL", NULL);
	if (PG_ARGISNULL(3))
		llm_bad_argument("block_size must not be NULL", NULL);
	query = text_to_cstring(PG_GETARG_TEXT_PP(0));
	b.dataset = PG_GETARG_DATUM(1);
	model = text_to_cstring(PG_GETARG_TEXT_PP(2));
	b.T = PG_GETARG_INT32(3);
	replace = !PG_ARGISNULL(4) && PG_GETARG_BOOL(4);
	llm_check_model_name(model);
	b.model = model;

	SPI_connect();
	llm_config_load(model, &cfg);
	if (b.T < 1 || b.T > cfg.n_positions)
		llm_bad_argument(psprintf("block_size must be between 1 and model \"%s\"'s n_positions %d, got %d",
							  model, cfg.n_positions, b.T), NULL);
	b.vocab = cfg.vocab;
	eot = llm_bpe_eot_id(model);
	if (eot < 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("the tokenizer of model \"%s\" has no <|endoftext|> token to separate documents", model)));
	b.rows_per_insert = Max(1, TOKENS_PER_INSERT / b.T);
	b.cap = Max(1024, 2 * b.rows_per_insert * b.T + 1);
	b.stream = palloc_extended(b.cap * sizeof(int32), MCXT_ALLOC_HUGE);
	b.insert = llm_spi_prepare("preparing the llm_dataset insert",
							   psprintf("INSERT INTO %s (dataset, tokens, target, tokenizer, tokenizer_fingerprint) "
										"SELECT $1, $2[i * $3 + 1 : (i + 1) * $3], $2[i * $3 + 2 : (i + 1) * $3 + 1], $5, $6 "
										"FROM pg_catalog.generate_series(0, $4 - 1) AS i ORDER BY i",
										llm_table("llm_dataset")),
							   6, (Oid[]) {TEXTOID, INT4ARRAYOID, INT4OID, INT4OID, TEXTOID, TEXTOID});
	if (replace)
		llm_spi_run("emptying the dataset", psprintf("DELETE FROM %s WHERE dataset = $1", llm_table("llm_dataset")),
					1, (Oid[]) {TEXTOID}, &b.dataset, false, 0, SPI_OK_DELETE);
	/* the rows record the tokenizer they are made with, which must be the dataset's */
	llm_dataset_check_tokenizer(TextDatumGetCString(b.dataset), model, false);
	{
		bool		isnull;

		llm_spi_run("reading the tokenizer's fingerprint",
					psprintf("SELECT %s($1)", llm_table("llm_tokenizer_fingerprint")),
					1, (Oid[]) {TEXTOID}, (Datum[]) {CStringGetTextDatum(model)}, true, 1, SPI_OK_SELECT);
		b.fingerprint = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		if (isnull)
			elog(ERROR, "model \"%s\" has no tokenizer fingerprint", model);
		b.fingerprint = datumCopy(b.fingerprint, false, -1);
		b.tokenizer = CStringGetTextDatum(psprintf("model %s", model));
	}

	/* the caller's query, with the caller's rights, read-only (no data-modifying WITH either) */
	plan = SPI_prepare_cursor(query, 0, NULL, CURSOR_OPT_NO_SCROLL);
	if (plan == NULL)
		elog(ERROR, "SPI_prepare_cursor failed: %s", SPI_result_code_string(SPI_result));
	sources = SPI_plan_get_plan_sources(plan);
	if (list_length(sources) != 1 || ((CachedPlanSource *) linitial(sources))->commandTag != CMDTAG_SELECT ||
		((Query *) linitial(((CachedPlanSource *) linitial(sources))->query_list))->hasModifyingCTE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("the query of llm_dataset_build must be one SELECT that changes nothing"),
				 errhint("Select one document per row, as text: SELECT body FROM articles.")));
	portal = SPI_cursor_open(NULL, plan, NULL, NULL, true);
	check_first_column(portal->tupDesc);
	batch_ctx = AllocSetContextCreate(CurrentMemoryContext, "llm_dataset_build batch", ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		SPI_cursor_fetch(portal, true, DOCS_PER_FETCH);
		if (SPI_processed == 0)
			break;
		old = MemoryContextSwitchTo(batch_ctx);
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			bool		isnull;
			Datum		d = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull);
			char	   *s;
			int			len,
						n;
			int32	   *ids;

			CHECK_FOR_INTERRUPTS();
			if (isnull)
				continue;		/* no document */
			s = bpe_datum_to_utf8(d, &len);
			if (len == 0)
				continue;		/* as pgllm dataset skips an empty file */
			ids = llm_bpe_encode(model, s, len, &n);
			append(&b, ids, n);
			append(&b, &eot, 1);
			pfree(ids);
		}
		MemoryContextSwitchTo(old);
		SPI_freetuptable(SPI_tuptable);
		MemoryContextReset(batch_ctx);
		write_rows(&b, false);
	}
	SPI_cursor_close(portal);
	write_rows(&b, true);
	SPI_finish();
	PG_RETURN_INT64(b.rows);
}
