/*
 * generate.c: the SQL functions of inference: logits and generation (whole, streamed); beam
 * search is in beam.c. The argument checks and the text helpers they share are in generate.h.
 *
 * Token-level functions (llm_logits, llm_generate_tokens) take and return token ids; the text
 * functions (llm_generate, llm_generate_stream) wrap them with the model's tokenizer (bpe.c) and
 * stop at its <|endoftext|>. Nothing here writes to the database, so all of it runs on a hot
 * standby.
 *
 * Generation runs one prompt pass, then one step per new token (infer.c). The last token needs no
 * step: its logits would only be used for a token that is not generated. Those passes run in the
 * model's batch runner when there is one (runner.h), together with other sessions' sequences,
 * else in this backend: the same logits either way, so the same tokens.
 */
#include "base/base.h"
#include "weights/weights.h"
#include "tokenizer/tokenizer.h"
#include "generate/generate.h"
#include "infer/infer.h"
#include "runner/runner.h"
#include "tokenizer/utf8.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "funcapi.h"
/*
 * libpq.h (for pq_flush) pulls in libpq-be.h, which needs the GSSAPI headers when the server was
 * built with GSSAPI. We use nothing of GSSAPI or of the Port struct, so its declarations are left out.
 */
#undef ENABLE_GSS
#include "libpq/libpq.h"
#include "miscadmin.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

/* ---- arguments ----------------------------------------------------------------------------- */

int32 *
llm_tokens_from_array(ArrayType *a, int *n)
{
	int32	   *out;

	if (ARR_NDIM(a) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("tokens must be a one-dimensional array")));
	if (ARR_HASNULL(a) && array_contains_nulls(a))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("tokens must not contain nulls")));
	*n = ARR_NDIM(a) == 0 ? 0 : ARR_DIMS(a)[0];
	if (*n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("tokens must not be empty"),
				 errhint("The model needs at least one token of context.")));
	out = palloc(sizeof(int32) * *n);
	memcpy(out, ARR_DATA_PTR(a), sizeof(int32) * *n);
	return out;
}

void
llm_check_token_range(const int32 *tokens, int n, const LlmConfig *cfg)
{
	for (int i = 0; i < n; i++)
		if (tokens[i] < 0 || tokens[i] >= cfg->vocab)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("token id %d at position %d is out of range for model \"%s\"",
							tokens[i], i + 1, cfg->model),
					 errdetail("The vocabulary has %d tokens (ids 0 to %d).", cfg->vocab, cfg->vocab - 1),
					 errhint("Encode text with the model's own tokenizer: llm_encode(text, model).")));
}

void
llm_check_max_tokens(int max_tokens)
{
	if (max_tokens < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must be at least 1, not %d", max_tokens)));
}

void
llm_check_context(int prompt_len, int max_tokens, const LlmConfig *cfg)
{
	if (prompt_len > cfg->n_positions)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("prompt of %d tokens is longer than the %d positions of model \"%s\"",
						prompt_len, cfg->n_positions, cfg->model),
				 errhint("Shorten the prompt.")));
	if ((int64) prompt_len + max_tokens > cfg->n_positions)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("prompt of %d tokens plus max_tokens %d exceeds the %d positions of model \"%s\"",
						prompt_len, max_tokens, cfg->n_positions, cfg->model),
				 errhint("Lower max_tokens to at most %d, or shorten the prompt.",
						 cfg->n_positions - prompt_len)));
}

static void
check_sampling(double temperature, int top_k, double top_p)
{
	if (isnan(temperature) || temperature < 0.0 || isinf(temperature))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("temperature must be a finite number >= 0, not %g", temperature),
				 errhint("Use 0 for greedy decoding.")));
	if (top_k < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("topk must be >= 0, not %d", top_k),
				 errhint("Use 0 to turn top-k filtering off.")));
	if (isnan(top_p) || top_p <= 0.0 || top_p > 1.0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("topp must be in (0, 1], not %g", top_p),
				 errhint("Use 1 to turn nucleus (top-p) filtering off.")));
}

void
llm_check_eos(int32 eos, const LlmConfig *cfg)
{
	if (eos < -1 || eos >= cfg->vocab)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("eos_token %d is out of range for model \"%s\"", eos, cfg->model),
				 errdetail("The vocabulary has %d tokens (ids 0 to %d).", cfg->vocab, cfg->vocab - 1),
				 errhint("Use -1 or NULL for no end token.")));
}

ArrayType *
llm_tokens_to_array(const int32 *tokens, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Int32GetDatum(tokens[i]);
	return construct_array(d, n, INT4OID, sizeof(int32), true, TYPALIGN_INT);
}

/* ---- generation ---------------------------------------------------------------------------- */

typedef struct Generation
{
	GenSettings set;
	LlmConfig	cfg;			/* as the weights were loaded */
	LlmInfer   *inf;			/* computing in this backend */
	LlmRunnerSeq *seq;			/* else: computing in the model's batch runner */
	LlmSampler	sampler;
	const LlmLora *lora;		/* set.adapter's */
	const float *logits;		/* for the next token */
	int32	   *out;			/* (max_tokens) generated ids */
	int			n;
	bool		done;
} Generation;

/* The cached weights of the model, which must be those this generation started with. */
static const LlmModel *
model_unchanged(Generation *g)
{
	const LlmModel *m = llm_model_get(g->set.model);

	if (m->cfg.weights_version != g->cfg.weights_version || m->cfg.n_layer != g->cfg.n_layer ||
		m->cfg.d_model != g->cfg.d_model || m->cfg.n_head != g->cfg.n_head ||
		m->cfg.vocab != g->cfg.vocab || m->cfg.n_positions != g->cfg.n_positions)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the weights of model \"%s\" changed during generation", g->set.model)));
	return m;
}

/*
 * Check everything, load the model, run the prompt. Allocates in CurrentMemoryContext, which must
 * live as long as the generation.
 */
static Generation *
generation_start(const GenSettings *set, const int32 *prompt, int T)
{
	Generation *g = palloc0(sizeof(Generation));
	const LlmModel *m;

	g->set = *set;
	llm_check_max_tokens(set->max_tokens);
	check_sampling(set->temperature, set->top_k, set->top_p);
	llm_config_load(set->model, &g->cfg);
	llm_check_token_range(prompt, T, &g->cfg);
	llm_check_context(T, set->max_tokens, &g->cfg);
	llm_check_eos(set->eos, &g->cfg);

	m = llm_model_get(set->model);
	g->cfg = m->cfg;
	g->lora = llm_lora_get(set->adapter, &g->cfg);
	llm_sampler_init(&g->sampler, g->cfg.vocab, set->temperature, set->top_k, set->top_p,
					 set->has_seed, set->seed);
	g->out = palloc(sizeof(int32) * set->max_tokens);
	g->seq = llm_runner_begin(m, g->lora);
	if (g->seq != NULL)
		g->logits = llm_runner_prompt(g->seq, prompt, T);
	else
	{
		g->inf = llm_infer_create(m, 1, T, set->max_tokens);
		llm_infer_set_adapter(g->inf, -1, g->lora);
		g->logits = llm_infer_prompt(g->inf, prompt, T);
	}
	return g;
}

/* The next token; runs the step for the previous one first. Call while !g->done. */
static int32
generation_next(Generation *g, bool refresh_model)
{
	int32		tok;

	Assert(!g->done);
	if (g->n > 0)
	{
		const LlmModel *m = refresh_model ? model_unchanged(g) : NULL;

		if (g->seq != NULL)
			g->logits = llm_runner_step(g->seq, g->out[g->n - 1]);
		else
		{
			if (m != NULL)
				llm_infer_set_model(g->inf, m);
			g->logits = llm_infer_step(g->inf, &g->out[g->n - 1]);
		}
	}
	tok = llm_sample(&g->sampler, g->logits);
	g->out[g->n++] = tok;
	g->done = (tok == g->set.eos || g->n == g->set.max_tokens);
	if (g->done)
	{
		llm_runner_end(g->seq);
		g->seq = NULL;
	}
	return tok;
}

/* ---- SQL: token level ---------------------------------------------------------------------- */

/*
 * llm_logits(tokens int[], model text, adapter text) -> real[]: next-token logits after the last
 * token. NULL tokens or model: NULL (as 0.3.0's STRICT declaration).
 */
PG_FUNCTION_INFO_V1(llm_logits);
Datum
llm_logits(PG_FUNCTION_ARGS)
{
	ArrayType  *arr;
	char	   *model;
	LlmConfig	cfg;
	const LlmModel *m;
	LlmInfer   *inf;
	const float *logits;
	int			T;
	int32	   *tokens;
	Datum	   *d;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	arr = PG_GETARG_ARRAYTYPE_P(0);
	model = text_to_cstring(PG_GETARG_TEXT_PP(1));
	tokens = llm_tokens_from_array(arr, &T);
	llm_config_load(model, &cfg);
	llm_check_token_range(tokens, T, &cfg);
	llm_check_context(T, 0, &cfg);
	m = llm_model_get(model);
	inf = llm_infer_create(m, 1, T, 0);
	llm_infer_set_adapter(inf, -1, llm_lora_get(llm_lora_name_arg(fcinfo, 2), &m->cfg));
	logits = llm_infer_prompt(inf, tokens, T);
	d = palloc(sizeof(Datum) * m->cfg.vocab);
	for (int i = 0; i < m->cfg.vocab; i++)
		d[i] = Float4GetDatum(logits[i]);
	PG_RETURN_ARRAYTYPE_P(construct_array(d, m->cfg.vocab, FLOAT4OID, sizeof(float4), true, TYPALIGN_INT));
}

/*
 * Common arguments of llm_generate_tokens, the text functions and llm_generate_batch:
 * (prompt(s), max_tokens, temperature, topk, topp, model, seed) at argument positions 1..6.
 */
void
llm_sampling_args(FunctionCallInfo fcinfo, GenSettings *set)
{
	llm_require_arg(fcinfo, 1, "max_tokens");
	llm_require_arg(fcinfo, 2, "temperature");
	llm_require_arg(fcinfo, 3, "topk");
	llm_require_arg(fcinfo, 4, "topp");
	llm_require_arg(fcinfo, 5, "model");
	set->max_tokens = PG_GETARG_INT32(1);
	set->temperature = PG_GETARG_FLOAT8(2);
	set->top_k = PG_GETARG_INT32(3);
	set->top_p = PG_GETARG_FLOAT8(4);
	set->model = text_to_cstring(PG_GETARG_TEXT_PP(5));
	set->has_seed = !PG_ARGISNULL(6);
	set->seed = set->has_seed ? PG_GETARG_INT64(6) : 0;
	set->eos = -1;
	set->adapter = NULL;
	llm_check_max_tokens(set->max_tokens);
	check_sampling(set->temperature, set->top_k, set->top_p);
}

/*
 * llm_generate_tokens(tokens int[], max_tokens, temperature, topk, topp, model, seed, eos_token)
 * -> int[]: the generated ids (an eos_token that stopped generation included, as transformers).
 */
PG_FUNCTION_INFO_V1(llm_generate_tokens);
Datum
llm_generate_tokens(PG_FUNCTION_ARGS)
{
	GenSettings set;
	Generation *g;
	int32	   *prompt;
	int			T;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	llm_sampling_args(fcinfo, &set);
	if (!PG_ARGISNULL(7))
		set.eos = PG_GETARG_INT32(7);
	set.adapter = llm_lora_name_arg(fcinfo, 8);
	prompt = llm_tokens_from_array(PG_GETARG_ARRAYTYPE_P(0), &T);
	g = generation_start(&set, prompt, T);
	while (!g->done)
		generation_next(g, false);
	PG_RETURN_ARRAYTYPE_P(llm_tokens_to_array(g->out, g->n));
}

/* ---- SQL: text ----------------------------------------------------------------------------- */

/*
 * The model is looked up first, so that an unknown model is reported as such rather than as a
 * model without a tokenizer.
 */
int32 *
llm_encode_prompt(const char *model, text *prompt, int *n, int32 *eos)
{
	LlmConfig	cfg;
	int			len = VARSIZE_ANY_EXHDR(prompt);
	int32	   *ids;

	llm_config_load(model, &cfg);
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("prompt must not be empty"),
				 errhint("The model needs at least one token of context; \"<|endoftext|>\" starts a text from nothing.")));
	ids = llm_bpe_encode(model, VARDATA_ANY(prompt), len, n);
	*eos = llm_bpe_eot_id(model);
	if (*eos >= cfg.vocab)
		*eos = -1;
	return ids;
}

text *
llm_decode_generated(const char *model, const int32 *ids, int n, int32 eos)
{
	int			len;
	char	   *s;

	if (n > 0 && ids[n - 1] == eos)
		n--;
	s = llm_bpe_decode(model, ids, n, &len);
	return cstring_to_text_with_len(s, len);
}

/* Arguments (prompt, max_tokens, temperature, topk, topp, model, seed, adapter): encode, stop at eot. */
static int32 *
text_generation_args(FunctionCallInfo fcinfo, GenSettings *set, int *T)
{
	llm_sampling_args(fcinfo, set);
	set->adapter = llm_lora_name_arg(fcinfo, 7);
	return llm_encode_prompt(set->model, PG_GETARG_TEXT_PP(0), T, &set->eos);
}

/*
 * llm_generate(prompt, max_tokens, temperature, topk, topp, model, seed) -> text: the text
 * generated after the prompt.
 */
PG_FUNCTION_INFO_V1(llm_generate);
Datum
llm_generate(PG_FUNCTION_ARGS)
{
	GenSettings set;
	Generation *g;
	int32	   *prompt;
	int			T;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	prompt = text_generation_args(fcinfo, &set, &T);
	g = generation_start(&set, prompt, T);
	while (!g->done)
		generation_next(g, false);
	PG_RETURN_TEXT_P(llm_decode_generated(set.model, g->out, g->n, set.eos));
}

/*
 * Streaming. Each row is one generated token. A token's bytes may end inside a UTF-8 character
 * (byte-level BPE); its text then waits for the tokens that complete the character, so that
 * every row's `token` is whole characters and the rows' tokens concatenate to the final text,
 * exactly what llm_generate returns with the same seed.
 */
typedef struct StreamState
{
	Generation *g;
	int32	   *pending;		/* ids whose text is not out yet */
	int			n_pending;
	StringInfoData text;		/* all text so far */
	TupleDesc	desc;
} StreamState;

/* The text that token `tok` makes available (palloc'd), all that is left when `final`. */
static char *
stream_piece(StreamState *st, int32 tok, bool final, int *len)
{
	const char *model = st->g->set.model;
	char	   *piece;

	if (tok != st->g->set.eos)
		st->pending[st->n_pending++] = tok;
	if (!final)
	{
		StringInfoData bytes;

		initStringInfo(&bytes);
		for (int i = 0; i < st->n_pending; i++)
		{
			bytea	   *b = llm_bpe_token_bytes(model, st->pending[i]);

			appendBinaryStringInfo(&bytes, VARDATA(b), VARSIZE(b) - VARHDRSZ);
		}
		if (llm_utf8_unfinished_tail((unsigned char *) bytes.data, bytes.len) > 0)
		{
			*len = 0;
			return "";
		}
	}
	piece = llm_bpe_decode(model, st->pending, st->n_pending, len);
	st->n_pending = 0;
	return piece;
}

/*
 * Rows queued by earlier calls go to the client now, before the next token is computed: the
 * backend otherwise sends its output buffer only when it is full or the query ends.
 */
static void
flush_rows_to_client(void)
{
	if (whereToSendOutput == DestRemote)
		pq_flush();
}

/*
 * llm_generate_stream(prompt, max_tokens, temperature, topk, topp, model, seed)
 * -> rows (step, token_id, token, text, is_complete), one per generated token, sent as they come
 * when the function is called in the select list (a function in FROM is materialised first).
 */
PG_FUNCTION_INFO_V1(llm_generate_stream);
Datum
llm_generate_stream(PG_FUNCTION_ARGS)
{
	FuncCallContext *funcctx;
	StreamState *st;
	int32		tok;
	char	   *piece;
	int			len;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};

	if (SRF_IS_FIRSTCALL())
	{
		MemoryContext old;
		GenSettings set;
		int32	   *prompt;
		int			T;

		funcctx = SRF_FIRSTCALL_INIT();
		if (PG_ARGISNULL(0))
			SRF_RETURN_DONE(funcctx);
		/* everything the generation keeps (cache, buffers) lives, and dies, with the query */
		old = MemoryContextSwitchTo(funcctx->multi_call_memory_ctx);
		st = palloc0(sizeof(StreamState));
		prompt = text_generation_args(fcinfo, &set, &T);
		if (get_call_result_type(fcinfo, NULL, &st->desc) != TYPEFUNC_COMPOSITE)
			elog(ERROR, "llm_generate_stream must return a row type");
		st->desc = BlessTupleDesc(st->desc);
		st->g = generation_start(&set, prompt, T);
		st->pending = palloc(sizeof(int32) * set.max_tokens);
		initStringInfo(&st->text);
		funcctx->user_fctx = st;
		MemoryContextSwitchTo(old);
	}
	funcctx = SRF_PERCALL_SETUP();
	st = funcctx->user_fctx;
	if (st == NULL || st->g->done)
		SRF_RETURN_DONE(funcctx);

	flush_rows_to_client();
	tok = generation_next(st->g, true);
	piece = stream_piece(st, tok, st->g->done, &len);
	{
		MemoryContext old = MemoryContextSwitchTo(funcctx->multi_call_memory_ctx);

		appendBinaryStringInfo(&st->text, piece, len);
		MemoryContextSwitchTo(old);
	}
	values[0] = Int32GetDatum(st->g->n);
	values[1] = Int32GetDatum(tok);
	values[2] = PointerGetDatum(cstring_to_text_with_len(piece, len));
	values[3] = PointerGetDatum(cstring_to_text_with_len(st->text.data, st->text.len));
	values[4] = BoolGetDatum(st->g->done);
	SRF_RETURN_NEXT(funcctx, HeapTupleGetDatum(heap_form_tuple(st->desc, values, nulls)));
}
