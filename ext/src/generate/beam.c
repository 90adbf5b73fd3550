/*
 * beam.c: beam search, llm_beam_search_tokens (on ids) and llm_beam_search (on text).
 *
 * Beam search as transformers' generate(num_beams=K, do_sample=False) does it (version 5):
 * each step keeps the 2K best continuations of all beams by summed log-probability; those ending in
 * eos (or at max_tokens) among the first K become finished hypotheses, scored by their sum divided
 * by length^length_penalty, and the K best unfinished continue. Generation stops at max_tokens, or
 * once K hypotheses are finished and the best running beam can no longer beat the worst of them
 * (early_stopping=False). All beams share the prompt's cache and run as one batch per step.
 */
#include "base/base.h"
#include "weights/weights.h"
#include "generate/generate.h"
#include "infer/infer.h"

#include <math.h>

#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"

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
beam_search(const char *model, const char *adapter, const int32 *prompt, int T, int K, int max_tokens,
			int32 eos, double length_penalty)
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

	llm_check_max_tokens(max_tokens);
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
	llm_check_token_range(prompt, T, &cfg);
	llm_check_context(T, max_tokens, &cfg);
	llm_check_eos(eos, &cfg);
	if (2 * K > cfg.vocab)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("beam_width %d is too large for a vocabulary of %d tokens", K, cfg.vocab),
				 errdetail("Beam search keeps 2 x beam_width candidates per step.")));

	m = llm_model_get(model);
	V = m->cfg.vocab;
	inf = llm_infer_create(m, K, T, max_tokens);
	llm_infer_set_adapter(inf, -1, llm_lora_get(adapter, &m->cfg));
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
	llm_require_arg(fcinfo, 1, "beam_width");
	llm_require_arg(fcinfo, 2, "max_tokens");
	llm_require_arg(fcinfo, 3, "model");
	*K = PG_GETARG_INT32(1);
	*max_tokens = PG_GETARG_INT32(2);
	*model = text_to_cstring(PG_GETARG_TEXT_PP(3));
}

/* A NULL prompt gives no rows, as llm_generate_stream's does. */
static Datum
no_rows(FunctionCallInfo fcinfo)
{
	InitMaterializedSRF(fcinfo, 0);
	return (Datum) 0;
}

/*
 * llm_beam_search_tokens(tokens int[], beam_width, max_tokens, model, eos_token, length_penalty,
 * adapter) -> (rank, score, token_ids)
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
		return no_rows(fcinfo);
	beam_args(fcinfo, &K, &max_tokens, &model);
	if (!PG_ARGISNULL(4))
		eos = PG_GETARG_INT32(4);
	llm_require_arg(fcinfo, 5, "length_penalty");
	length_penalty = PG_GETARG_FLOAT8(5);
	prompt = llm_tokens_from_array(PG_GETARG_ARRAYTYPE_P(0), &T);

	InitMaterializedSRF(fcinfo, 0);
	hyps = beam_search(model, llm_lora_name_arg(fcinfo, 6), prompt, T, K, max_tokens, eos, length_penalty);
	for (int r = 0; r < K; r++)
	{
		Datum		values[3];
		bool		nulls[3] = {false, false, false};

		values[0] = Int32GetDatum(r + 1);
		values[1] = Float8GetDatum(hyps[r].score);
		values[2] = PointerGetDatum(llm_tokens_to_array(hyps[r].tokens, hyps[r].len));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}


/*
 * llm_beam_search(prompt, beam_width, max_tokens, model, length_penalty, adapter)
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
		return no_rows(fcinfo);
	beam_args(fcinfo, &K, &max_tokens, &model);
	llm_require_arg(fcinfo, 4, "length_penalty");
	length_penalty = PG_GETARG_FLOAT8(4);
	prompt = llm_encode_prompt(model, PG_GETARG_TEXT_PP(0), &T, &eos);

	InitMaterializedSRF(fcinfo, 0);
	hyps = beam_search(model, llm_lora_name_arg(fcinfo, 5), prompt, T, K, max_tokens, eos, length_penalty);
	for (int r = 0; r < K; r++)
	{
		Datum		values[4];
		bool		nulls[4] = {false, false, false, false};

		values[0] = Int32GetDatum(r + 1);
		values[1] = Float8GetDatum(hyps[r].score);
		values[2] = PointerGetDatum(llm_tokens_to_array(hyps[r].tokens, hyps[r].len));
		values[3] = PointerGetDatum(llm_decode_generated(model, hyps[r].tokens, hyps[r].len, eos));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
