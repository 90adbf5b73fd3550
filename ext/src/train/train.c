/*
 * train.c: llm_train, GPT-2 training inside PostgreSQL.
 *
 * One call = one transaction's worth of optimizer steps. Each step reads batch_size *
 * grad_accum rows of llm_dataset (position (data_pos + i) mod N in id order), runs the
 * forward and backward passes layer by layer (kernels.c, after llm.c), clips the global
 * gradient norm, applies AdamW with the warmup + cosine schedule, and appends a row to
 * llm_train_log. At the end the parameters, the AdamW moments and the step counter and data
 * position are written back, so that the next call continues exactly where this one stopped.
 *
 * Memory: the parameters are the backend's cached weight block (model.c), updated in place;
 * gradients and the two AdamW moments are blocks of the same layout (one flat loop updates
 * them all), and the activations of one micro-batch are carved from one more block.
 * An error anywhere (bad data, NaN loss, cancel, statement_timeout) rolls the whole call back;
 * the cached weights, already changed in memory, are then dropped so that the next call
 * reloads them from the tables.
 */
#include "base/base.h"
#include "weights/weights.h"
#include "compute/compute.h"
#include "train/dataset.h"
#include "train/eval.h"
#include "model/model.h"
#include "train/lock.h"

#include <math.h>
#include <time.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

/* At most this many logits (rows x V) exist at once; the head runs in chunks of rows. */
#define LOGITS_MAX_FLOATS ((size_t) 32 << 20)

typedef struct TrainArgs
{
	char	   *model;
	int			steps;
	double		beta1,
				beta2,
				eps,
				wd,
				lr_max,
				lr_min,
				grad_clip,
				dropout;
	int			warmup;
	int			batch_size;		/* B: rows per micro-batch */
	int			grad_accum;		/* micro-batches per optimizer step */
	int			total_steps;	/* schedule length; 0 = not given */
	int64		seed;
	char	   *dataset;		/* the llm_dataset rows to train on */
	char	   *eval_dataset;	/* validation rows, or NULL */
	int			eval_every;		/* steps between validation losses; 0 = after the last step only */
	int			eval_rows;		/* validation rows used; 0 = all */
	int			schedule_start; /* the step the schedule's warmup starts at (0: the model's first) */
	char	   *adapter;		/* train this adapter of the model (the model frozen), or NULL */
} TrainArgs;

/* Activations of one micro-batch (llm.c's ActivationTensors), plus per-layer scratch. */
typedef struct Acts
{
	float	   *encoded;		/* (B,T,C) */
	float	   *ln1,
			   *ln1_mean,
			   *ln1_rstd;		/* (L,B,T,C), (L,B,T), (L,B,T) */
	float	   *qkv;			/* (L,B,T,3C) */
	float	   *atty;			/* (L,B,T,C) */
	float	   *att;			/* (L,B,NH,T,T) */
	float	   *residual2;		/* (L,B,T,C) */
	float	   *ln2,
			   *ln2_mean,
			   *ln2_rstd;		/* (L,B,T,C), (L,B,T), (L,B,T) */
	float	   *fch;			/* (L,B,T,4C) */
	float	   *fch_gelu;		/* (L,B,T,4C) */
	float	   *residual3;		/* (L,B,T,C) */
	float	   *lnf,
			   *lnf_mean,
			   *lnf_rstd;		/* (B,T,C), (B,T), (B,T) */
	float	   *losses;			/* (B,T) */
	float	   *proj;			/* (B,T,C) c_proj output before the residual add */
	float	   *dresidual;		/* (B,T,C) gradient of the residual stream */
	float	   *dbtc;			/* (B,T,C) dln2, datty, dln1, dlnf in turn */
	float	   *dproj;			/* (B,T,C) dresidual through the dropout mask */
	float	   *dqkv;			/* (B,T,3C) */
	float	   *dfch;			/* (B,T,4C) */
	float	   *attscratch;		/* (B,T,C+NH) */
	float	   *logits;			/* (chunk_rows,V) */
	float	   *lora_h,
			   *lora_dh;		/* (B,T,rank) an adapter's h and its gradient */
	float	   *lora_x,
			   *lora_dx;		/* (B,T,4C) an adapter's input after dropout, and its gradient */
} Acts;

/* Everything malloc'd for one call; freed on success and on error. */
typedef struct Trainer
{
	float	   *grads_memory;
	float	   *m_memory;
	float	   *v_memory;
	float	   *acts_memory;
	int32	   *inputs;			/* (B,T) */
	int32	   *targets;		/* (B,T) */
	LlmParams	grads;
	Acts		acts;
	int			chunk_rows;
	const LlmLora *lora;		/* training an adapter: only its block has gradients and moments */
	float	   *lora_grads;		/* (lora->numel) */
	float	   *lora_m,
			   *lora_v;			/* (lora->numel), palloc'd by llm_lora_load */
} Trainer;

static void
trainer_free(Trainer *tr)
{
	free(tr->grads_memory);
	free(tr->m_memory);
	free(tr->v_memory);
	free(tr->acts_memory);
	free(tr->inputs);
	free(tr->targets);
	free(tr->lora_grads);
	memset(tr, 0, sizeof(*tr));
}

static double
now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- the cached weights and the transaction ------------------------------------------------ */

/*
 * Training updates the cached weights in place and tells model.c the version it wrote. If the
 * transaction (or a subtransaction around the call) then rolls back, the tables return to the
 * old weights while the cache holds the new ones under a version number that a later write
 * could reach again: drop the cache on any abort after a training call of this transaction.
 */
static bool cache_written_in_xact = false;
static bool callbacks_registered = false;

static void
train_xact_callback(XactEvent event, void *arg)
{
	if (!cache_written_in_xact)
		return;
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		llm_model_forget();
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_PREPARE)
		cache_written_in_xact = false;
}

static void
train_subxact_callback(SubXactEvent event, SubTransactionId mySubid, SubTransactionId parentSubid, void *arg)
{
	if (cache_written_in_xact && event == SUBXACT_EVENT_ABORT_SUB)
		llm_model_forget();
}

/* ---- arguments ----------------------------------------------------------------------------- */

/* Argument positions, as declared in pg_llm--0.1.0.sql, then the upgrade script's additions. */
enum
{
	A_MODEL, A_STEPS, A_BETA1, A_BETA2, A_EPS, A_WD, A_LR_MAX, A_WARMUP,
	A_N_LAYER, A_N_HEAD, A_D, A_VOCAB, A_BATCH_SIZE, A_GRAD_ACCUM, A_GRAD_CLIP, A_LR_MIN,
	A_TOTAL_STEPS, A_DROPOUT, A_SEED, A_D_LOWER, A_DATASET, A_EVAL_DATASET, A_EVAL_EVERY, A_EVAL_ROWS,
	A_SCHEDULE_START, A_ADAPTER
};

static double
float_arg(FunctionCallInfo fcinfo, int i, const char *name)
{
	double		x = llm_float_arg(fcinfo, i, name);

	if (isnan(x) || isinf(x))
		llm_bad_argument(psprintf("%s must be a finite number", name), NULL);
	return x;
}

/* eval_dataset, eval_every, eval_rows (the upgrade script's; absent under 0.1.0's declaration). */
static void
parse_eval_args(FunctionCallInfo fcinfo, TrainArgs *a)
{
	if (PG_NARGS() <= A_EVAL_ROWS)
		return;
	a->eval_dataset = PG_ARGISNULL(A_EVAL_DATASET) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(A_EVAL_DATASET));
	a->eval_every = PG_ARGISNULL(A_EVAL_EVERY) ? 0 : PG_GETARG_INT32(A_EVAL_EVERY);
	a->eval_rows = PG_ARGISNULL(A_EVAL_ROWS) ? 0 : PG_GETARG_INT32(A_EVAL_ROWS);
	if (a->eval_every < 0)
		llm_bad_argument(psprintf("eval_every must not be negative, got %d", a->eval_every),
					 "0 evaluates after the last step only.");
	if (!PG_ARGISNULL(A_EVAL_ROWS) && a->eval_rows < 1)
		llm_bad_argument(psprintf("eval_rows must be positive, got %d", a->eval_rows),
					 "Leave it NULL to evaluate every row.");
	if (a->eval_dataset == NULL && (a->eval_every > 0 || a->eval_rows > 0))
		llm_bad_argument("eval_every and eval_rows need eval_dataset", "Pass eval_dataset => 'val'.");
}

static void
parse_args(FunctionCallInfo fcinfo, TrainArgs *a)
{
	memset(a, 0, sizeof(*a));
	a->model = llm_text_arg(fcinfo, A_MODEL, "model");
	llm_check_model_name(a->model);
	a->steps = llm_int_arg(fcinfo, A_STEPS, "steps");
	a->beta1 = float_arg(fcinfo, A_BETA1, "beta1");
	a->beta2 = float_arg(fcinfo, A_BETA2, "beta2");
	a->eps = float_arg(fcinfo, A_EPS, "eps");
	a->wd = float_arg(fcinfo, A_WD, "wd");
	a->lr_max = float_arg(fcinfo, A_LR_MAX, "lr_max");
	a->warmup = llm_int_arg(fcinfo, A_WARMUP, "warmup");
	a->batch_size = llm_int_arg(fcinfo, A_BATCH_SIZE, "batch_size");
	a->grad_accum = llm_int_arg(fcinfo, A_GRAD_ACCUM, "grad_accum");
	a->grad_clip = float_arg(fcinfo, A_GRAD_CLIP, "grad_clip");
	a->lr_min = float_arg(fcinfo, A_LR_MIN, "lr_min");
	a->total_steps = PG_ARGISNULL(A_TOTAL_STEPS) ? 0 : PG_GETARG_INT32(A_TOTAL_STEPS);
	a->dropout = float_arg(fcinfo, A_DROPOUT, "dropout");
	a->seed = PG_ARGISNULL(A_SEED) ? 1337 : PG_GETARG_INT64(A_SEED);
	a->dataset = PG_NARGS() > A_DATASET ? llm_text_arg(fcinfo, A_DATASET, "dataset") : "train";
	parse_eval_args(fcinfo, a);
	a->schedule_start = PG_NARGS() > A_SCHEDULE_START && !PG_ARGISNULL(A_SCHEDULE_START) ?
		PG_GETARG_INT32(A_SCHEDULE_START) : 0;
	a->adapter = PG_NARGS() > A_ADAPTER && !PG_ARGISNULL(A_ADAPTER) ?
		text_to_cstring(PG_GETARG_TEXT_PP(A_ADAPTER)) : NULL;

	if (a->steps <= 0)
		llm_bad_argument(psprintf("steps must be positive, got %d", a->steps), NULL);
	if (a->beta1 < 0 || a->beta1 >= 1 || a->beta2 < 0 || a->beta2 >= 1)
		llm_bad_argument("beta1 and beta2 must be in [0, 1)", NULL);
	if (a->eps <= 0)
		llm_bad_argument("eps must be positive", NULL);
	if (a->wd < 0)
		llm_bad_argument("wd must not be negative", NULL);
	if (a->lr_max < 0)
		llm_bad_argument(psprintf("lr_max must not be negative, got %g", a->lr_max), NULL);
	if (a->lr_min < 0 || a->lr_min > a->lr_max)
		llm_bad_argument(psprintf("lr_min must be between 0 and lr_max (%g), got %g", a->lr_max, a->lr_min),
					 "lr_min is the floor that the cosine schedule decays to.");
	if (a->warmup < 0)
		llm_bad_argument("warmup must not be negative", NULL);
	if (a->batch_size < 1 || a->batch_size > LLM_BATCH_SIZE_MAX)
		llm_bad_argument(psprintf("batch_size must be between 1 and %d, got %d", LLM_BATCH_SIZE_MAX, a->batch_size), NULL);
	if (a->grad_accum < 1 || a->grad_accum > LLM_GRAD_ACCUM_MAX)
		llm_bad_argument(psprintf("grad_accum must be between 1 and %d, got %d", LLM_GRAD_ACCUM_MAX, a->grad_accum), NULL);
	if (a->grad_clip < 0)
		llm_bad_argument("grad_clip must not be negative", "Use 0 to turn clipping off.");
	if (!PG_ARGISNULL(A_TOTAL_STEPS) && a->total_steps <= 0)
		llm_bad_argument(psprintf("total_steps must be positive, got %d", a->total_steps), NULL);
	if (a->dropout < 0 || a->dropout >= 1)
		llm_bad_argument(psprintf("dropout must be in [0, 1), got %g", a->dropout), NULL);
}

/*
 * n_layer, n_head, D and vocab, when given, only confirm the registered architecture. d is D's
 * alias: SQL folds an unquoted D => 48 (as the seed writes it) to d, so both spellings work.
 */
static void
check_architecture(FunctionCallInfo fcinfo, const LlmConfig *cfg)
{
	struct
	{
		int			arg;
		const char *name;
		int			actual;
	}			checks[] = {
		{A_N_LAYER, "n_layer", cfg->n_layer},
		{A_N_HEAD, "n_head", cfg->n_head},
		{A_D, "D", cfg->d_model},
		{A_D_LOWER, "d", cfg->d_model},
		{A_VOCAB, "vocab", cfg->vocab},
	};

	for (int i = 0; i < (int) lengthof(checks); i++)
	{
		if (PG_NARGS() <= checks[i].arg || PG_ARGISNULL(checks[i].arg))
			continue;
		if (PG_GETARG_INT32(checks[i].arg) != checks[i].actual)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s = %d does not match model \"%s\", which has %s = %d",
							checks[i].name, PG_GETARG_INT32(checks[i].arg), cfg->model,
							checks[i].name, checks[i].actual),
					 errhint("The architecture comes from llm_model_config; register a new model "
							 "for a different one.")));
	}
}

/* ---- memory -------------------------------------------------------------------------------- */

static float *
alloc_block(size_t n, const char *what)
{
	float	   *p = llm_alloc_floats(n);

	if (p == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory allocating %s for training", what),
				 errdetail("It needs %zu MB.", n * sizeof(float) >> 20),
				 errhint("Lower batch_size (use grad_accum for the same effective batch).")));
	return p;
}

static void
trainer_alloc(Trainer *tr, const LlmModel *model, int B, int T)
{
	const LlmLora *lora = tr->lora;
	size_t		rank = lora != NULL ? lora->rank : 0;
	size_t		lora_x = lora != NULL && lora->dropout > 0 ? 4 * (size_t) B * T * model->cfg.d_model : 0;
	size_t		L = model->cfg.n_layer,
				C = model->cfg.d_model,
				NH = model->cfg.n_head,
				V = model->cfg.vocab;
	size_t		BT = (size_t) B * T,
				BTC = BT * C;
	size_t		n = model->layout.num_params;
	struct
	{
		float	  **slot;
		size_t		size;
	}			parts[] = {
		{&tr->acts.encoded, BTC},
		{&tr->acts.ln1, L * BTC}, {&tr->acts.ln1_mean, L * BT}, {&tr->acts.ln1_rstd, L * BT},
		{&tr->acts.qkv, L * 3 * BTC},
		{&tr->acts.atty, L * BTC},
		{&tr->acts.att, L * B * NH * T * T},
		{&tr->acts.residual2, L * BTC},
		{&tr->acts.ln2, L * BTC}, {&tr->acts.ln2_mean, L * BT}, {&tr->acts.ln2_rstd, L * BT},
		{&tr->acts.fch, L * 4 * BTC},
		{&tr->acts.fch_gelu, L * 4 * BTC},
		{&tr->acts.residual3, L * BTC},
		{&tr->acts.lnf, BTC}, {&tr->acts.lnf_mean, BT}, {&tr->acts.lnf_rstd, BT},
		{&tr->acts.losses, BT},
		{&tr->acts.proj, BTC},
		{&tr->acts.dresidual, BTC},
		{&tr->acts.dbtc, BTC},
		{&tr->acts.dproj, BTC},
		{&tr->acts.dqkv, 3 * BTC},
		{&tr->acts.dfch, 4 * BTC},
		{&tr->acts.attscratch, BT * (C + NH)},
		{&tr->acts.lora_h, BT * rank}, {&tr->acts.lora_dh, BT * rank},
		{&tr->acts.lora_x, lora_x}, {&tr->acts.lora_dx, lora_x},
		{&tr->acts.logits, 0},
	};
	size_t		total = 0;
	float	   *p;

	tr->chunk_rows = (int) Max(1, Min(BT, LOGITS_MAX_FLOATS / V));
	parts[lengthof(parts) - 1].size = (size_t) tr->chunk_rows * V;
	/* each part starts on a 64-byte boundary */
	for (int i = 0; i < (int) lengthof(parts); i++)
		total += (parts[i].size + 15) & ~(size_t) 15;

	if (lora != NULL)
		tr->lora_grads = alloc_block(lora->numel, "the adapter's gradients");
	else
	{
		tr->grads_memory = alloc_block(n, "the gradients");
		tr->m_memory = alloc_block(n, "the AdamW moments");
		tr->v_memory = alloc_block(n, "the AdamW moments");
	}
	tr->acts_memory = alloc_block(total, "the activations");
	tr->inputs = (int32 *) alloc_block(BT, "the batch");
	tr->targets = (int32 *) alloc_block(BT, "the batch");
	p = tr->acts_memory;
	for (int i = 0; i < (int) lengthof(parts); i++)
	{
		*parts[i].slot = p;
		p += (parts[i].size + 15) & ~(size_t) 15;
	}
	if (lora == NULL)
		llm_params_point(tr->grads_memory, &model->layout, &tr->grads);
}

/* ---- AdamW state in llm_optim_state -------------------------------------------------------- */

/* m and v from the table; tensors without a row (a fresh model) start from zero. */
/* One row of llm_optim_state (name, m, v) into the trainer's moments. */
static void
load_moments_row(void *arg, HeapTuple tuple, TupleDesc desc, const char *name, int index, const LlmTensorInfo *info)
{
	Trainer    *tr = arg;

	if (index < 0)
		return;
	for (int k = 0; k < 2; k++)
	{
		bool		isnull;
		Datum		raw = SPI_getbinval(tuple, desc, 2 + k, &isnull);
		bytea	   *data = DatumGetByteaPP(raw);
		float	   *dst = (k == 0 ? tr->m_memory : tr->v_memory) + info->offset;

		if (VARSIZE_ANY_EXHDR(data) != info->numel * sizeof(float))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("AdamW state of tensor \"%s\" has %zu bytes in llm_optim_state, expected %zu",
							name, (size_t) VARSIZE_ANY_EXHDR(data), info->numel * sizeof(float)),
					 errhint("DELETE the model's rows from llm_optim_state to restart the optimizer.")));
		memcpy(dst, VARDATA_ANY(data), info->numel * sizeof(float));
		if ((Pointer) data != DatumGetPointer(raw))
			pfree(data);		/* detoasted copy; inline values point into the tuple */
	}
}

static void
load_optim_state(Trainer *tr, const LlmModel *model)
{
	LlmTensorRows rows;
	LlmTensorInfo info;
	int			missing = 0;

	llm_tensor_rows_begin(&rows, &model->cfg);
	llm_tensor_rows_scan(&rows, psprintf("SELECT name, m, v FROM %s WHERE model = $1", llm_table("llm_optim_state")),
						 TEXTOID, CStringGetTextDatum(model->cfg.model), true, load_moments_row, tr);
	for (int i = 0; (i = llm_tensor_rows_missing(&rows, i, &info)) >= 0; i++)
	{
		memset(tr->m_memory + info.offset, 0, info.numel * sizeof(float));
		memset(tr->v_memory + info.offset, 0, info.numel * sizeof(float));
		missing++;
	}
	if (missing > 0 && missing < rows.layout.num_tensors)
		ereport(WARNING,
				(errmsg("llm_optim_state has no AdamW state for %d of model \"%s\"'s %d tensors",
						missing, model->cfg.model, rows.layout.num_tensors),
				 errdetail("Their moments start from zero.")));
	pfree(rows.seen);
}

/*
 * Write the parameters into llm_param and the moments into llm_optim_state, one tensor and one
 * value at a time through prepared statements. Each value is copied from its block into one
 * reused buffer (the executor copies it once more into the new row), so that writing back
 * allocates no more than two copies of the largest tensor.
 */
static void
persist(Trainer *tr, LlmModel *model)
{
	const LlmLayout *layout = &model->layout;
	Oid			types[3] = {BYTEAOID, TEXTOID, TEXTOID};
	Oid			insert_types[4] = {BYTEAOID, BYTEAOID, TEXTOID, TEXTOID};
	SPIPlanPtr	update_param,
				update_m,
				update_v,
				insert_optim;
	Datum		model_name = CStringGetTextDatum(model->cfg.model);
	size_t		largest = 0;
	bytea	   *buf,
			   *buf2 = NULL;
	MemoryContext ctx = AllocSetContextCreate(CurrentMemoryContext, "llm_train persist", ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(ctx);

	for (int k = 0; k < LLM_NUM_KINDS; k++)
		largest = Max(largest, layout->size[k]);
	buf = palloc(VARHDRSZ + largest * sizeof(float));

	/* SPI_prepare keeps its plans in SPI's procedure context */
	update_param = llm_spi_prepare("preparing the llm_param update",
								   psprintf("UPDATE %s SET data = $1 WHERE model = $2 AND name = $3",
											llm_table("llm_param")), 3, types);
	update_m = llm_spi_prepare("preparing the llm_optim_state update",
							   psprintf("UPDATE %s SET m = $1 WHERE model = $2 AND name = $3",
										llm_table("llm_optim_state")), 3, types);
	update_v = llm_spi_prepare("preparing the llm_optim_state update",
							   psprintf("UPDATE %s SET v = $1 WHERE model = $2 AND name = $3",
										llm_table("llm_optim_state")), 3, types);
	insert_optim = llm_spi_prepare("preparing the llm_optim_state insert",
								   psprintf("INSERT INTO %s (m, v, model, name) VALUES ($1, $2, $3, $4)",
											llm_table("llm_optim_state")), 4, insert_types);

	for (int i = 0; i < layout->num_tensors; i++)
	{
		LlmTensorInfo info;
		Datum		values[3];

		CHECK_FOR_INTERRUPTS();
		llm_tensor_info(&model->cfg, layout, i, &info);
		values[1] = model_name;
		values[2] = CStringGetTextDatum(info.name);

		values[0] = llm_floats_bytea(buf, model->memory + info.offset, info.numel);
		if (llm_spi_run_plan("writing llm_param", update_param, values, false, 0, SPI_OK_UPDATE) != 1)
			ereport(ERROR,
					(errcode(ERRCODE_NO_DATA_FOUND),
					 errmsg("tensor \"%s\" of model \"%s\" disappeared from llm_param during training",
							info.name, model->cfg.model)));

		values[0] = llm_floats_bytea(buf, tr->m_memory + info.offset, info.numel);
		if (llm_spi_run_plan("writing llm_optim_state", update_m, values, false, 0, SPI_OK_UPDATE) == 0)
		{
			/* the model's first training call: a new row with both moments */
			Datum		row[4];

			if (buf2 == NULL)
				buf2 = palloc(VARHDRSZ + largest * sizeof(float));
			row[0] = values[0];
			row[1] = llm_floats_bytea(buf2, tr->v_memory + info.offset, info.numel);
			row[2] = model_name;
			row[3] = values[2];
			llm_spi_run_plan("writing llm_optim_state", insert_optim, row, false, 0, SPI_OK_INSERT);
		}
		else
		{
			values[0] = llm_floats_bytea(buf, tr->v_memory + info.offset, info.numel);
			llm_spi_run_plan("writing llm_optim_state", update_v, values, false, 0, SPI_OK_UPDATE);
		}
		pfree(DatumGetPointer(values[2]));
	}
	MemoryContextSwitchTo(old);
	MemoryContextDelete(ctx);
}

/* ---- the step ------------------------------------------------------------------------------ */

typedef struct StepShape
{
	int			B,
				T,
				C,
				L,
				NH,
				V;
	float		dropout;
	uint64		seed;
	int64		step;			/* global 0-based step, for the dropout masks */
	int			micro;
} StepShape;

/*
 * The adapter's part of the backward pass of layer l's product of this kind, whose input was inp
 * (BT, IC) and whose output's gradient is dout (BT, OC): its A and B gradients (written, or added
 * when accumulate), and dinp (BT, IC) += the gradient through the adapter (none when dinp is NULL).
 */
static void
adapter_backward(Trainer *tr, const LlmFullPass *pass, LlmParamKind kind, int l, float *dinp, const float *dout,
				 const float *inp, int BT, bool accumulate)
{
	const LlmLora *lora = tr->lora;
	Acts	   *a = &tr->acts;
	float	   *dA,
			   *dB;
	int			IC,
				OC;

	if (lora == NULL || !lora->target[kind])
		return;
	IC = lora->in[kind];
	OC = lora->out[kind];
	dA = tr->lora_grads + lora->a_offset[kind] + (size_t) l * lora->a_size[kind];
	dB = tr->lora_grads + lora->b_offset[kind] + (size_t) l * lora->b_size[kind];
	if (lora->dropout == 0)
	{
		lora_backward(dinp, true, dA, dB, a->lora_h, a->lora_dh, dout, inp, llm_lora_a(lora, kind, l),
					  llm_lora_b(lora, kind, l), BT, IC, OC, lora->rank, lora->scale, accumulate);
		return;
	}
	/* the input as the forward pass dropped it; the gradient through the same mask */
	memcpy(a->lora_x, inp, (size_t) BT * IC * sizeof(float));
	dropout_forward(a->lora_x, (size_t) BT * IC, lora->dropout, llm_full_pass_lora_key(pass, l, kind));
	lora_backward(dinp != NULL ? a->lora_dx : NULL, false, dA, dB, a->lora_h, a->lora_dh, dout, a->lora_x,
				  llm_lora_a(lora, kind, l), llm_lora_b(lora, kind, l), BT, IC, OC, lora->rank, lora->scale,
				  accumulate);
	if (dinp == NULL)
		return;
	dropout_forward(a->lora_dx, (size_t) BT * IC, lora->dropout, llm_full_pass_lora_key(pass, l, kind));
	residual_forward(dinp, dinp, a->lora_dx, (size_t) BT * IC);
}

/*
 * Forward and backward over one micro-batch; the parameter gradients are written (or, when
 * accumulate, added) into tr->grads, or, training an adapter, its gradients into tr->lora_grads
 * (the model frozen: only the gradients of activations flow through its layers). Returns the sum
 * of the per-token losses.
 */
static double
forward_backward(Trainer *tr, const LlmModel *model, const StepShape *s, float dloss, bool accumulate)
{
	const LlmParams *p = &model->p;
	LlmParams  *g = &tr->grads;
	Acts	   *a = &tr->acts;
	int			B = s->B,
				T = s->T,
				C = s->C,
				L = s->L,
				NH = s->NH,
				V = s->V;
	int			BT = B * T;
	size_t		BTC = (size_t) BT * C;
	size_t		C3 = 3 * (size_t) C,
				C4 = 4 * (size_t) C;
	float		pd = s->dropout;
	double		loss = 0.0;
	bool		frozen = tr->lora != NULL;
	LlmFullPass pass = {.model = model, .B = B, .T = T, .NH = NH, .att = a->att, .att_per_layer = true,
		.scratch = a->attscratch, .dropout = pd, .seed = s->seed, .step = s->step, .micro = s->micro,
		.lora = tr->lora, .lora_dropout = frozen ? tr->lora->dropout : 0, .lora_h = a->lora_h,
	.lora_x = a->lora_x};

	/* a parameter's gradient, or NULL when the model is frozen */
#define GRAD(x) (frozen ? NULL : (x))

	/* forward: every layer's activations kept for the backward pass */
	encoder_forward(a->encoded, tr->inputs, p->wte, p->wpe, B, T, C);
	dropout_forward(a->encoded, BTC, pd, llm_full_pass_key(&pass, -1, 0));
	for (int l = 0; l < L; l++)
	{
		LlmBlockActs acts = {
			.x_in = l == 0 ? a->encoded : a->residual3 + (l - 1) * BTC, .x_mid = a->residual2 + l * BTC,
			.x_out = a->residual3 + l * BTC, .ln1 = a->ln1 + l * BTC, .ln1_mean = a->ln1_mean + l * BT,
			.ln1_rstd = a->ln1_rstd + l * BT, .qkv = a->qkv + l * 3 * BTC, .att = a->atty + l * BTC,
			.ln2 = a->ln2 + l * BTC, .ln2_mean = a->ln2_mean + l * BT, .ln2_rstd = a->ln2_rstd + l * BT,
			.fch = a->fch + l * 4 * BTC, .fch_gelu = a->fch_gelu + l * 4 * BTC, .proj = a->proj,
		};

		CHECK_FOR_INTERRUPTS();
		llm_block_forward(&llm_full_pass_ops, &pass, p, &model->layout, l, &acts, (size_t) BT);
	}
	layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, a->residual3 + (L - 1) * BTC, p->lnfw, p->lnfb, BT, C);

	/* the tied head and the loss, forward and backward together */
	CHECK_FOR_INTERRUPTS();
	classifier_forward_backward(a->losses, a->dbtc, GRAD(g->wte), a->logits, a->lnf, p->wte, tr->targets,
								BT, C, V, tr->chunk_rows, dloss, accumulate);
	for (int i = 0; i < BT; i++)
		loss += a->losses[i];

	/* backward */
	memset(a->dresidual, 0, BTC * sizeof(float));
	layernorm_backward(a->dresidual, GRAD(g->lnfw), GRAD(g->lnfb), a->dbtc, a->residual3 + (L - 1) * BTC,
					   p->lnfw, a->lnf_mean, a->lnf_rstd, BT, C, accumulate);
	for (int l = L - 1; l >= 0; l--)
	{
		const float *residual = l == 0 ? a->encoded : a->residual3 + (l - 1) * BTC;
		const float *dproj = a->dresidual;
		float	   *dln1;

		CHECK_FOR_INTERRUPTS();
		/* the MLP: residual3 = residual2 + dropout(fch_gelu @ fcprojw + b) */
		if (pd > 0)
		{
			memcpy(a->dproj, a->dresidual, BTC * sizeof(float));
			dropout_forward(a->dproj, BTC, pd, llm_full_pass_key(&pass, l, 2));
			dproj = a->dproj;
		}
		matmul_backward(a->dfch, GRAD(g->fcprojw + l * C4 * C), GRAD(g->fcprojb + l * C), dproj,
						a->fch_gelu + l * 4 * BTC, p->fcprojw + l * C4 * C, BT, 4 * C, C, accumulate);
		adapter_backward(tr, &pass, LLM_FCPROJW, l, a->dfch, dproj, a->fch_gelu + l * 4 * BTC, BT, accumulate);
		gelu_backward(a->dfch, a->fch + l * 4 * BTC, a->dfch, 4 * BTC);
		matmul_backward(a->dbtc, GRAD(g->fcw + l * C * C4), GRAD(g->fcb + l * C4), a->dfch,
						a->ln2 + l * BTC, p->fcw + l * C * C4, BT, C, 4 * C, accumulate);
		adapter_backward(tr, &pass, LLM_FCW, l, a->dbtc, a->dfch, a->ln2 + l * BTC, BT, accumulate);
		layernorm_backward(a->dresidual, GRAD(g->ln2w + l * C), GRAD(g->ln2b + l * C), a->dbtc,
						   a->residual2 + l * BTC, p->ln2w + l * C, a->ln2_mean + l * BT, a->ln2_rstd + l * BT,
						   BT, C, accumulate);

		/* attention: residual2 = residual + dropout(atty @ attprojw + b) */
		dproj = a->dresidual;
		if (pd > 0)
		{
			memcpy(a->dproj, a->dresidual, BTC * sizeof(float));
			dropout_forward(a->dproj, BTC, pd, llm_full_pass_key(&pass, l, 1));
			dproj = a->dproj;
		}
		matmul_backward(a->dbtc, GRAD(g->attprojw + l * C * C), GRAD(g->attprojb + l * C), dproj,
						a->atty + l * BTC, p->attprojw + l * C * C, BT, C, C, accumulate);
		adapter_backward(tr, &pass, LLM_ATTPROJW, l, a->dbtc, dproj, a->atty + l * BTC, BT, accumulate);
		attention_backward(a->dqkv, a->attscratch, a->dbtc, a->qkv + l * 3 * BTC,
						   a->att + (size_t) l * B * NH * T * T, B, T, C, NH, pd, llm_full_pass_key(&pass, l, 0));
		/* frozen, the first layer's input wants no gradient: below it are only the embeddings */
		dln1 = frozen && l == 0 ? NULL : a->dbtc;
		matmul_backward(dln1, GRAD(g->qkvw + l * C * C3), GRAD(g->qkvb + l * C3), a->dqkv,
						a->ln1 + l * BTC, p->qkvw + l * C * C3, BT, C, 3 * C, accumulate);
		adapter_backward(tr, &pass, LLM_QKVW, l, dln1, a->dqkv, a->ln1 + l * BTC, BT, accumulate);
		if (dln1 != NULL)
			layernorm_backward(a->dresidual, GRAD(g->ln1w + l * C), GRAD(g->ln1b + l * C), a->dbtc, residual,
							   p->ln1w + l * C, a->ln1_mean + l * BT, a->ln1_rstd + l * BT, BT, C, accumulate);
	}
#undef GRAD
	if (frozen)
		return loss;			/* the embeddings have no gradient to take */
	dropout_forward(a->dresidual, BTC, pd, llm_full_pass_key(&pass, -1, 0));
	if (!accumulate)
		memset(g->wpe, 0, model->layout.size[LLM_WPE] * sizeof(float));
	encoder_backward(g->wte, g->wpe, a->dresidual, tr->inputs, B, T, C);
	return loss;
}

/*
 * Linear warmup to lr_max over `warmup` steps from schedule_start, then cosine to lr_min at
 * total_steps (a step number, as it).
 */
static double
schedule(const TrainArgs *a, int total_steps, int64 it)
{
	double		ratio;

	it -= a->schedule_start;
	total_steps -= a->schedule_start;
	if (it < a->warmup)
		return a->lr_max * (double) (it + 1) / a->warmup;
	if (it >= total_steps)
		return a->lr_min;
	ratio = (double) (it - a->warmup) / (double) (total_steps - a->warmup);
	return a->lr_min + 0.5 * (1.0 + cos(M_PI * ratio)) * (a->lr_max - a->lr_min);
}

/*
 * AdamW over the whole block. The block is ordered by kind, and weight decay is a property of
 * the kind (llm_tensor_info's decay flag: 2-D tensors decay, biases and LayerNorm do not, as in
 * nanoGPT), so one flat update per run of kinds with the same rule covers every tensor.
 */
static void
optimizer_step(Trainer *tr, LlmModel *model, const TrainArgs *a, double lr, float grad_scale, int64 t)
{
	const LlmLayout *layout = &model->layout;
	bool		decay[LLM_NUM_KINDS] = {0};
	int			k = 0;

	if (tr->lora != NULL)
	{
		/* an adapter's tensors are all matrices: all decay (PEFT trains them with the optimizer's wd) */
		adamw_update(tr->lora->memory, tr->lora_grads, tr->lora_m, tr->lora_v, tr->lora->numel, (float) lr,
					 (float) a->beta1, (float) a->beta2, (float) a->eps, (float) a->wd, grad_scale, (long) t);
		return;
	}
	for (int i = 0; i < layout->num_tensors; i++)
	{
		LlmTensorInfo info;

		llm_tensor_info(&model->cfg, layout, i, &info);
		decay[info.kind] = info.decay;
	}
	while (k < LLM_NUM_KINDS)
	{
		size_t		start = layout->offset[k],
					end;
		int			last = k;

		while (last + 1 < LLM_NUM_KINDS && decay[last + 1] == decay[k])
			last++;
		end = last + 1 < LLM_NUM_KINDS ? layout->offset[last + 1] : layout->num_params;
		adamw_update(model->memory + start, tr->grads_memory + start, tr->m_memory + start,
					 tr->v_memory + start, end - start, (float) lr, (float) a->beta1, (float) a->beta2,
					 (float) a->eps, decay[k] ? (float) a->wd : 0.0f, grad_scale, (long) t);
		k = last + 1;
	}
}

/* ---- llm_train: setup, the step loop, write-back ------------------------------------------- */

/* One call of llm_train. */
typedef struct TrainRun
{
	TrainArgs	args;
	LlmConfig	cfg;
	Datum		model_datum;	/* args.model as text */
	LlmDataset	ds;
	LlmDataset	eval_ds;		/* when args.eval_dataset */
	SPIPlanPtr	val_log;		/* UPDATE llm_train_log SET val_loss */
	LlmModel   *model;			/* the backend's cached weights, trained in place (an adapter's base: the shared block, read only) */
	LlmLora    *lora;			/* args.adapter's, trained instead (palloc'd) */
	float	   *lora_m,
			   *lora_v;			/* its AdamW moments (palloc'd) */
	Datum		name_datum;		/* what is trained, as text: the adapter, or the model */
	const char *what;			/* and in words: adapter "a", model "m" */
	Trainer    *tr;
	int64		step0;			/* the model's step counter when the call began */
	int64		data_pos;		/* and its position in the dataset */
	int			total_steps;	/* the schedule's length */
	int64		rows_per_step;
	double		tokens_per_step;
	float		last_loss;
	double		first_loss;		/* of the call's first step: what divergence is measured against */
	double		t_start,
				t_loaded,
				t_trained;
} TrainRun;

static void eval_setup(TrainRun *run);

/* The model's step counter and data position, from its row of llm_train_state (locked). */
static void
model_state_setup(TrainRun *run)
{
	Oid			text_type[1] = {TEXTOID};
	bool		isnull;

	llm_spi_run("creating the model's row of llm_train_state",
				psprintf("INSERT INTO %s (model) VALUES ($1) ON CONFLICT (model) DO NOTHING",
						 llm_table("llm_train_state")), 1, text_type, &run->model_datum, false, 0, SPI_OK_INSERT);
	if (llm_spi_run("reading llm_train_state",
					psprintf("SELECT step, data_pos FROM %s WHERE model = $1 FOR UPDATE",
							 llm_table("llm_train_state")),
					1, text_type, &run->model_datum, false, 1, SPI_OK_SELECT) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("the training state of model \"%s\" disappeared", run->args.model)));
	run->step0 = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	run->data_pos = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	SPI_freetuptable(SPI_tuptable);
}

/*
 * The adapter's row of llm_adapter, locked (FOR NO KEY UPDATE, as the model's row: against a drop
 * or a rename, and under REPEATABLE READ a serialization error when another run changed it), then
 * its tensors, moments, step counter and data position.
 */
static void
adapter_setup(TrainRun *run)
{
	Oid			text_type[1] = {TEXTOID};

	if (llm_spi_run("locking the adapter",
					psprintf("SELECT 1 FROM %s WHERE adapter = $1 FOR NO KEY UPDATE", llm_table("llm_adapter")),
					1, text_type, &run->name_datum, false, 1, SPI_OK_SELECT) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("adapter \"%s\" does not exist", run->args.adapter),
				 errhint("Create it with llm_adapter_create('%s', '%s').", run->args.adapter, run->args.model)));
	run->lora = llm_lora_load(run->args.adapter, &run->cfg, false, &run->lora_m, &run->lora_v);
	run->step0 = run->lora->step;
	run->data_pos = run->lora->data_pos;
}


/*
 * Arguments, architecture, the model's training state (locked: one trainer per model at a time),
 * the schedule and the dataset, then the weights. Inside SPI; nothing allocated outside palloc.
 */
static void
train_setup(TrainRun *run, FunctionCallInfo fcinfo)
{
	TrainArgs  *a = &run->args;

	/*
	 * One trainer per model: wait for its lock first, then read everything under a snapshot taken
	 * after it. The statement's own snapshot predates the lock, so a call that queued behind another
	 * run would otherwise load the weights and moments that run replaced, and write over its work.
	 * Under REPEATABLE READ or SERIALIZABLE the transaction keeps its snapshot: locking the model's
	 * rows below then fails with a serialization error when that run changed them.
	 */
	llm_check_model_name(a->model);
	if (a->adapter != NULL)
	{
		llm_check_model_name(a->adapter);
		llm_check_may_train_adapter();
		llm_train_lock_adapter_xact(a->adapter);
	}
	else
	{
		llm_check_may_train(a->model);
		llm_train_lock_xact(a->model);
	}
	PushActiveSnapshot(GetTransactionSnapshot());	/* popped at the end of llm_train */
	/* an adapter's base is frozen while it trains: no session changes its weights meanwhile */
	if (!llm_config_lookup(a->model, &run->cfg, a->adapter != NULL ? LLM_CONFIG_FOR_SHARE : LLM_CONFIG_FOR_CHANGE))
		llm_config_load(a->model, &run->cfg);	/* the error for a model that does not exist */
	check_architecture(fcinfo, &run->cfg);
	if (a->adapter != NULL)
		adapter_setup(run);
	else
		model_state_setup(run);
	if (run->step0 + a->steps > PG_INT32_MAX)
		llm_bad_argument("the step counter would overflow", NULL);

	/*
	 * The schedule's length: total_steps when given (pgllm train passes it, so that chunked
	 * calls follow one schedule); otherwise it ends with this call, but never before the warmup
	 * does, so that a call inside a longer warmup (the seed's 1000 steps with warmup 2000) works.
	 */
	if (a->schedule_start < 0 || a->schedule_start > run->step0)
		llm_bad_argument(psprintf("schedule_start must be between 0 and %s's step %lld, got %d",
							  run->what, (long long) run->step0, a->schedule_start),
					 "A schedule starts at a step the model has reached (its step counter for a new one).");
	run->total_steps = a->total_steps > 0 ? a->total_steps :
		(int) Max(run->step0 + a->steps, a->schedule_start + a->warmup);
	if (run->total_steps <= a->schedule_start)
		llm_bad_argument(psprintf("total_steps (%d) must be after schedule_start (%d)", run->total_steps, a->schedule_start),
					 NULL);
	if (a->warmup > run->total_steps - a->schedule_start)
		ereport(NOTICE,
				(errmsg("warmup (%d steps) is longer than the schedule (total_steps = %d): the learning "
						"rate rises to %g and never reaches lr_max", a->warmup, run->total_steps - a->schedule_start,
						a->lr_max * (run->total_steps - a->schedule_start) / a->warmup)));

	llm_dataset_open(&run->ds, &run->cfg, a->dataset, 0);
	if ((int64) a->batch_size * run->ds.T > PG_INT32_MAX / 4)
		llm_bad_argument(psprintf("batch_size %d times the block size %d is too large", a->batch_size, run->ds.T),
					 "Use grad_accum for a larger effective batch.");
	if (a->eval_dataset != NULL)
		eval_setup(run);
	run->rows_per_step = (int64) a->batch_size * a->grad_accum;
	run->tokens_per_step = (double) run->rows_per_step * run->ds.T;
	/* an adapter's base is only read: the server's shared float32 block, never a copy of it */
	run->model = a->adapter != NULL ? llm_model_get_block(a->model) : llm_model_get_private(a->model);
}

/* The training log of what is trained, and its key column. */
static const char *
log_table(const TrainRun *run)
{
	return llm_table(run->lora != NULL ? "llm_adapter_train_log" : "llm_train_log");
}

static const char *
log_key(const TrainRun *run)
{
	return run->lora != NULL ? "adapter" : "model";
}

/* A JSON number for the progress details; null when not finite. */
static void
json_number(StringInfo buf, const char *key, double value)
{
	appendStringInfo(buf, ", \"%s\": ", key);
	if (isfinite(value))
		appendStringInfo(buf, "%.9g", value);
	else
		appendStringInfoString(buf, "null");
}

/*
 * Progress for clients that ask for it (SET client_min_messages = debug1; pgllm train does): one
 * DEBUG1 message per step, readable text, with the same fields as a JSON object in its detail.
 * The detail is the documented channel (README, "Training progress"): "event" says what it is,
 * fields may be added but never renamed.
 */
static void
report_step(const TrainRun *run, int done, int64 step, double loss, double lr, double norm, double tokens_per_s)
{
	StringInfoData detail;

	initStringInfo(&detail);
	appendStringInfoString(&detail, "{\"event\": \"llm_train.step\", \"model\": ");
	escape_json(&detail, run->args.model);
	if (run->args.adapter != NULL)
	{
		appendStringInfoString(&detail, ", \"adapter\": ");
		escape_json(&detail, run->args.adapter);
	}
	appendStringInfo(&detail, ", \"step\": %lld, \"done\": %d, \"steps\": %d, \"total_steps\": %d",
					 (long long) step, done, run->args.steps, run->total_steps);
	json_number(&detail, "loss", loss);
	json_number(&detail, "lr", lr);
	json_number(&detail, "grad_norm", norm);
	json_number(&detail, "tokens_per_s", tokens_per_s);
	appendStringInfoChar(&detail, '}');
	ereport(DEBUG1,
			(errmsg_internal("llm_train step=%lld loss=%.6f lr=%.6e grad_norm=%.6f tokens_per_s=%.1f done=%d/%d",
							 (long long) step, loss, lr, norm, tokens_per_s, done, run->args.steps),
			 errdetail_internal("%s", detail.data),
			 errhidestmt(true)));
	pfree(detail.data);
}

/* The end of a call: its steps and where the time went, as text and as JSON. */
static void
report_end(const TrainRun *run, double t_end)
{
	StringInfoData detail;

	initStringInfo(&detail);
	appendStringInfoString(&detail, "{\"event\": \"llm_train.end\", \"model\": ");
	escape_json(&detail, run->args.model);
	appendStringInfo(&detail, ", \"steps\": %d", run->args.steps);
	json_number(&detail, "seconds", t_end - run->t_start);
	json_number(&detail, "loading_s", run->t_loaded - run->t_start);
	json_number(&detail, "training_s", run->t_trained - run->t_loaded);
	json_number(&detail, "writing_s", t_end - run->t_trained);
	appendStringInfoChar(&detail, '}');
	ereport(DEBUG1,
			(errmsg_internal("llm_train: %d steps of %s in %.2f s (loading %.2f s, training %.2f s, writing back %.2f s)",
							 run->args.steps, run->what, t_end - run->t_start, run->t_loaded - run->t_start,
							 run->t_trained - run->t_loaded, t_end - run->t_trained),
			 errdetail_internal("%s", detail.data),
			 errhidestmt(true)));
	pfree(detail.data);
}

/* ERROR when a step's loss or gradient norm is not finite: nothing of the call is written. */
static void
check_finite(const TrainRun *run, int64 step, double loss, double norm)
{
	if (!isfinite(loss))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("the loss is %s at step %lld of %s", isnan(loss) ? "NaN" : "infinite",
						(long long) step, run->what),
				 errdetail("Training stopped; nothing of this call was written."),
				 errhint("Lower lr_max, or check the weights and the data.")));
	if (!isfinite(norm))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("the gradient norm is not finite at step %lld of %s",
						(long long) step, run->what),
				 errdetail("Training stopped; nothing of this call was written."),
				 errhint("Lower lr_max, or check the weights and the data.")));
}

/* ---- validation loss --------------------------------------------------------------------- */

static void
eval_setup(TrainRun *run)
{
	llm_dataset_open(&run->eval_ds, &run->cfg, run->args.eval_dataset, run->args.eval_rows);
	run->val_log = llm_spi_prepare("preparing the training log's update",
								   psprintf("UPDATE %s SET val_loss = $3 WHERE %s = $1 AND step = $2",
											log_table(run), log_key(run)),
								   3, (Oid[]) {TEXTOID, INT4OID, FLOAT4OID});
}

/* The validation loss with the weights of this step, into its log row and a progress report. */
static void
eval_step(TrainRun *run, int64 step)
{
	int64		tokens;
	double		val = llm_eval_dataset(run->model, run->lora, &run->eval_ds, run->args.batch_size, &tokens);
	StringInfoData detail;

	llm_spi_run_plan("writing the training log", run->val_log,
					 (Datum[]) {run->name_datum, Int32GetDatum((int32) step), Float4GetDatum((float) val)},
					 false, 0, SPI_OK_UPDATE);
	initStringInfo(&detail);
	appendStringInfoString(&detail, "{\"event\": \"llm_train.eval\", \"model\": ");
	escape_json(&detail, run->what);
	appendStringInfo(&detail, ", \"step\": %lld, \"dataset\": ", (long long) step);
	escape_json(&detail, run->args.eval_dataset);
	json_number(&detail, "val_loss", val);
	appendStringInfo(&detail, ", \"tokens\": %lld}", (long long) tokens);
	ereport(DEBUG1,
			(errmsg_internal("llm_train step=%lld val_loss=%.6f", (long long) step, val),
			 errdetail_internal("%s", detail.data),
			 errhidestmt(true)));
	pfree(detail.data);
}

/*
 * ERROR when training diverges: a loss above both twice the call's first loss and ln V, the loss
 * of guessing uniformly among V tokens. No run that learns gets there: the loss falls or wobbles,
 * and a fresh model starts near ln V. Updates that are finite but far too large do (lr_max 1e6
 * took a loss of 4.81 to 1.5e6 in one step, and the model then generated one token over and over),
 * and committing them would ruin the model as surely as NaN would. after_update: the loss is the
 * last step's batch once more, with the weights that step's update left.
 */
static void
check_diverged(const TrainRun *run, int64 step, double loss, double lr, bool after_update)
{
	double		bound = Max(2.0 * run->first_loss, log((double) run->cfg.vocab));

	if (!(loss > bound))
		return;
	ereport(ERROR,
			(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
			 after_update ? errmsg("training of %s diverged at step %lld: the loss after its update is %g, up from %g at the call's first step",
								   run->what, (long long) step, loss, run->first_loss)
			 : errmsg("training of %s diverged at step %lld: the loss is %g, up from %g at the call's first step",
					  run->what, (long long) step, loss, run->first_loss),
			 errdetail("A loss above twice the first one and above ln(vocab) = %.2f (guessing uniformly) means the updates are "
					   "breaking the model; the learning rate of that step was %g. Training stopped; nothing of this call was written.",
					   log((double) run->cfg.vocab), lr),
			 errhint("Lower lr_max (it is %g).", run->args.lr_max)));
}

/*
 * ERROR when an update left a parameter NaN, infinite, or so large that float32 sums of its
 * square overflow (LayerNorm's variance would: every logit NaN). The losses only see the weights
 * before each update; without this check the last update of a call is committed unseen.
 */
static void
check_params_finite(const TrainRun *run, int64 step, double lr)
{
	if (run->lora != NULL ? isfinite(sum_of_squares(run->lora->memory, run->lora->numel))
		: isfinite(sum_of_squares(run->model->memory, run->model->layout.num_params)))
		return;
	ereport(ERROR,
			(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
			 errmsg("the update of step %lld left parameters of %s that are not finite",
					(long long) step, run->what),
			 errdetail("The learning rate of that step was %g. Training stopped; nothing of this call was written.",
					   lr),
			 errhint("Lower lr_max (it is %g).", run->args.lr_max)));
}

/*
 * The steps: per step, grad_accum micro-batches forward and backward, the gradient norm and
 * clipping, the learning rate, AdamW, a row of llm_train_log and a progress report.
 */
static void
train_steps(TrainRun *run)
{
	const TrainArgs *a = &run->args;
	Trainer    *tr = run->tr;
	LlmModel   *model = run->model;
	Oid			log_types[6] = {TEXTOID, INT4OID, FLOAT4OID, FLOAT4OID, FLOAT4OID, FLOAT4OID};
	SPIPlanPtr	log_plan;
	MemoryContext step_ctx = AllocSetContextCreate(CurrentMemoryContext, "llm_train step",
												   ALLOCSET_DEFAULT_SIZES);
	StepShape	shape = {.B = a->batch_size, .T = run->ds.T, .C = run->cfg.d_model, .L = run->cfg.n_layer,
		.NH = run->cfg.n_head, .V = run->cfg.vocab, .dropout = (float) a->dropout,
	.seed = (uint64) a->seed};

	log_plan = llm_spi_prepare("preparing the training log's insert",
							   psprintf("INSERT INTO %s (%s, step, lr, loss, grad_norm, tokens_per_s) "
										"VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (%s, step) DO UPDATE "
										"SET lr = excluded.lr, loss = excluded.loss, grad_norm = excluded.grad_norm, "
										"tokens_per_s = excluded.tokens_per_s, val_loss = NULL, created_at = now()",
										log_table(run), log_key(run), log_key(run)), 6, log_types);

	for (int s = 0; s < a->steps; s++)
	{
		MemoryContext old = MemoryContextSwitchTo(step_ctx);
		double		start = now_seconds();
		int64		it = run->step0 + s;
		double		loss = 0.0,
					norm,
					lr,
					tokens_per_s;
		float		grad_scale = 1.0f;
		Datum		values[6];

		CHECK_FOR_INTERRUPTS();
		shape.step = it;
		for (int k = 0; k < a->grad_accum; k++)
		{
			shape.micro = k;
			llm_dataset_batch(&run->ds, run->data_pos + s * run->rows_per_step + (int64) k * a->batch_size,
							  a->batch_size, run->cfg.vocab, tr->inputs, tr->targets);
			loss += forward_backward(tr, model, &shape, (float) (1.0 / run->tokens_per_step), k > 0);
		}
		loss /= run->tokens_per_step;
		norm = sqrt(tr->lora != NULL ? sum_of_squares(tr->lora_grads, tr->lora->numel)
					: sum_of_squares(tr->grads_memory, model->layout.num_params));
		check_finite(run, it + 1, loss, norm);
		if (s == 0)
			run->first_loss = loss;
		check_diverged(run, it + 1, loss, schedule(a, run->total_steps, it - 1), false);
		if (a->grad_clip > 0)
			grad_scale = (float) Min(1.0, a->grad_clip / (norm + 1e-6));
		lr = schedule(a, run->total_steps, it);
		optimizer_step(tr, model, a, lr, grad_scale, it + 1);
		check_params_finite(run, it + 1, lr);

		tokens_per_s = run->tokens_per_step / (now_seconds() - start);
		values[0] = run->name_datum;
		values[1] = Int32GetDatum((int32) (it + 1));
		values[2] = Float4GetDatum((float) lr);
		values[3] = Float4GetDatum((float) loss);
		values[4] = Float4GetDatum((float) norm);
		values[5] = Float4GetDatum((float) tokens_per_s);
		llm_spi_run_plan("writing the training log", log_plan, values, false, 0, SPI_OK_INSERT);
		report_step(run, s + 1, it + 1, loss, lr, norm, tokens_per_s);
		if (a->eval_dataset != NULL && ((a->eval_every > 0 && (it + 1) % a->eval_every == 0) || s + 1 == a->steps))
			eval_step(run, it + 1);
		run->last_loss = (float) loss;
		MemoryContextSwitchTo(old);
		MemoryContextReset(step_ctx);
	}
	MemoryContextDelete(step_ctx);

	/* the last update is committed unseen by any step's loss: its own batch once more */
	check_diverged(run, run->step0 + a->steps,
				   llm_eval_rows(model, run->lora, tr->inputs, tr->targets, a->batch_size, run->ds.T),
				   schedule(a, run->total_steps, run->step0 + a->steps - 1), true);
}

/*
 * An adapter's write-back: each tensor with its moments into its row of llm_adapter_param, then its
 * step counter, data position and the weights_version of the base it was trained on.
 */
static void
adapter_write_back(TrainRun *run)
{
	const LlmLora *lora = run->lora;
	SPIPlanPtr	update = llm_spi_prepare("preparing the llm_adapter_param update",
										 psprintf("UPDATE %s SET data = $1, m = $2, v = $3 WHERE adapter = $4 AND name = $5",
												  llm_table("llm_adapter_param")),
										 5, (Oid[]) {BYTEAOID, BYTEAOID, BYTEAOID, TEXTOID, TEXTOID});

	for (int i = 0; i < lora->num_tensors; i++)
	{
		LlmTensorInfo info;
		Datum		buf[3];
		const float *from[3] = {lora->memory, run->lora_m, run->lora_v};

		CHECK_FOR_INTERRUPTS();
		llm_lora_tensor(lora, i, &info);
		for (int k = 0; k < 3; k++)
			buf[k] = llm_floats_bytea(NULL, from[k] + info.offset, info.numel);
		if (llm_spi_run_plan("writing llm_adapter_param", update,
							 (Datum[]) {buf[0], buf[1], buf[2],
							 run->name_datum, CStringGetTextDatum(info.name)}, false, 0, SPI_OK_UPDATE) != 1)
			ereport(ERROR,
					(errcode(ERRCODE_NO_DATA_FOUND),
					 errmsg("tensor \"%s\" of adapter \"%s\" disappeared from llm_adapter_param during training",
							info.name, lora->name)));
		for (int k = 0; k < 3; k++)
			pfree(DatumGetPointer(buf[k]));
	}
	llm_spi_run("writing llm_adapter",
				psprintf("UPDATE %s SET step = $2, data_pos = $3, base_version = $4, updated_at = now() "
						 "WHERE adapter = $1", llm_table("llm_adapter")), 4,
				(Oid[]) {TEXTOID, INT4OID, INT8OID, INT8OID},
				(Datum[]) {run->name_datum, Int32GetDatum((int32) (run->step0 + run->args.steps)),
				Int64GetDatum(run->data_pos + run->args.steps * run->rows_per_step),
				Int64GetDatum(run->cfg.weights_version)},
				false, 0, SPI_OK_UPDATE);
}

/*
 * Write back: parameters and AdamW moments (persist), the step counter and data position; then
 * record the weights_version the tables now have, since the cache already holds those weights.
 * An adapter's: adapter_write_back (the model is as it was).
 */
static void
train_write_back(TrainRun *run)
{
	Trainer    *tr = run->tr;
	Oid			text_type[1] = {TEXTOID};
	bool		isnull;

	/* the gradients and activations are done with: give their memory back before writing */
	free(tr->grads_memory);
	free(tr->acts_memory);
	free(tr->lora_grads);
	tr->grads_memory = tr->acts_memory = tr->lora_grads = NULL;
	if (run->lora != NULL)
	{
		adapter_write_back(run);
		return;
	}
	persist(tr, run->model);
	llm_spi_run("writing llm_train_state",
				psprintf("UPDATE %s SET step = $2, data_pos = $3, updated_at = now() WHERE model = $1",
						 llm_table("llm_train_state")), 3,
				(Oid[]) {TEXTOID, INT4OID, INT8OID},
				(Datum[]) {run->model_datum, Int32GetDatum((int32) (run->step0 + run->args.steps)),
				Int64GetDatum(run->data_pos + run->args.steps * run->rows_per_step)},
				false, 0, SPI_OK_UPDATE);

	if (llm_spi_run("reading llm_model_config",
					psprintf("SELECT weights_version FROM %s WHERE model = $1", llm_table("llm_model_config")),
					1, text_type, &run->model_datum, false, 1, SPI_OK_SELECT) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" disappeared during training", run->args.model)));
	llm_model_set_version(run->model,
						  DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)));
	cache_written_in_xact = true;
}

PG_FUNCTION_INFO_V1(llm_train);
Datum
llm_train(PG_FUNCTION_ARGS)
{
	TrainRun	run;

	memset(&run, 0, sizeof(run));
	run.t_start = now_seconds();
	parse_args(fcinfo, &run.args);
	run.model_datum = CStringGetTextDatum(run.args.model);
	run.name_datum = CStringGetTextDatum(run.args.adapter != NULL ? run.args.adapter : run.args.model);
	run.what = run.args.adapter != NULL ? psprintf("adapter \"%s\"", run.args.adapter)
		: psprintf("model \"%s\"", run.args.model);
	llm_blas_init();
	if (!callbacks_registered)
	{
		RegisterXactCallback(train_xact_callback, NULL);
		RegisterSubXactCallback(train_subxact_callback, NULL);
		callbacks_registered = true;
	}

	SPI_connect();
	train_setup(&run, fcinfo);
	run.tr = palloc0(sizeof(Trainer));
	run.tr->lora = run.lora;
	run.tr->lora_m = run.lora_m;
	run.tr->lora_v = run.lora_v;
	PG_TRY();
	{
		trainer_alloc(run.tr, run.model, run.args.batch_size, run.ds.T);
		if (run.lora == NULL)
			load_optim_state(run.tr, run.model);
		run.t_loaded = now_seconds();
		train_steps(&run);
		run.t_trained = now_seconds();
		train_write_back(&run);
		report_end(&run, now_seconds());
	}
	PG_CATCH();
	{
		trainer_free(run.tr);
		if (run.lora == NULL)
			llm_model_forget(); /* the weights in memory may have changed already */
		PG_RE_THROW();
	}
	PG_END_TRY();

	trainer_free(run.tr);
	PopActiveSnapshot();
	SPI_finish();
	PG_RETURN_FLOAT4(run.last_loss);
}
