/*
 * tensor_rows.c: a model's tensors as rows (see model.h): the one reader of name -> index ->
 * taken, for every table and file that holds a model's tensors one per row.
 */
#include "base/base.h"
#include "model/model.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/builtins.h"

void
llm_tensor_rows_begin(LlmTensorRows *rows, const LlmConfig *cfg)
{
	rows->cfg = *cfg;
	llm_layout_init(cfg, &rows->layout);
	rows->seen = palloc0(sizeof(bool) * rows->layout.num_tensors);
	rows->n_seen = 0;
}

int
llm_tensor_rows_find(LlmTensorRows *rows, const char *name, LlmTensorInfo *info)
{
	return llm_tensor_find(&rows->cfg, &rows->layout, name, info);
}

void
llm_tensor_rows_take(LlmTensorRows *rows, int index)
{
	if (rows->seen[index])
	{
		LlmTensorInfo info;

		llm_tensor_info(&rows->cfg, &rows->layout, index, &info);
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("tensor \"%s\" appears twice", info.name)));
	}
	rows->seen[index] = true;
	rows->n_seen++;
}

int
llm_tensor_rows_missing(const LlmTensorRows *rows, int from, LlmTensorInfo *info)
{
	for (int i = from; i < rows->layout.num_tensors; i++)
		if (!rows->seen[i])
		{
			llm_tensor_info(&rows->cfg, &rows->layout, i, info);
			return i;
		}
	return -1;
}

void
llm_tensor_rows_scan(LlmTensorRows *rows, const char *sql, Oid key_type, Datum key, bool read_only,
					 LlmTensorRowFn fn, void *arg)
{
	Oid			argtypes[1] = {key_type};
	Datum		values[1] = {key};
	Portal		portal = SPI_cursor_open_with_args(NULL, sql, 1, argtypes, values, NULL, read_only,
												   CURSOR_OPT_NO_SCROLL);

	for (;;)
	{
		SPI_cursor_fetch(portal, true, 16);
		if (SPI_processed == 0)
			break;
		for (uint64 r = 0; r < SPI_processed; r++)
		{
			HeapTuple	tuple = SPI_tuptable->vals[r];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			bool		isnull;
			char	   *name = TextDatumGetCString(SPI_getbinval(tuple, desc, 1, &isnull));
			LlmTensorInfo info;
			int			index = llm_tensor_rows_find(rows, name, &info);

			CHECK_FOR_INTERRUPTS();
			if (index >= 0)
				llm_tensor_rows_take(rows, index);
			fn(arg, tuple, desc, name, index, &info);
			pfree(name);
		}
		SPI_freetuptable(SPI_tuptable);
	}
	SPI_cursor_close(portal);
}
