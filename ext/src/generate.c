/*
 * generate.c: the SQL functions of inference: logits, generation (whole, streamed), beam search.
 *
 * Token-level functions (llm_logits, llm_generate_tokens, llm_beam_search_tokens) take and return
 * token ids; the text functions (llm_generate, llm_generate_stream, llm_beam_search) wrap them with
 * the model's tokenizer (bpe.c) and stop at its <|endoftext|>. Nothing here writes to the database,
 * so all of it runs on a hot standby.
 *
 * Generation runs one prompt pass, then one step per new token (infer.c). The last token needs no
 * step: its logits would only be used for a token that is not generated.
 */
#include "pg_llm.h"
#include "bpe.h"
#include "infer.h"
#include "sample.h"

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
#include "utils/tuplestore.h"

/* The settings of one generation, checked. */
typedef struct GenSettings
{
	char	   *model;
	int			max_tokens;
	double		temperature;
	int			top_k;
	double		top_p;
	bool		has_seed;
	int64		seed;
	int32		eos;			/* stop after this token; -1: none */
} GenSettings;

/* ---- arguments ----------------------------------------------------------------------------- */

static void
require_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

/* A 1-D int[] without NULLs, as a palloc'd copy. */
static int32 *
tokens_from_array(ArrayType *a, int *n)
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

static void
check_token_range(const int32 *tokens, int n, const LlmConfig *cfg)
{
	for (int i = 0; i < n; i++)
		if (tokens[i] < 0 || tokens[i] >= cfg->vocab)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("token id %d at position %d is out of range for model \"%s\"",
							tokens[i], i + 1, cfg->model),
					 errdetail("The vocabulary has %d tokens (ids 0 to %d).", cfg->vocab, cfg->vocab - 1)));
}

static void
check_max_tokens(int max_tokens)
{
	if (max_tokens < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must be at least 1, not %d", max_tokens)));
}

/* The prompt and what is generated after it must fit in the model's positions. */
static void
check_context(int prompt_len, int max_tokens, const LlmConfig *cfg)
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

static void
check_eos(int32 eos, const LlmConfig *cfg)
{
	if (eos < -1 || eos >= cfg->vocab)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("eos_token %d is out of range for model \"%s\"", eos, cfg->model),
				 errdetail("The vocabulary has %d tokens (ids 0 to %d).", cfg->vocab, cfg->vocab - 1)));
}

static ArrayType *
tokens_to_array(const int32 *tokens, int n)
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
	LlmInfer   *inf;
	LlmSampler	sampler;
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
	check_max_tokens(set->max_tokens);
	check_sampling(set->temperature, set->top_k, set->top_p);
	llm_config_load(set->model, &g->cfg);
	check_token_range(prompt, T, &g->cfg);
	check_context(T, set->max_tokens, &g->cfg);
	check_eos(set->eos, &g->cfg);

	m = llm_model_get(set->model);
	g->cfg = m->cfg;
	g->inf = llm_infer_create(m, 1, T, set->max_tokens);
	llm_sampler_init(&g->sampler, g->cfg.vocab, set->temperature, set->top_k, set->top_p,
					 set->has_seed, set->seed);
	g->out = palloc(sizeof(int32) * set->max_tokens);
	g->logits = llm_infer_prompt(g->inf, prompt, T);
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
		if (refresh_model)
			llm_infer_set_model(g->inf, model_unchanged(g));
		g->logits = llm_infer_step(g->inf, &g->out[g->n - 1]);
	}
	tok = llm_sample(&g->sampler, g->logits);
	g->out[g->n++] = tok;
	g->done = (tok == g->set.eos || g->n == g->set.max_tokens);
	return tok;
}

/* ---- SQL: token level ---------------------------------------------------------------------- */

/* llm_logits(tokens int[], model text) -> real[]: next-token logits after the last token. */
PG_FUNCTION_INFO_V1(llm_logits);
Datum
llm_logits(PG_FUNCTION_ARGS)
{
	ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(0);
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(1));
	LlmConfig	cfg;
	const LlmModel *m;
	LlmInfer   *inf;
	const float *logits;
	int			T;
	int32	   *tokens = tokens_from_array(arr, &T);
	Datum	   *d;

	llm_config_load(model, &cfg);
	check_token_range(tokens, T, &cfg);
	check_context(T, 0, &cfg);
	m = llm_model_get(model);
	inf = llm_infer_create(m, 1, T, 0);
	logits = llm_infer_prompt(inf, tokens, T);
	d = palloc(sizeof(Datum) * m->cfg.vocab);
	for (int i = 0; i < m->cfg.vocab; i++)
		d[i] = Float4GetDatum(logits[i]);
	PG_RETURN_ARRAYTYPE_P(construct_array(d, m->cfg.vocab, FLOAT4OID, sizeof(float4), true, TYPALIGN_INT));
}

/*
 * Common arguments of llm_generate_tokens and the text functions:
 * (prompt, max_tokens, temperature, topk, topp, model, seed) at argument positions 1..6.
 */
static void
sampling_args(FunctionCallInfo fcinfo, GenSettings *set)
{
	require_arg(fcinfo, 1, "max_tokens");
	require_arg(fcinfo, 2, "temperature");
	require_arg(fcinfo, 3, "topk");
	require_arg(fcinfo, 4, "topp");
	require_arg(fcinfo, 5, "model");
	set->max_tokens = PG_GETARG_INT32(1);
	set->temperature = PG_GETARG_FLOAT8(2);
	set->top_k = PG_GETARG_INT32(3);
	set->top_p = PG_GETARG_FLOAT8(4);
	set->model = text_to_cstring(PG_GETARG_TEXT_PP(5));
	set->has_seed = !PG_ARGISNULL(6);
	set->seed = set->has_seed ? PG_GETARG_INT64(6) : 0;
	set->eos = -1;
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
	sampling_args(fcinfo, &set);
	if (!PG_ARGISNULL(7))
		set.eos = PG_GETARG_INT32(7);
	prompt = tokens_from_array(PG_GETARG_ARRAYTYPE_P(0), &T);
	if (set.eos < -1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("eos_token must be >= 0, not %d", set.eos)));
	g = generation_start(&set, prompt, T);
	while (!g->done)
		generation_next(g, false);
	PG_RETURN_ARRAYTYPE_P(tokens_to_array(g->out, g->n));
}

/* ---- beam search --------------------------------------------------------------------------- */

/*
 * Beam search as transformers' generate(num_beams=K, do_sample=False) does it (version 5):
 * each step keeps the 2K best continuations of all beams by summed log-probability; those ending in
 * eos (or at max_tokens) among the first K become finished hypotheses, scored by their sum divided
 * by length^length_penalty, and the K best unfinished continue. Generation stops at max_tokens, or
 * once K hypotheses are finished and the best running beam can no longer beat the worst of them
 * (early_stopping=False). All beams share the prompt's cache and run as one batch per step.
 */
typedef struct BeamCand
{
	float		score;
	int			flat;			/* beam * V + token */
} BeamCand;

typedef struct BeamHyp
{
	float		score;
	int			len;
	int32	   *tokens;
} BeamHyp;

/* a before b: higher score, then lower index (a total order, so selection is deterministic) */
static inline bool
cand_before(const BeamCand *a, const BeamCand *b)
{
	return a->score > b->score || (a->score == b->score && a->flat < b->flat);
}

/* heap[0] is the worst kept candidate */
static void
cand_sift_down(BeamCand *heap, int n, int c)
{
	for (;;)
	{
		int			l = 2 * c + 1,
					r = l + 1,
					m = c;
		BeamCand	tmp;

		if (l < n && cand_before(&heap[m], &heap[l]))
			m = l;
		if (r < n && cand_before(&heap[m], &heap[r]))
			m = r;
		if (m == c)
			return;
		tmp = heap[c];
		heap[c] = heap[m];
		heap[m] = tmp;
		c = m;
	}
}

static int
cmp_cand_desc(const void *a, const void *b)
{
	const BeamCand *x = a,
			   *y = b;

	return cand_before(x, y) ? -1 : (cand_before(y, x) ? 1 : 0);
}

static int
cmp_hyp_desc(const void *a, const void *b)
{
	const BeamHyp *x = a,
			   *y = b;

	return (x->score < y->score) - (x->score > y->score);
}

/* The k best of the n scores (k <= n), best first. */
static void
top_candidates(const float *scores, int n, BeamCand *out, int k)
{
	for (int i = 0; i < k; i++)
		out[i] = (BeamCand) {scores[i], i};
	for (int i = k / 2 - 1; i >= 0; i--)
		cand_sift_down(out, k, i);
	for (int i = k; i < n; i++)
	{
		BeamCand	c = {scores[i], i};

		if (cand_before(&c, &out[0]))
		{
			out[0] = c;
			cand_sift_down(out, k, 0);
		}
	}
	qsort(out, k, sizeof(BeamCand), cmp_cand_desc);
}

/* Returns K hypotheses, best first. */
static BeamHyp *
beam_search(const char *model, const int32 *prompt, int T, int K, int max_tokens, int32 eos,
			double length_penalty)
{
	LlmConfig	cfg;
	const LlmModel *m;
	LlmInfer   *inf;
	int			V,
				n_cand = 2 * K;	/* transformers keeps max(2, 1 + #eos) * K */
	float	   *acc;			/* (K, V) summed log-probabilities */
	float	   *run_score = palloc(sizeof(float) * K);
	int32	   *run_tok = palloc(sizeof(int32) * K * max_tokens);	/* (K, max_tokens) */
	int32	   *new_tok = palloc(sizeof(int32) * K * max_tokens);
	int		   *parents = palloc(sizeof(int) * K);
	int32	   *next = palloc(sizeof(int32) * K);
	BeamCand   *cand = palloc(sizeof(BeamCand) * n_cand);
	BeamHyp    *fin = palloc0(sizeof(BeamHyp) * (K + n_cand));
	int			n_fin = 0;
	bool		improvable = true;
	const float *logits;

	check_max_tokens(max_tokens);
	if (K < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("beam_width must be at least 1, not %d", K)));
	if (K > LLM_BEAM_WIDTH_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("beam_width must be at most %d, not %d", LLM_BEAM_WIDTH_MAX, K)));
	if (isnan(length_penalty) || isinf(length_penalty))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("length_penalty must be a finite number")));
	llm_config_load(model, &cfg);
	check_token_range(prompt, T, &cfg);
	check_context(T, max_tokens, &cfg);
	check_eos(eos, &cfg);
	if (2 * K > cfg.vocab)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("beam_width %d is too large for a vocabulary of %d tokens", K, cfg.vocab),
				 errdetail("Beam search keeps 2 x beam_width candidates per step.")));

	m = llm_model_get(model);
	V = m->cfg.vocab;
	inf = llm_infer_create(m, K, T, max_tokens);
	acc = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(float) * K * V);
	for (int b = 0; b < K; b++)
		run_score[b] = b == 0 ? 0.0f : -1.0e9f;	/* only the first beam expands at first */
	logits = llm_infer_prompt(inf, prompt, T);

	for (int step = 0; step < max_tokens; step++)
	{
		int			len = step + 1;	/* generated tokens, with this one */
		float		norm = (float) pow(len, length_penalty);
		int			n_run = 0;

		for (int b = 0; b < K; b++)
		{
			float	   *a = acc + (size_t) b * V;

			llm_log_softmax(a, step == 0 ? logits : logits + (size_t) b * V, V);
			for (int v = 0; v < V; v++)
				a[v] += run_score[b];
		}
		CHECK_FOR_INTERRUPTS();
		top_candidates(acc, K * V, cand, n_cand);

		/* finished: candidates among the first K that end in eos, or all at the last step */
		for (int c = 0; c < K && improvable; c++)
		{
			int			b = cand[c].flat / V;
			int32		tok = cand[c].flat % V;
			BeamHyp    *h;

			if (tok != eos && len < max_tokens)
				continue;
			h = &fin[n_fin++];
			h->score = cand[c].score / norm;
			h->len = len;
			h->tokens = palloc(sizeof(int32) * len);
			memcpy(h->tokens, run_tok + (size_t) b * max_tokens, sizeof(int32) * step);
			h->tokens[step] = tok;
		}
		if (n_fin > K)
		{
			qsort(fin, n_fin, sizeof(BeamHyp), cmp_hyp_desc);
			n_fin = K;
		}
		if (len == max_tokens)
			break;

		/* running: the K best that did not finish */
		for (int c = 0; c < n_cand && n_run < K; c++)
		{
			int			b = cand[c].flat / V;
			int32		tok = cand[c].flat % V;

			if (tok == eos)
				continue;
			parents[n_run] = b;
			run_score[n_run] = cand[c].score;
			memcpy(new_tok + (size_t) n_run * max_tokens, run_tok + (size_t) b * max_tokens,
				   sizeof(int32) * step);
			new_tok[(size_t) n_run * max_tokens + step] = tok;
			next[n_run] = tok;
			n_run++;
		}
		Assert(n_run == K);		/* at most K of the 2K candidates end in eos */
		{
			int32	   *tmp = run_tok;

			run_tok = new_tok;
			new_tok = tmp;
		}

		/* can a running beam still beat the worst finished hypothesis? */
		if (n_fin == K)
		{
			qsort(fin, n_fin, sizeof(BeamHyp), cmp_hyp_desc);
			improvable = improvable && run_score[0] / norm > fin[K - 1].score;
			if (!improvable)
				break;
		}

		llm_infer_reorder(inf, parents);
		logits = llm_infer_step(inf, next);
	}
	qsort(fin, n_fin, sizeof(BeamHyp), cmp_hyp_desc);
	Assert(n_fin == K);
	return fin;
}

static void
beam_args(FunctionCallInfo fcinfo, int *K, int *max_tokens, char **model)
{
	require_arg(fcinfo, 1, "beam_width");
	require_arg(fcinfo, 2, "max_tokens");
	require_arg(fcinfo, 3, "model");
	*K = PG_GETARG_INT32(1);
	*max_tokens = PG_GETARG_INT32(2);
	*model = text_to_cstring(PG_GETARG_TEXT_PP(3));
}

/*
 * llm_beam_search_tokens(tokens int[], beam_width, max_tokens, model, eos_token, length_penalty)
 * -> (rank, score, token_ids)
 */
PG_FUNCTION_INFO_V1(llm_beam_search_tokens);
Datum
llm_beam_search_tokens(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			K,
				max_tokens,
				T;
	char	   *model;
	double		length_penalty;
	int32		eos = -1;
	int32	   *prompt;
	BeamHyp    *hyps;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	beam_args(fcinfo, &K, &max_tokens, &model);
	if (!PG_ARGISNULL(4))
	{
		eos = PG_GETARG_INT32(4);
		if (eos < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("eos_token must be >= 0, not %d", eos)));
	}
	require_arg(fcinfo, 5, "length_penalty");
	length_penalty = PG_GETARG_FLOAT8(5);
	prompt = tokens_from_array(PG_GETARG_ARRAYTYPE_P(0), &T);

	InitMaterializedSRF(fcinfo, 0);
	hyps = beam_search(model, prompt, T, K, max_tokens, eos, length_penalty);
	for (int r = 0; r < K; r++)
	{
		Datum		values[3];
		bool		nulls[3] = {false, false, false};

		values[0] = Int32GetDatum(r + 1);
		values[1] = Float8GetDatum(hyps[r].score);
		values[2] = PointerGetDatum(tokens_to_array(hyps[r].tokens, hyps[r].len));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* ---- SQL: text ----------------------------------------------------------------------------- */

/*
 * The prompt's token ids under the model's tokenizer, and the id generation stops at: the
 * tokenizer's <|endoftext|> (none when the tokenizer has none, or the model cannot produce it).
 * The model is looked up first, so that an unknown model is reported as such rather than as a
 * model without a tokenizer.
 */
static int32 *
encode_prompt(const char *model, text *prompt, int *n, int32 *eos)
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

/* Generated ids as text, without the end-of-text token that stopped generation. */
static text *
decode_generated(const char *model, const int32 *ids, int n, int32 eos)
{
	int			len;
	char	   *s;

	if (n > 0 && ids[n - 1] == eos)
		n--;
	s = llm_bpe_decode(model, ids, n, &len);
	return cstring_to_text_with_len(s, len);
}

/* Arguments (prompt, max_tokens, temperature, topk, topp, model, seed): encode, stop at eot. */
static int32 *
text_generation_args(FunctionCallInfo fcinfo, GenSettings *set, int *T)
{
	sampling_args(fcinfo, set);
	check_max_tokens(set->max_tokens);
	check_sampling(set->temperature, set->top_k, set->top_p);
	return encode_prompt(set->model, PG_GETARG_TEXT_PP(0), T, &set->eos);
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
	PG_RETURN_TEXT_P(decode_generated(set.model, g->out, g->n, set.eos));
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

/*
 * Bytes at the end of s that begin a UTF-8 character but do not finish it (0 to 3); the lead byte
 * ranges are those of a strict decoder (no overlongs, surrogates or code points past U+10FFFF).
 */
static int
utf8_unfinished_tail(const unsigned char *s, int len)
{
	for (int k = 1; k <= 3 && k <= len; k++)
	{
		unsigned char b = s[len - k];
		int			need;		/* continuation bytes this lead byte wants */
		unsigned char lo = 0x80,
					hi = 0xBF;

		if (b >= 0x80 && b <= 0xBF)
			continue;			/* a continuation byte: look further back */
		if (b >= 0xC2 && b <= 0xDF)
			need = 1;
		else if (b >= 0xE0 && b <= 0xEF)
			need = 2, lo = (b == 0xE0) ? 0xA0 : 0x80, hi = (b == 0xED) ? 0x9F : 0xBF;
		else if (b >= 0xF0 && b <= 0xF4)
			need = 3, lo = (b == 0xF0) ? 0x90 : 0x80, hi = (b == 0xF4) ? 0x8F : 0xBF;
		else
			return 0;			/* ASCII or a byte that starts nothing */
		if (need < k)
			return 0;			/* the character is complete */
		for (int i = 1; i < k; i++)
		{
			unsigned char c = s[len - k + i];

			if (c < (i == 1 ? lo : 0x80) || c > (i == 1 ? hi : 0xBF))
				return 0;		/* broken: the decoder replaces it, nothing to wait for */
		}
		return k;
	}
	return 0;
}

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
		if (utf8_unfinished_tail((unsigned char *) bytes.data, bytes.len) > 0)
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

/*
 * llm_beam_search(prompt, beam_width, max_tokens, model, length_penalty)
 * -> rows (rank, score, token_ids, text), best first; the beams stop at <|endoftext|>.
 */
PG_FUNCTION_INFO_V1(llm_beam_search);
Datum
llm_beam_search(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			K,
				max_tokens,
				T;
	char	   *model;
	double		length_penalty;
	int32		eos;
	int32	   *prompt;
	BeamHyp    *hyps;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	beam_args(fcinfo, &K, &max_tokens, &model);
	require_arg(fcinfo, 4, "length_penalty");
	length_penalty = PG_GETARG_FLOAT8(4);
	prompt = encode_prompt(model, PG_GETARG_TEXT_PP(0), &T, &eos);

	InitMaterializedSRF(fcinfo, 0);
	hyps = beam_search(model, prompt, T, K, max_tokens, eos, length_penalty);
	for (int r = 0; r < K; r++)
	{
		Datum		values[4];
		bool		nulls[4] = {false, false, false, false};

		values[0] = Int32GetDatum(r + 1);
		values[1] = Float8GetDatum(hyps[r].score);
		values[2] = PointerGetDatum(tokens_to_array(hyps[r].tokens, hyps[r].len));
		values[3] = PointerGetDatum(decode_generated(model, hyps[r].tokens, hyps[r].len, eos));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
