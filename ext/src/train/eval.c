/*
 * eval.c: llm_eval, llm_perplexity, llm_embed and the validation loss of llm_train (see eval.h).
 *
 * All of them run the training forward pass (kernels.h) without dropout and without keeping
 * activations for a backward: one set of per-layer buffers, reused by every layer, malloc'd per
 * call and freed on success and on error. They write nothing, so they run on a hot standby, and
 * in parallel workers: they read the server's shared float32 block (llm_model_get_block), and their
 * products give the same bits on any number of threads (llm_sgemm_repeatable).
 */
#include "base/base.h"
#include "weights/weights.h"
#include "compute/compute.h"
#include "tokenizer/tokenizer.h"
#include "train/eval.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/tuplestore.h"

/* At most this many logits (rows x V) exist at once; the head runs in chunks of rows. */
#define LOGITS_MAX_FLOATS ((size_t) 8 << 20)

/* One forward's buffers for up to B rows of T tokens. */
typedef struct Forward
{
	int			B,
				T,
				C,
				NH,
				V;
	int			chunk_rows;
	float	   *memory;
	float	   *resid;			/* (B,T,C) the residual stream */
	float	   *ln;				/* (B,T,C) a LayerNorm's output; after the last layer, ln_f's */
	float	   *qkv;			/* (B,T,3C) */
	float	   *atty;			/* (B,T,C) */
	float	   *att;			/* (B,NH,T,T) */
	float	   *scratch;		/* (B,T,C+NH) */
	float	   *proj;			/* (B,T,C) */
	float	   *fch;			/* (B,T,4C) */
	float	   *logits;			/* (chunk_rows,V) */
	float	   *losses;			/* (B,T) */
	int32	   *inputs;			/* (B,T) */
	int32	   *targets;		/* (B,T) */
	const LlmLora *lora;		/* the adapter the rows run with, or NULL */
} Forward;

static void
forward_free(Forward *f)
{
	free(f->memory);
	f->memory = NULL;
}

/* Buffers for B rows of T tokens of the model, run with adapter lora (NULL: none); ERROR when out of memory. */
static void
forward_alloc(Forward *f, const LlmConfig *cfg, const LlmLora *lora, int B, int T)
{
	size_t		BT = (size_t) B * T,
				C = cfg->d_model,
				NH = cfg->n_head,
				V = cfg->vocab;
	struct
	{
		float	  **slot;
		size_t		size;
	}			parts[] = {
		{&f->resid, BT * C}, {&f->ln, BT * C}, {&f->qkv, 3 * BT * C}, {&f->atty, BT * C},
		{&f->att, (size_t) B * NH * T * T}, {&f->scratch, BT * (C + NH)}, {&f->proj, BT * C},
		{&f->fch, 4 * BT * C}, {&f->logits, 0}, {&f->losses, BT},
		{(float **) &f->inputs, BT}, {(float **) &f->targets, BT},
	};
	size_t		total = 0;
	float	   *p;

	memset(f, 0, sizeof(*f));
	f->lora = lora;
	f->B = B;
	f->T = T;
	f->C = cfg->d_model;
	f->NH = cfg->n_head;
	f->V = cfg->vocab;
	f->chunk_rows = (int) Max(1, Min(BT, LOGITS_MAX_FLOATS / V));
	parts[8].size = (size_t) f->chunk_rows * V;
	for (int i = 0; i < (int) lengthof(parts); i++)
		total += (parts[i].size + 15) & ~(size_t) 15;
	f->memory = llm_alloc_floats(total);
	if (f->memory == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory allocating the activations of an evaluation"),
				 errdetail("It needs %zu MB.", total * sizeof(float) >> 20),
				 errhint("Lower batch_size.")));
	p = f->memory;
	for (int i = 0; i < (int) lengthof(parts); i++)
	{
		*parts[i].slot = p;
		p += (parts[i].size + 15) & ~(size_t) 15;
	}
}

/* f->ln(B,T,C) = the final hidden states (after ln_f) of f->inputs(B,T), B <= f->B, T <= f->T. */
static void
forward_hidden(Forward *f, const LlmModel *m, int B, int T)
{
	const LlmParams *p = &m->p;
	size_t		C = f->C;
	int			BT = B * T;
	LlmFullPass pass = {.model = m, .B = B, .T = T, .NH = f->NH, .att = f->att, .scratch = f->scratch,
	.repeatable = true, .lora = f->lora};

	/* one set of activations for every layer, the residual stream updated in place */
	LlmBlockActs acts = {.x_in = f->resid, .x_mid = f->resid, .x_out = f->resid, .ln1 = f->ln, .qkv = f->qkv,
	.att = f->atty, .ln2 = f->ln, .fch = f->fch, .fch_gelu = f->fch, .proj = f->proj};

	encoder_forward(f->resid, f->inputs, p->wte, p->wpe, B, T, (int) C);
	for (int l = 0; l < m->cfg.n_layer; l++)
	{
		CHECK_FOR_INTERRUPTS();
		llm_block_forward(&llm_full_pass_ops, &pass, p, &m->layout, l, &acts, (size_t) BT);
	}
	layernorm_forward(f->ln, NULL, NULL, f->resid, p->lnfw, p->lnfb, BT, (int) C);
}

/* f->losses(B*T): the cross-entropy of each position's next-token prediction against f->targets. */
static void
forward_losses(Forward *f, const LlmModel *m, int B, int T)
{
	int			BT = B * T;

	forward_hidden(f, m, B, T);
	CHECK_FOR_INTERRUPTS();
	for (int r0 = 0; r0 < BT; r0 += f->chunk_rows)
	{
		int			rows = Min(f->chunk_rows, BT - r0);

		/* logits(rows,V) = ln_f(rows,C) @ wte^T, the tied head */
		llm_sgemm_repeatable(LlmCblasTrans, rows, f->V, f->C, f->ln + (size_t) r0 * f->C, f->C, m->p.wte, f->C,
							 0.0f, f->logits, f->V);
		crossentropy_softmax_forward_backward(f->losses + r0, f->logits, f->targets + r0, rows, f->V, 0.0f);
	}
}

double
llm_eval_dataset(const LlmModel *model, const LlmLora *lora, LlmDataset *ds, int batch_size, int64 *tokens)
{
	Forward		f;
	volatile double sum = 0.0;	/* set in PG_TRY, read after it */
	int			B = (int) Min(batch_size, ds->n);

	llm_blas_init();
	forward_alloc(&f, &model->cfg, lora, B, ds->T);
	PG_TRY();
	{
		for (int64 pos = 0; pos < ds->n; pos += B)
		{
			int			rows = (int) Min(B, ds->n - pos);

			llm_dataset_batch(ds, pos, rows, model->cfg.vocab, f.inputs, f.targets);
			forward_losses(&f, model, rows, ds->T);
			for (int i = 0; i < rows * ds->T; i++)
				sum += f.losses[i];
			/* progress, as llm_train's steps: a JSON detail at debug1 (pgllm eval draws a bar) */
			ereport(DEBUG1,
					(errmsg_internal("llm_eval: %lld of %lld rows", (long long) (pos + rows), (long long) ds->n),
					 errdetail_internal("{\"event\": \"llm_eval.rows\", \"done\": %lld, \"rows\": %lld}",
										(long long) (pos + rows), (long long) ds->n)));
		}
	}
	PG_FINALLY();
	{
		forward_free(&f);
	}
	PG_END_TRY();
	*tokens = ds->n * ds->T;
	return sum / (double) *tokens;
}

double
llm_eval_rows(const LlmModel *model, const LlmLora *lora, const int32 *inputs, const int32 *targets, int B, int T)
{
	Forward		f;
	volatile double sum = 0.0;	/* set in PG_TRY, read after it */

	llm_blas_init();
	forward_alloc(&f, &model->cfg, lora, B, T);
	PG_TRY();
	{
		memcpy(f.inputs, inputs, sizeof(int32) * B * T);
		memcpy(f.targets, targets, sizeof(int32) * B * T);
		forward_losses(&f, model, B, T);
		for (int i = 0; i < B * T; i++)
			sum += f.losses[i];
	}
	PG_FINALLY();
	{
		forward_free(&f);
	}
	PG_END_TRY();
	return sum / ((double) B * T);
}

/* ---- SQL ----------------------------------------------------------------------------------- */

PG_FUNCTION_INFO_V1(llm_eval);
Datum
llm_eval(PG_FUNCTION_ARGS)
{
	char	   *model_name = llm_text_arg(fcinfo, 0, "model");
	char	   *dataset = llm_text_arg(fcinfo, 1, "dataset");
	int64		max_rows = PG_ARGISNULL(2) ? 0 : PG_GETARG_INT32(2);
	int			batch_size = PG_ARGISNULL(3) ? 8 : PG_GETARG_INT32(3);
	LlmDataset	ds;
	LlmModel   *model;
	TupleDesc	desc;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};
	int64		tokens;
	double		loss;

	llm_check_model_name(model_name);
	if (!PG_ARGISNULL(2) && max_rows < 1)
		llm_bad_argument(psprintf("max_rows must be positive, got %lld", (long long) max_rows),
					 "Leave it NULL to evaluate every row.");
	if (batch_size < 1 || batch_size > LLM_BATCH_SIZE_MAX)
		llm_bad_argument(psprintf("batch_size must be between 1 and %d, got %d", LLM_BATCH_SIZE_MAX, batch_size), NULL);
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "llm_eval must return a row");

	SPI_connect();
	/* the training forward pass reads float32 tensors: the block, never a served copy */
	model = llm_model_get_block(model_name);
	llm_dataset_open(&ds, &model->cfg, dataset, max_rows);
	/* llm_dataset_open may have read other tables: the model is still valid (no llm_model_get since) */
	loss = llm_eval_dataset(model, llm_lora_get(llm_lora_name_arg(fcinfo, 4), &model->cfg), &ds, batch_size,
							&tokens);
	SPI_finish();

	values[0] = Float8GetDatum(loss);
	values[1] = Float8GetDatum(exp(loss));
	values[2] = Int64GetDatum(ds.n);
	values[3] = Int64GetDatum(tokens);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

/* The model and the text's ids (SPI connected); ERROR when an id is beyond the model's vocabulary. */
static LlmModel *
model_and_ids(FunctionCallInfo fcinfo, int32 **ids, int *n)
{
	char	   *model_name = llm_text_arg(fcinfo, 1, "model");
	char	   *input;
	int			len;
	LlmModel   *model;

	llm_require_arg(fcinfo, 0, "input");
	input = bpe_datum_to_utf8(PG_GETARG_DATUM(0), &len);
	llm_check_model_name(model_name);
	*ids = llm_bpe_encode(model_name, input, len, n);
	model = llm_model_get_block(model_name);	/* float32 tensors, as llm_eval */
	for (int i = 0; i < *n; i++)
		if ((*ids)[i] >= model->cfg.vocab)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("token id %d is outside model \"%s\"'s vocabulary (0 .. %d)",
							(*ids)[i], model_name, model->cfg.vocab - 1),
					 errhint("Load the tokenizer that belongs to the model.")));
	return model;
}

/*
 * The perplexity of Hugging Face's guide ("Perplexity of fixed-length models"): windows of
 * n_positions tokens starting every `stride` tokens; in each, the tokens not scored by an earlier
 * window are the targets (the others are context), the window's mean loss over them is weighted
 * by their number less one (the guide's label shift), and the perplexity is exp(weighted sum /
 * total weight). NULL for a text of fewer than two tokens.
 */
PG_FUNCTION_INFO_V1(llm_perplexity);
Datum
llm_perplexity(PG_FUNCTION_ARGS)
{
	int32	   *ids;
	int			n,
				P,
				stride;
	LlmModel   *model;
	Forward		f;
	volatile double nll_sum = 0.0;	/* set in PG_TRY, read after it */
	volatile int64 n_tokens = 0;

	SPI_connect();
	model = model_and_ids(fcinfo, &ids, &n);
	P = model->cfg.n_positions;
	stride = PG_ARGISNULL(2) ? Max(1, P / 2) : PG_GETARG_INT32(2);
	if (stride < 1 || stride > P)
		llm_bad_argument(psprintf("stride must be between 1 and model \"%s\"'s n_positions %d, got %d",
							  model->cfg.model, P, stride), "Leave it NULL for half the window.");
	if (n < 2)
	{
		SPI_finish();
		PG_RETURN_NULL();
	}
	llm_blas_init();
	forward_alloc(&f, &model->cfg, llm_lora_get(llm_lora_name_arg(fcinfo, 3), &model->cfg), 1, Min(n, P));
	PG_TRY();
	{
		int			prev_end = 0;

		for (int begin = 0; begin < n; begin += stride)
		{
			int			end = Min(begin + P, n);
			int			T = end - begin;
			int			trg = Min(end - prev_end, T);	/* the window's new tokens */
			double		sum = 0.0;
			int			counted = 0;

			/* position t predicts token t + 1; targets are the new tokens, never the first */
			memcpy(f.inputs, ids + begin, T * sizeof(int32));
			memcpy(f.targets, ids + begin + 1, (T - 1) * sizeof(int32));
			f.targets[T - 1] = 0;
			forward_losses(&f, model, 1, T);
			for (int t = Max(1, T - trg); t < T; t++)
			{
				sum += f.losses[t - 1];
				counted++;
			}
			if (counted > 0)
			{
				nll_sum += sum / counted * (trg - 1);
				n_tokens += trg - 1;
			}
			prev_end = end;
			if (end == n)
				break;
		}
	}
	PG_FINALLY();
	{
		forward_free(&f);
	}
	PG_END_TRY();
	SPI_finish();
	if (n_tokens == 0)
		PG_RETURN_NULL();
	PG_RETURN_FLOAT8(exp(nll_sum / n_tokens));
}

/*
 * An embedding: the mean over a text's n tokens of the final hidden states ln(n, C) (after ln_f),
 * GPT2Model's last_hidden_state.mean(1), as real[] in memory context `cxt` (the caller's: SPI's
 * own is freed by SPI_finish).
 */
static ArrayType *
embedding_of(const float *ln, int n, int C, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	Datum	   *out = palloc(C * sizeof(Datum));
	ArrayType  *result;

	for (int c = 0; c < C; c++)
	{
		double		s = 0.0;

		for (int t = 0; t < n; t++)
			s += ln[(size_t) t * C + c];
		out[c] = Float4GetDatum((float) (s / n));
	}
	result = construct_array(out, C, FLOAT4OID, sizeof(float4), true, TYPALIGN_INT);
	MemoryContextSwitchTo(old);
	return result;
}

static void
check_embed_length(const LlmModel *model, int n, int ord)
{
	if (n > model->cfg.n_positions)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 ord > 0 ? errmsg("input %d has %d tokens, more than model \"%s\"'s n_positions %d",
								  ord, n, model->cfg.model, model->cfg.n_positions)
				 : errmsg("the text has %d tokens, more than model \"%s\"'s n_positions %d",
						  n, model->cfg.model, model->cfg.n_positions),
				 errhint("Embed shorter pieces, e.g. paragraphs.")));
}

PG_FUNCTION_INFO_V1(llm_embed);
Datum
llm_embed(PG_FUNCTION_ARGS)
{
	int32	   *ids;
	int			n;
	LlmModel   *model;
	Forward		f;
	ArrayType  *result = NULL;
	MemoryContext cxt = CurrentMemoryContext;

	SPI_connect();
	model = model_and_ids(fcinfo, &ids, &n);
	if (n == 0)
	{
		SPI_finish();
		PG_RETURN_NULL();
	}
	check_embed_length(model, n, 0);
	llm_blas_init();
	forward_alloc(&f, &model->cfg, llm_lora_get(llm_lora_name_arg(fcinfo, 2), &model->cfg), 1, n);
	PG_TRY();
	{
		memcpy(f.inputs, ids, n * sizeof(int32));
		forward_hidden(&f, model, 1, n);
		result = embedding_of(f.ln, n, model->cfg.d_model, cxt);
	}
	PG_FINALLY();
	{
		forward_free(&f);
	}
	PG_END_TRY();
	SPI_finish();
	PG_RETURN_ARRAYTYPE_P(result);
}

/*
 * Texts of up to this many tokens in all (padding included) share one forward pass of
 * llm_embed_batch: each weight matrix is read once for all of them (sgemm over their rows).
 */
#define EMBED_TOKENS_PER_PASS 2048

typedef struct EmbedInput
{
	int			ord;			/* 1-based position in the array */
	int			n;				/* tokens */
	int32	   *ids;
} EmbedInput;

/* Longest first, then in array order: a pass's rows have similar lengths, so little padding. */
static int
embed_input_cmp(const void *a, const void *b)
{
	const EmbedInput *x = a,
			   *y = b;

	if (x->n != y->n)
		return x->n > y->n ? -1 : 1;
	return x->ord - y->ord;
}

/*
 * llm_embed_batch(inputs text[], model) -> rows (ord, embedding): row i is llm_embed(inputs[i],
 * model) (NULL for a NULL text or one without tokens), in array order. The texts go through the
 * model together, as many per forward pass as EMBED_TOKENS_PER_PASS allows: each is padded at its
 * end to the longest of its pass, and attention is causal, so its own positions see nothing of
 * the padding and its embedding is the one it gets alone.
 */
PG_FUNCTION_INFO_V1(llm_embed_batch);
Datum
llm_embed_batch(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *model_name = llm_text_arg(fcinfo, 1, "model");
	LlmModel   *model;
	Datum	   *texts;
	bool	   *text_nulls;
	int			count = 0,
				n_inputs = 0;
	EmbedInput *inputs;
	ArrayType **results;
	Forward		f = {0};
	const LlmLora *lora;
	MemoryContext cxt = CurrentMemoryContext;

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	llm_check_model_name(model_name);
	deconstruct_array_builtin(PG_GETARG_ARRAYTYPE_P(0), TEXTOID, &texts, &text_nulls, &count);

	results = palloc0_array(ArrayType *, Max(count, 1));
	SPI_connect();
	model = llm_model_get_block(model_name);	/* float32 tensors, as llm_embed */
	lora = llm_lora_get(llm_lora_name_arg(fcinfo, 2), &model->cfg);
	inputs = palloc_array(EmbedInput, Max(count, 1));
	for (int i = 0; i < count; i++)
	{
		int			len,
					n;
		char	   *input;
		int32	   *ids;

		if (text_nulls[i])
			continue;
		input = bpe_datum_to_utf8(texts[i], &len);
		ids = llm_bpe_encode(model_name, input, len, &n);
		if (n == 0)
			continue;
		check_embed_length(model, n, i + 1);
		for (int t = 0; t < n; t++)
			if (ids[t] >= model->cfg.vocab)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_EXCEPTION),
						 errmsg("token id %d is outside model \"%s\"'s vocabulary (0 .. %d)",
								ids[t], model_name, model->cfg.vocab - 1),
						 errhint("Load the tokenizer that belongs to the model.")));
		inputs[n_inputs++] = (EmbedInput) {i + 1, n, ids};
	}
	qsort(inputs, n_inputs, sizeof(EmbedInput), embed_input_cmp);

	llm_blas_init();
	PG_TRY();
	{
		for (int first = 0; first < n_inputs;)
		{
			int			T = inputs[first].n;	/* the longest of the pass */
			int			B = Min(Max(1, EMBED_TOKENS_PER_PASS / T), n_inputs - first);

			forward_alloc(&f, &model->cfg, lora, B, T);
			for (int b = 0; b < B; b++)
			{
				const EmbedInput *in = &inputs[first + b];

				memcpy(f.inputs + (size_t) b * T, in->ids, in->n * sizeof(int32));
				memset(f.inputs + (size_t) b * T + in->n, 0, (T - in->n) * sizeof(int32));
			}
			forward_hidden(&f, model, B, T);
			for (int b = 0; b < B; b++)
				results[inputs[first + b].ord - 1] =
					embedding_of(f.ln + (size_t) b * T * f.C, inputs[first + b].n, f.C, cxt);
			forward_free(&f);
			first += B;
		}
	}
	PG_FINALLY();
	{
		forward_free(&f);
	}
	PG_END_TRY();
	SPI_finish();

	for (int i = 0; i < count; i++)
	{
		Datum		values[2] = {Int32GetDatum(i + 1), PointerGetDatum(results[i])};
		bool		nulls[2] = {false, results[i] == NULL};

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
