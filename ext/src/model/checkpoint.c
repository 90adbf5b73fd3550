/*
 * checkpoint.c: the lifecycle of a model's weights inside the database.
 *
 *   llm_weights_begin/put/finish  write a complete set of tensors into llm_param (npz.c, llm_init)
 *   llm_init                      register an architecture and initialise it the way GPT-2 does
 *   llm_checkpoint_save/load      snapshots of parameters, AdamW moments and the training position
 *
 * All of it runs in the calling transaction through SPI: an ERROR rolls back every row written.
 */
#include "base/base.h"
#include "model/model.h"
#include "model/checkpoint.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

/* ---- reading and registering architectures --------------------------------------------------- */

char *
llm_describe_architecture(const LlmConfig *c)
{
	return psprintf("n_layer=%d, n_head=%d, d_model=%d, n_positions=%d, vocab=%d",
					c->n_layer, c->n_head, c->d_model, c->n_positions, c->vocab);
}

static bool
same_architecture(const LlmConfig *a, const LlmConfig *b)
{
	return a->n_layer == b->n_layer && a->n_head == b->n_head && a->d_model == b->d_model &&
		a->n_positions == b->n_positions && a->vocab == b->vocab;
}

/* The bounds of llm_model_config's CHECK constraints, with messages that say which value is wrong. */
static void
check_architecture(const LlmConfig *c)
{
	const char *bad = NULL;

	if (c->n_layer < 1 || c->n_layer > 1000)
		bad = "n_layer must be between 1 and 1000";
	else if (c->n_head < 1 || c->n_head > 1000)
		bad = "n_head must be between 1 and 1000";
	else if (c->d_model < 1 || c->d_model > 65536)
		bad = "d_model must be between 1 and 65536";
	else if (c->n_positions < 1 || c->n_positions > 1048576)
		bad = "n_positions must be between 1 and 1048576";
	else if (c->vocab < 1 || c->vocab > 10000000)
		bad = "vocab must be between 1 and 10000000";
	else if (c->d_model % c->n_head != 0)
		bad = "n_head must divide d_model";
	if (bad)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid architecture for model \"%s\": %s", c->model, bad),
				 errdetail("Got %s.", llm_describe_architecture(c))));
}

static void
exec_model_statement(const char *sql, const char *model, int expect)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(model)};
	int			ret = SPI_execute_with_args(sql, 1, argtypes, values, NULL, false, 0);

	if (ret != expect)
		elog(ERROR, "\"%s\" failed: %s", sql, SPI_result_code_string(ret));
}

/*
 * New weights of another shape replace the model's registration: with replace, or when the model
 * has neither weights nor snapshots, so that nothing is lost (the built-in gpt2-small row, a row
 * inserted by hand). Its snapshots are of the old shape and could never be loaded again: they go
 * too. On return *have is the new registration.
 */
static void
reshape(const char *model, LlmConfig *have, const LlmConfig *arch, bool replace)
{
	Oid			types[6] = {TEXTOID, INT4OID, INT4OID, INT4OID, INT4OID, INT4OID};
	Datum		values[6] = {CStringGetTextDatum(model), Int32GetDatum(arch->n_layer), Int32GetDatum(arch->n_head),
							 Int32GetDatum(arch->d_model), Int32GetDatum(arch->n_positions), Int32GetDatum(arch->vocab)};
	LlmConfig	next = *arch;
	bool		isnull;

	strlcpy(next.model, model, sizeof(next.model));
	check_architecture(&next);
	if (!replace)
	{
		llm_spi_run("looking for the model's weights and snapshots",
					psprintf("SELECT EXISTS (SELECT 1 FROM %s WHERE model = $1) OR EXISTS (SELECT 1 FROM %s WHERE model = $1)",
							 llm_table("llm_param"), llm_table("llm_checkpoint")),
					1, types, values, true, 1, SPI_OK_SELECT);
		if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("the weights do not fit model \"%s\"", model),
					 errdetail("The model has %s; the weights have %s.",
							   llm_describe_architecture(have), llm_describe_architecture(arch)),
					 errhint("Pass replace => true to replace the model, its shape included (pgllm init --replace, "
							 "pgllm import --replace), or use another model name.")));
	}
	llm_spi_run("changing the model's shape",
				psprintf("UPDATE %s SET n_layer = $2, n_head = $3, d_model = $4, n_positions = $5, vocab = $6 "
						 "WHERE model = $1", llm_table("llm_model_config")),
				6, types, values, false, 0, SPI_OK_UPDATE);
	exec_model_statement(psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_checkpoint")), model, SPI_OK_DELETE);
	if (!llm_config_lookup(model, have, LLM_CONFIG_FOR_CHANGE))
		elog(ERROR, "model \"%s\" disappeared while changing its shape", model);
}

/* ---- the weight writer ------------------------------------------------------------------------ */

void
llm_weights_begin(LlmWeightWriter *w, const char *model, const LlmConfig *arch, bool replace)
{
	Oid			argtypes[4] = {TEXTOID, TEXTOID, INT4ARRAYOID, BYTEAOID};
	Datum		model_datum = CStringGetTextDatum(model);
	LlmConfig	have;
	bool		exists;
	int			ret;

	llm_check_model_name(model);
	memset(w, 0, sizeof(*w));
	exists = llm_config_lookup(model, &have, LLM_CONFIG_FOR_CHANGE);
	if (!exists && arch == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" does not exist", model),
				 errdetail("The weights carry no configuration record, so the architecture must be registered first."),
				 errhint("Insert the model's row into llm_model_config, or convert the checkpoint with pgllm convert, which records the architecture.")));
	if (!exists)
	{
		Oid			types[6] = {TEXTOID, INT4OID, INT4OID, INT4OID, INT4OID, INT4OID};
		Datum		values[6];

		w->cfg = *arch;
		strlcpy(w->cfg.model, model, sizeof(w->cfg.model));
		check_architecture(&w->cfg);
		values[0] = CStringGetTextDatum(model);
		values[1] = Int32GetDatum(arch->n_layer);
		values[2] = Int32GetDatum(arch->n_head);
		values[3] = Int32GetDatum(arch->d_model);
		values[4] = Int32GetDatum(arch->n_positions);
		values[5] = Int32GetDatum(arch->vocab);
		ret = SPI_execute_with_args(psprintf("INSERT INTO %s (model, n_layer, n_head, d_model, n_positions, vocab) "
											 "VALUES ($1, $2, $3, $4, $5, $6)", llm_table("llm_model_config")),
									6, types, values, NULL, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "registering model \"%s\" failed: %s", model, SPI_result_code_string(ret));
	}
	else
	{
		if (arch != NULL && !same_architecture(arch, &have))
			reshape(model, &have, arch, replace);
		w->cfg = have;
	}
	llm_layout_init(&w->cfg, &w->layout);

	/* Each tensor is one bytea value, and a bytea holds at most 1 GB. */
	for (int k = 0; k < LLM_NUM_KINDS; k++)
		if (w->layout.size[k] > (MaxAllocSize - VARHDRSZ) / sizeof(float))
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("model \"%s\" is too large for llm_param", model),
					 errdetail("One of its tensors has %zu values; a tensor is stored in one bytea of at most 1 GB.",
							   w->layout.size[k])));

	ret = SPI_execute_with_args(psprintf("SELECT 1 FROM %s WHERE model = $1 LIMIT 1", llm_table("llm_param")),
								1, argtypes, &model_datum, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading llm_param failed: %s", SPI_result_code_string(ret));
	if (SPI_processed > 0 && !replace)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("model \"%s\" already has weights", model),
				 errhint("Pass replace => true to overwrite them (pgllm init --replace, pgllm import --replace).")));

	/*
	 * New weights start the model afresh: optimizer moments, the training position and the
	 * training log belong to the old weights. Checkpoints keep their own copies and stay.
	 */
	exec_model_statement(psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_param")), model, SPI_OK_DELETE);
	exec_model_statement(psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_optim_state")), model, SPI_OK_DELETE);
	exec_model_statement(psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_train_state")), model, SPI_OK_DELETE);
	exec_model_statement(psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_train_log")), model, SPI_OK_DELETE);

	/* A generic plan: a custom one would fold each tensor into a Const, copying it. */
	w->insert = SPI_prepare_cursor(psprintf("INSERT INTO %s (model, name, shape, data) VALUES ($1, $2, $3, $4)",
											llm_table("llm_param")), 4, argtypes, CURSOR_OPT_GENERIC_PLAN);
	if (w->insert == NULL)
		elog(ERROR, "preparing the llm_param insert failed: %s", SPI_result_code_string(SPI_result));
	llm_tensor_rows_begin(&w->rows, &w->cfg);
}

bytea *
llm_weights_buffer(LlmWeightWriter *w, int index)
{
	LlmTensorInfo info;

	if (w->buffer == NULL)
	{
		size_t		largest = 0;

		for (int k = 0; k < LLM_NUM_KINDS; k++)
			largest = Max(largest, w->layout.size[k]);
		w->buffer = palloc(VARHDRSZ + largest * sizeof(float));
	}
	llm_tensor_info(&w->cfg, &w->layout, index, &info);
	SET_VARSIZE(w->buffer, VARHDRSZ + info.numel * sizeof(float));
	return w->buffer;
}

void
llm_weights_put(LlmWeightWriter *w, int index, bytea *data)
{
	LlmTensorInfo info;
	Datum		dims[2];
	Datum		values[4];
	int			ret;

	llm_tensor_info(&w->cfg, &w->layout, index, &info);
	Assert(VARSIZE(data) - VARHDRSZ == info.numel * sizeof(float));
	llm_tensor_rows_take(&w->rows, index);
	for (int d = 0; d < info.ndim; d++)
		dims[d] = Int32GetDatum(info.shape[d]);
	values[0] = CStringGetTextDatum(w->cfg.model);
	values[1] = CStringGetTextDatum(info.name);
	values[2] = PointerGetDatum(construct_array(dims, info.ndim, INT4OID, sizeof(int32), true, TYPALIGN_INT));
	values[3] = PointerGetDatum(data);
	ret = SPI_execute_plan(w->insert, values, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "writing tensor \"%s\" failed: %s", info.name, SPI_result_code_string(ret));
}

void
llm_weights_finish(LlmWeightWriter *w)
{
	LlmTensorInfo info;

	if (llm_tensor_rows_missing(&w->rows, 0, &info) >= 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("tensor \"%s\" is missing", info.name),
				 errdetail("Model \"%s\" (%s) has %d tensors; %d were given.", w->cfg.model,
						   llm_describe_architecture(&w->cfg), w->layout.num_tensors, w->rows.n_seen)));
}

/* ---- llm_init: GPT-2's initialisation, reproducible from a seed -------------------------------- */

/*
 * splitmix64 derives independent xoshiro256** states from (seed, tensor, block), so every
 * block of values is the same whatever the number of threads that fill them.
 */
static inline uint64
splitmix64(uint64 *x)
{
	uint64		z = (*x += UINT64CONST(0x9e3779b97f4a7c15));

	z = (z ^ (z >> 30)) * UINT64CONST(0xbf58476d1ce4e5b9);
	z = (z ^ (z >> 27)) * UINT64CONST(0x94d049bb133111eb);
	return z ^ (z >> 31);
}

static inline uint64
rotl(uint64 x, int k)
{
	return (x << k) | (x >> (64 - k));
}

static inline uint64
xoshiro_next(uint64 s[4])
{
	uint64		result = rotl(s[1] * 5, 7) * 9;
	uint64		t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return result;
}

#define INIT_BLOCK 65536		/* values per independently seeded block (even: Box-Muller pairs) */

typedef struct NormalFill
{
	float	   *out;			/* (n) */
	size_t		n;
	double		std;
	uint64		seed;			/* already mixed with the tensor index */
} NormalFill;

/* Blocks [start, end) of out: normal(0, std) by Box-Muller. Runs on worker threads. */
static void
normal_fill_task(void *arg, size_t start, size_t end)
{
	NormalFill *f = arg;

	for (size_t b = start; b < end; b++)
	{
		uint64		x = f->seed ^ (b * UINT64CONST(0xd1b54a32d192ed03));
		uint64		s[4];
		size_t		lo = b * INIT_BLOCK,
					hi = Min(lo + INIT_BLOCK, f->n);

		for (int i = 0; i < 4; i++)
			s[i] = splitmix64(&x);
		for (size_t i = lo; i < hi; i += 2)
		{
			/* u1 in (0, 1], u2 in [0, 1): 53 random bits each */
			double		u1 = ((xoshiro_next(s) >> 11) + 1) * 0x1.0p-53;
			double		u2 = (xoshiro_next(s) >> 11) * 0x1.0p-53;
			double		r = sqrt(-2.0 * log(u1)) * f->std;

			f->out[i] = (float) (r * cos(2.0 * M_PI * u2));
			if (i + 1 < hi)
				f->out[i + 1] = (float) (r * sin(2.0 * M_PI * u2));
		}
	}
}

PG_FUNCTION_INFO_V1(llm_init);

/*
 * llm_init(model, n_layer, n_head, d_model, n_positions, vocab, seed, replace) -> parameters
 *
 * As GPT2LMHeadModel initialises itself: weights and embeddings normal(0, 0.02), the two
 * residual projections (attn.c_proj, mlp.c_proj) normal(0, 0.02 / sqrt(2 n_layer)), biases 0,
 * LayerNorm weights 1. A NULL architecture argument is taken from the model's existing row.
 */
Datum
llm_init(PG_FUNCTION_ARGS)
{
	const char *names[5] = {"n_layer", "n_head", "d_model", "n_positions", "vocab"};
	char	   *model;
	LlmConfig	arch,
				have;
	int		   *fields[5] = {&arch.n_layer, &arch.n_head, &arch.d_model, &arch.n_positions, &arch.vocab};
	int		   *have_fields[5] = {&have.n_layer, &have.n_head, &have.d_model, &have.n_positions, &have.vocab};
	bool		any_null = false;
	uint64		seed;
	bool		replace;
	LlmWeightWriter w;

	model = llm_text_arg(fcinfo, 0, "model");
	seed = PG_ARGISNULL(6) ? 0 : (uint64) PG_GETARG_INT64(6);
	replace = PG_ARGISNULL(7) ? false : PG_GETARG_BOOL(7);
	llm_check_model_name(model);
	memset(&arch, 0, sizeof(arch));
	strlcpy(arch.model, model, sizeof(arch.model));
	for (int i = 0; i < 5; i++)
	{
		any_null |= PG_ARGISNULL(i + 1);
		*fields[i] = PG_ARGISNULL(i + 1) ? 0 : PG_GETARG_INT32(i + 1);
	}

	SPI_connect();
	if (any_null)
	{
		if (!llm_config_lookup(model, &have, LLM_CONFIG_NO_LOCK))
		{
			for (int i = 0; i < 5; i++)
				if (PG_ARGISNULL(i + 1))
					ereport(ERROR,
							(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
							 errmsg("model \"%s\" does not exist, so %s is needed", model, names[i]),
							 errhint("Give the whole architecture: n_layer, n_head, d_model, n_positions and vocab.")));
		}
		for (int i = 0; i < 5; i++)
			if (PG_ARGISNULL(i + 1))
				*fields[i] = *have_fields[i];
	}
	check_architecture(&arch);
	llm_weights_begin(&w, model, &arch, replace);

	for (int index = 0; index < w.layout.num_tensors; index++)
	{
		LlmTensorInfo info;
		bytea	   *data;
		float	   *x;

		CHECK_FOR_INTERRUPTS();
		llm_tensor_info(&w.cfg, &w.layout, index, &info);
		data = llm_weights_buffer(&w, index);
		x = (float *) VARDATA(data);
		if (info.ndim == 2)
		{
			bool		residual = info.kind == LLM_ATTPROJW || info.kind == LLM_FCPROJW;
			uint64		mix = seed ^ ((uint64) index * UINT64CONST(0x9e3779b97f4a7c15));
			NormalFill	f = {x, info.numel, residual ? 0.02 / sqrt(2.0 * w.cfg.n_layer) : 0.02,
			splitmix64(&mix)};

			llm_parallel_for((info.numel + INIT_BLOCK - 1) / INIT_BLOCK, normal_fill_task, &f);
		}
		else
		{
			float		v = (info.kind == LLM_LN1W || info.kind == LLM_LN2W || info.kind == LLM_LNFW) ? 1.0f : 0.0f;

			for (size_t i = 0; i < info.numel; i++)
				x[i] = v;
		}
		llm_weights_put(&w, index, data);
	}
	llm_weights_finish(&w);
	SPI_finish();
	PG_RETURN_INT64((int64) w.layout.num_params);
}

/* ---- checkpoints ------------------------------------------------------------------------------- */

/* A checkpoint being checked: whose fault a failure is (the model being saved, or the checkpoint). */
typedef struct CheckpointCheck
{
	const LlmConfig *cfg;
	int64		id;
	bool		saving;
} CheckpointCheck;

/* One row (name, shape, octet lengths of data, m, v) of llm_checkpoint_tensor. */
static void
check_row(void *arg, HeapTuple tuple, TupleDesc desc, const char *name, int index, const LlmTensorInfo *info)
{
	const CheckpointCheck *c = arg;
	char	   *shape = SPI_getvalue(tuple, desc, 2);
	char	   *problem = NULL;

	if (index < 0)
		problem = psprintf("the model has no tensor of that name");
	else
	{
		char	   *want = info->ndim == 2 ? psprintf("{%d,%d}", info->shape[0], info->shape[1])
		: psprintf("{%d}", info->shape[0]);
		const char *column[3] = {"data", "m", "v"};

		if (strcmp(shape, want) != 0)
			problem = psprintf("its shape is %s, the model's %s", shape, want);
		for (int k = 0; k < 3 && problem == NULL; k++)
		{
			bool		isnull;
			int32		len = DatumGetInt32(SPI_getbinval(tuple, desc, 3 + k, &isnull));

			if ((isnull && k == 0) || (!isnull && (size_t) len != info->numel * sizeof(float)))
				problem = psprintf("its %s has %d bytes, not %zu", column[k], isnull ? 0 : len,
								   info->numel * sizeof(float));
		}
	}
	if (problem && c->saving)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("model \"%s\" cannot be saved: tensor \"%s\" is inconsistent", c->cfg->model, name),
				 errdetail("%s; the model has %s.", problem, llm_describe_architecture(c->cfg))));
	if (problem)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("checkpoint %lld does not fit model \"%s\": tensor \"%s\"", (long long) c->id, c->cfg->model, name),
				 errdetail("%s; the model has %s.", problem, llm_describe_architecture(c->cfg))));
}

/*
 * Every tensor of the model, once, with the right shape and sizes (parameters and, where
 * present, both moments): a checkpoint that passes restores a loadable model. `saving` says
 * whose fault a failure is: the model being saved, or the checkpoint being loaded.
 */
static void
check_checkpoint_tensors(const LlmConfig *cfg, int64 id, bool saving)
{
	CheckpointCheck c = {cfg, id, saving};
	LlmTensorRows rows;
	LlmTensorInfo info;

	llm_tensor_rows_begin(&rows, cfg);
	llm_tensor_rows_scan(&rows, psprintf("SELECT name, shape, octet_length(data), octet_length(m), octet_length(v) "
										 "FROM %s WHERE checkpoint_id = $1", llm_table("llm_checkpoint_tensor")),
						 INT8OID, Int64GetDatum(id), false, check_row, &c);
	if (llm_tensor_rows_missing(&rows, 0, &info) < 0)
		return;
	if (saving)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("model \"%s\" cannot be saved: it has no weights for tensor \"%s\"", cfg->model, info.name)));
	ereport(ERROR,
			(errcode(ERRCODE_NO_DATA_FOUND),
			 errmsg("checkpoint %lld of model \"%s\" has no tensor \"%s\"", (long long) id, cfg->model, info.name)));
}

PG_FUNCTION_INFO_V1(llm_checkpoint_save);

/*
 * llm_checkpoint_save(model, note) -> id: copies the model's parameters, AdamW moments and
 * training position. One statement, so that all three come from the same snapshot.
 */
Datum
llm_checkpoint_save(PG_FUNCTION_ARGS)
{
	char	   *model;
	Oid			argtypes[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	char		nulls[2] = {' ', PG_ARGISNULL(1) ? 'n' : ' '};
	LlmConfig	cfg;
	int64		id;
	int64		count;
	bool		isnull;
	int			ret;

	model = llm_text_arg(fcinfo, 0, "model");
	llm_check_model_name(model);
	values[0] = CStringGetTextDatum(model);
	values[1] = PG_ARGISNULL(1) ? (Datum) 0 : PG_GETARG_DATUM(1);
	SPI_connect();
	if (!llm_config_lookup(model, &cfg, LLM_CONFIG_NO_LOCK))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" does not exist", model)));
	ret = SPI_execute_with_args(psprintf(
										 "WITH c AS ("
										 "  INSERT INTO %s (model, step, data_pos, note)"
										 "  SELECT $1, coalesce(s.step, 0), coalesce(s.data_pos, 0), $2"
										 "  FROM (SELECT) AS one LEFT JOIN %s s ON s.model = $1"
										 "  RETURNING id),"
										 " t AS ("
										 "  INSERT INTO %s (checkpoint_id, name, shape, data, m, v)"
										 "  SELECT c.id, p.name, p.shape, p.data, o.m, o.v"
										 "  FROM c, %s p LEFT JOIN %s o ON o.model = p.model AND o.name = p.name"
										 "  WHERE p.model = $1"
										 "  RETURNING 1)"
										 "SELECT (SELECT id FROM c), (SELECT count(*) FROM t)",
										 llm_table("llm_checkpoint"), llm_table("llm_train_state"),
										 llm_table("llm_checkpoint_tensor"), llm_table("llm_param"),
										 llm_table("llm_optim_state")),
								2, argtypes, values, nulls, false, 0);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "saving the checkpoint failed: %s", SPI_result_code_string(ret));
	id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	count = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	if (count == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("model \"%s\" has no weights to save", model),
				 errhint("Load weights with pgllm import, or create them with pgllm init.")));
	check_checkpoint_tensors(&cfg, id, true);
	SPI_finish();
	PG_RETURN_INT64(id);
}

PG_FUNCTION_INFO_V1(llm_checkpoint_load);

/*
 * llm_checkpoint_load(model, id) -> step: puts the model back exactly as it was saved:
 * parameters, AdamW moments (none if the snapshot had none), step and data position. Training
 * log rows after the restored step belong to the abandoned continuation and are removed.
 */
Datum
llm_checkpoint_load(PG_FUNCTION_ARGS)
{
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(0));
	int64		id = PG_GETARG_INT64(1);
	Oid			argtypes[3] = {TEXTOID, INT8OID, INT4OID};
	Datum		values[3];
	LlmConfig	cfg;
	char	   *owner;
	int32		step;
	bool		isnull;
	int			ret;
	llm_check_model_name(model);
	values[0] = CStringGetTextDatum(model);
	values[1] = Int64GetDatum(id);
	SPI_connect();
	if (!llm_config_lookup(model, &cfg, LLM_CONFIG_FOR_CHANGE))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" does not exist", model)));
	ret = SPI_execute_with_args(psprintf("SELECT model, step FROM %s WHERE id = $1 FOR SHARE", llm_table("llm_checkpoint")),
								1, argtypes + 1, values + 1, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading llm_checkpoint failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("checkpoint %lld does not exist", (long long) id),
				 errhint("pgllm checkpoint list shows the checkpoints.")));
	owner = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	step = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	if (strcmp(owner, model) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("checkpoint %lld belongs to model \"%s\", not \"%s\"", (long long) id, owner, model)));
	check_checkpoint_tensors(&cfg, id, false);

	{
		char	   *param = llm_table("llm_param"),
				   *tensor = llm_table("llm_checkpoint_tensor"),
				   *optim = llm_table("llm_optim_state"),
				   *state = llm_table("llm_train_state"),
				   *checkpoint = llm_table("llm_checkpoint"),
				   *log = llm_table("llm_train_log");
		char	   *statements[] = {
			psprintf("DELETE FROM %s WHERE model = $1", param),
			psprintf("INSERT INTO %s (model, name, shape, data) SELECT $1, name, shape, data FROM %s "
					 "WHERE checkpoint_id = $2", param, tensor),
			psprintf("DELETE FROM %s WHERE model = $1", optim),
			psprintf("INSERT INTO %s (model, name, m, v) SELECT $1, name, m, v FROM %s "
					 "WHERE checkpoint_id = $2 AND m IS NOT NULL AND v IS NOT NULL", optim, tensor),
			psprintf("INSERT INTO %s (model, step, data_pos, updated_at) SELECT $1, step, data_pos, now() "
					 "FROM %s WHERE id = $2 ON CONFLICT (model) DO UPDATE "
					 "SET step = excluded.step, data_pos = excluded.data_pos, updated_at = excluded.updated_at",
					 state, checkpoint),
			psprintf("DELETE FROM %s WHERE model = $1 AND step > $3", log),
		};

		values[2] = Int32GetDatum(step);
		for (size_t i = 0; i < lengthof(statements); i++)
		{
			CHECK_FOR_INTERRUPTS();
			ret = SPI_execute_with_args(statements[i], 3, argtypes, values, NULL, false, 0);
			if (ret < 0)
				elog(ERROR, "restoring checkpoint %lld failed: %s", (long long) id, SPI_result_code_string(ret));
		}
	}
	SPI_finish();
	PG_RETURN_INT32(step);
}
