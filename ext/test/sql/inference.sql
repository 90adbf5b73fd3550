-- Inference (infer.c, sample.c, generate.c) on a tiny model whose weights are all zero: every
-- token then has the same logit, so greedy decoding picks id 0 and beam scores are log(1/vocab).
CREATE EXTENSION IF NOT EXISTS pg_llm;

INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab)
VALUES ('regress-zero', 1, 2, 4, 8, 10);
INSERT INTO llm_param (model, name, shape, data)
SELECT 'regress-zero', name, shape, decode(repeat('00', 4 * (SELECT coalesce(exp(sum(ln(d))), 0)::int FROM unnest(shape) d)), 'hex')
FROM (VALUES ('wte', '{10,4}'::int[]), ('wpe', '{8,4}'), ('h.0.ln_1.weight', '{4}'), ('h.0.ln_1.bias', '{4}'),
             ('h.0.attn.c_attn.weight', '{4,12}'), ('h.0.attn.c_attn.bias', '{12}'),
             ('h.0.attn.c_proj.weight', '{4,4}'), ('h.0.attn.c_proj.bias', '{4}'),
             ('h.0.ln_2.weight', '{4}'), ('h.0.ln_2.bias', '{4}'),
             ('h.0.mlp.c_fc.weight', '{4,16}'), ('h.0.mlp.c_fc.bias', '{16}'),
             ('h.0.mlp.c_proj.weight', '{16,4}'), ('h.0.mlp.c_proj.bias', '{4}'),
             ('ln_f.weight', '{4}'), ('ln_f.bias', '{4}')) t(name, shape);

SELECT llm_logits('{1,2,3}', 'regress-zero') = array_fill(0::real, ARRAY[10]) AS all_zero;
-- greedy: the first of equal logits; generation stops after eos_token, which is returned
SELECT llm_generate_tokens('{1}', 4, 0, model => 'regress-zero');
SELECT llm_generate_tokens('{1}', 4, 0, model => 'regress-zero', eos_token => 0);
-- up to the last position: 1 + 7 = 8
SELECT cardinality(llm_generate_tokens('{1}', 7, 0, model => 'regress-zero'));
-- a seed makes sampling reproducible
SELECT llm_generate_tokens('{1}', 6, 1.0, 0, 1.0, 'regress-zero', 42)
     = llm_generate_tokens('{1}', 6, 1.0, 0, 1.0, 'regress-zero', 42) AS same_tokens;
-- beam search: sum of log-probabilities / length
SELECT rank, round(score::numeric, 5) AS score, token_ids FROM llm_beam_search_tokens('{1}', 2, 3, 'regress-zero');

-- bad input is an error, never a crash
\set VERBOSITY terse
SELECT llm_logits('{1}', 'no-such-model');
SELECT llm_logits('{}', 'regress-zero');
SELECT llm_logits('{1,10}', 'regress-zero');
SELECT llm_logits('{1,2,3,4,5,6,7,8,9}', 'regress-zero');
SELECT llm_generate_tokens('{1}', 0, model => 'regress-zero');
SELECT llm_generate_tokens('{1,2}', 7, model => 'regress-zero');
SELECT llm_generate_tokens('{1}', 2, -1, model => 'regress-zero');
SELECT llm_generate_tokens('{1}', 2, topk => -1, model => 'regress-zero');
SELECT llm_generate_tokens('{1}', 2, topp => 0, model => 'regress-zero');
SELECT * FROM llm_beam_search_tokens('{1}', 0, 2, 'regress-zero');
SELECT * FROM llm_beam_search_tokens('{1}', 6, 2, 'regress-zero');
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) VALUES ('regress-empty', 1, 1, 4, 8, 10);
SELECT llm_logits('{1}', 'regress-empty');
SELECT llm_generate('', 5, model => 'regress-zero');
SELECT llm_generate('Hello', 5, model => 'regress-zero');
\set VERBOSITY default

DELETE FROM llm_model_config WHERE model IN ('regress-zero', 'regress-empty');
-- schema.sql, which runs next, creates the extension itself
DROP EXTENSION pg_llm;
