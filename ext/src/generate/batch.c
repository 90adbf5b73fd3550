/*
 * batch.c: llm_generate_batch(prompts text[], max_tokens, temperature, topk, topp, model, seed)
 * -> rows (ord, text): many prompts decoded together.
 *
 * Decode is bound by reading the weights (0.5 GB per step for GPT-2 small), so one step for
 * several sequences costs little more than a step for one. The call keeps up to
 * pg_llm.batch_rows sequences in flight, each in a row slot of one LlmInfer (infer.h) at its own
 * position: sequences enter free slots with their prompts' pass (one pass for the prompts that
 * enter together), every step then runs all unfinished slots together, and a slot that finishes (end-of-text or max_tokens) takes the next
 * prompt at once, so slots never idle while prompts wait.
 *
 * Row i equals llm_generate(prompts[i], ...) with the same arguments, bit for bit:
 * - prompts that enter together share a prompt pass, in which each prompt's rows get exactly the
 *   arithmetic of a single call's pass (llm_infer_prompt_rows);
 * - a step's rows never affect each other's results (llm_gemv's rows are independent, gemv.h);
 * - each prompt samples from its own stream, seeded as a single call is: with the call's seed
 *   when there is one (so row i equals llm_generate(prompts[i], ..., seed) alone), else from the
 *   backend's random state.
 * - a row's adapter adds its own update to its own rows only (infer.c's adapt ops).
 * A NULL element gives a NULL text, as llm_generate(NULL) does. Every prompt is encoded and
 * checked before anything runs, so a bad one fails the call at once, naming its position.
 */
#include "base/base.h"
#include "weights/weights.h"
#include "generate/generate.h"
#include "infer/infer.h"

#include "catalog/pg_type.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/tuplestore.h"

int			llm_batch_rows = 8;

void
llm_batch_init(void)
{
	DefineCustomIntVariable("pg_llm.batch_rows",
							"Sequences that one llm_generate_batch call decodes at once.",
							"Each step reads the weights once for all of them; more prompts wait for a free slot. "
							"Each sequence keeps its own key/value cache, so memory grows with this.",
							&llm_batch_rows,
							8, 1, LLM_BATCH_ROWS_MAX,
							PGC_USERSET, 0,
							NULL, NULL, NULL);
}

typedef struct BatchPrompt
{
	int32	   *ids;			/* NULL for a NULL element */
	int			T;
	const LlmLora *lora;		/* its adapter, or NULL */
	text	   *out;			/* the generated text, once done */
} BatchPrompt;

typedef struct BatchSlot
{
	int			prompt;			/* index of the prompt in this slot; -1: free */
	LlmSampler	sampler;
	int32	   *out;			/* (max_tokens) generated ids */
	int			n;
} BatchSlot;

typedef struct Batch
{
	GenSettings set;
	BatchPrompt *prompts;
	int			n_prompts;
	int			next;			/* first prompt not started yet */
	LlmInfer   *inf;
	BatchSlot  *slots;
	int			n_slots;
} Batch;

/* Error context: which element of the array was being checked. */
static void
prompt_error_context(void *arg)
{
	errcontext("prompt %d of llm_generate_batch", *(int *) arg);
}

/* Encode and check every prompt, as a single call checks its one (generate.c). */
static void
batch_encode(Batch *b, ArrayType *arr, const LlmConfig *cfg)
{
	Datum	   *elems;
	bool	   *nulls;
	int			ord = 0;
	ErrorContextCallback ctx = {error_context_stack, prompt_error_context, &ord};

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("prompts must be a one-dimensional array")));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &b->n_prompts);
	b->prompts = palloc0(sizeof(BatchPrompt) * Max(b->n_prompts, 1));
	error_context_stack = &ctx;
	for (int i = 0; i < b->n_prompts; i++)
	{
		BatchPrompt *p = &b->prompts[i];

		CHECK_FOR_INTERRUPTS();
		ord = i + 1;
		if (nulls[i])
			continue;
		p->ids = llm_encode_prompt(b->set.model, DatumGetTextPP(elems[i]), &p->T, &b->set.eos);
		llm_check_token_range(p->ids, p->T, cfg);
		llm_check_context(p->T, b->set.max_tokens, cfg);
	}
	error_context_stack = ctx.previous;
}

/*
 * adapters[i] (NULL: none) is prompt i's adapter; one element: every prompt's. Each adapter is
 * read once, with the caller's rights.
 */
static void
batch_adapters(Batch *b, ArrayType *arr, const LlmConfig *cfg)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	const LlmLora **loaded;

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("adapters must be a one-dimensional array")));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	if (n != 1 && n != b->n_prompts)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("adapters has %d elements for %d prompts", n, b->n_prompts),
				 errhint("Give one adapter per prompt (NULL: none), or one for all of them.")));
	loaded = palloc0(sizeof(LlmLora *) * n);
	for (int i = 0; i < n; i++)
	{
		char	   *name;

		if (nulls[i])
			continue;
		name = TextDatumGetCString(elems[i]);
		for (int j = 0; j < i && loaded[i] == NULL; j++)
			if (loaded[j] != NULL && strcmp(loaded[j]->name, name) == 0)
				loaded[i] = loaded[j];
		if (loaded[i] == NULL)
			loaded[i] = llm_lora_get(name, cfg);
	}
	for (int i = 0; i < b->n_prompts; i++)
		b->prompts[i].lora = loaded[n == 1 ? 0 : i];
}

/* Record the token drawn from `logits` for slot s; a finished sequence frees its slot. */
static void
slot_take(Batch *b, int s, const float *logits)
{
	BatchSlot  *slot = &b->slots[s];
	BatchPrompt *p = &b->prompts[slot->prompt];
	int32		tok = llm_sample(&slot->sampler, logits);

	slot->out[slot->n++] = tok;
	if (tok == b->set.eos || slot->n == b->set.max_tokens)
	{
		p->out = llm_decode_generated(b->set.model, slot->out, slot->n, b->set.eos);
		slot->prompt = -1;
	}
}

/*
 * Free slots take the next prompts: their prompts run together (llm_infer_prompt_rows: one pass
 * over the weights for as many as fit), then each draws its first token; a slot whose sequence
 * ends at once takes another prompt in the next round.
 */
static void
batch_fill(Batch *b, int *rows, const int32 **ids, int *T)
{
	for (;;)
	{
		int			n = 0;
		const float *logits;

		for (int s = 0; s < b->n_slots && b->next < b->n_prompts; s++)
		{
			BatchSlot  *slot = &b->slots[s];

			while (slot->prompt < 0 && b->next < b->n_prompts)
			{
				BatchPrompt *p = &b->prompts[b->next++];

				if (p->ids == NULL)
					continue;
				slot->prompt = p - b->prompts;
				slot->n = 0;
				llm_infer_set_adapter(b->inf, s, p->lora);
				llm_sampler_seed(&slot->sampler, b->set.has_seed, b->set.seed);
				rows[n] = s;
				ids[n] = p->ids;
				T[n++] = p->T;
			}
		}
		if (n == 0)
			return;
		logits = llm_infer_prompt_rows(b->inf, n, rows, ids, T);
		for (int i = 0; i < n; i++)
			slot_take(b, rows[i], logits + (size_t) i * b->inf->V);
	}
}

/* Generate every prompt's text (b->prompts[i].out). */
static void
batch_run(Batch *b)
{
	const LlmModel *m = llm_model_get(b->set.model);
	int			live = 0,
				max_prompt = 1;
	int		   *rows;
	int32	   *tokens;
	const int32 **ids;
	int		   *T;

	for (int i = 0; i < b->n_prompts; i++)
		if (b->prompts[i].ids != NULL)
		{
			live++;
			max_prompt = Max(max_prompt, b->prompts[i].T);
		}
	if (live == 0)
		return;
	b->n_slots = Min(live, llm_batch_rows);
	b->inf = llm_infer_create_rows(m, b->n_slots, max_prompt, max_prompt + b->set.max_tokens);
	b->slots = palloc0(sizeof(BatchSlot) * b->n_slots);
	for (int s = 0; s < b->n_slots; s++)
	{
		b->slots[s].prompt = -1;
		b->slots[s].out = palloc(sizeof(int32) * b->set.max_tokens);
		llm_sampler_init(&b->slots[s].sampler, m->cfg.vocab, b->set.temperature, b->set.top_k,
						 b->set.top_p, b->set.has_seed, b->set.seed);
	}
	rows = palloc(sizeof(int) * b->n_slots);
	tokens = palloc(sizeof(int32) * b->n_slots);
	ids = palloc(sizeof(int32 *) * b->n_slots);
	T = palloc(sizeof(int) * b->n_slots);

	for (;;)
	{
		int			n = 0;
		const float *logits;

		batch_fill(b, rows, ids, T);
		for (int s = 0; s < b->n_slots; s++)
			if (b->slots[s].prompt >= 0)
			{
				rows[n] = s;
				tokens[n++] = b->slots[s].out[b->slots[s].n - 1];
			}
		if (n == 0)
			break;
		logits = llm_infer_step_rows(b->inf, rows, n, tokens);
		for (int i = 0; i < n; i++)
			slot_take(b, rows[i], logits + (size_t) i * m->cfg.vocab);
	}
}

/*
 * llm_generate_batch(prompts text[], max_tokens, temperature, topk, topp, model, seed, adapters
 * text[]) -> rows (ord, text), ord the 1-based position in the array, in that order. Rows with
 * different adapters (and none) share every pass over the model's weights.
 */
PG_FUNCTION_INFO_V1(llm_generate_batch);
Datum
llm_generate_batch(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext work,
				old;
	LlmConfig	cfg;
	Batch		b = {0};

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0))
		return (Datum) 0;
	llm_sampling_args(fcinfo, &b.set);
	llm_config_load(b.set.model, &cfg);

	/* the caches and buffers go when the call ends, not with the query */
	work = AllocSetContextCreate(CurrentMemoryContext, "llm_generate_batch", ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(work);
	batch_encode(&b, PG_GETARG_ARRAYTYPE_P(0), &cfg);
	if (PG_NARGS() > 7 && !PG_ARGISNULL(7))
		batch_adapters(&b, PG_GETARG_ARRAYTYPE_P(7), &cfg);
	batch_run(&b);
	MemoryContextSwitchTo(old);

	for (int i = 0; i < b.n_prompts; i++)
	{
		Datum		values[2] = {Int32GetDatum(i + 1), PointerGetDatum(b.prompts[i].out)};
		bool		nulls[2] = {false, b.prompts[i].out == NULL};

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	MemoryContextDelete(work);
	return (Datum) 0;
}
