-- The SQL contract, part 3: what each function does with bad arguments, NULLs and limits.
-- Each call prints its outcome: "ok: <value>", "NULL", or "<SQLSTATE>: <message>"; the SQLSTATE
-- is what a client's error handling sees (22023 invalid_parameter_value for a bad argument,
-- 42704 undefined_object for an unknown model, 54000 program_limit_exceeded for a limit).
-- a fresh install, whatever ran before
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS pg_llm CASCADE;
RESET client_min_messages;
CREATE EXTENSION pg_llm;

CREATE FUNCTION pg_temp.outcome(call text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  result text;
BEGIN
  EXECUTE call INTO result;
  RETURN coalesce('ok: ' || result, 'NULL');
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

-- a model of 2 layers (d_model 8, 16 positions) over a byte-level vocabulary: one token per byte
-- (GPT-2's byte-to-unicode spelling) and <|endoftext|> = 256
SELECT llm_init('regress-args', 2, 2, 8, 16, 257, seed => 1);
INSERT INTO llm_bpe_vocab (model, token_id, token)
SELECT 'regress-args', b, chr(CASE WHEN b BETWEEN 33 AND 126 OR b BETWEEN 161 AND 172 OR b BETWEEN 174 AND 255 THEN b
                              ELSE 256 + (SELECT count(*)::int FROM generate_series(0, b - 1) x
                                          WHERE NOT (x BETWEEN 33 AND 126 OR x BETWEEN 161 AND 172 OR x BETWEEN 174 AND 255)) END)
FROM generate_series(0, 255) b
UNION ALL SELECT 'regress-args', 256, '<|endoftext|>';

SELECT call, pg_temp.outcome(call) AS outcome FROM (VALUES
  -- tokenizer: strict (NULL in, NULL out); unknown models and ids are errors
  ($$SELECT llm_encode('hi', 'regress-args')$$),
  ($$SELECT llm_encode(NULL, 'regress-args')$$),
  ($$SELECT llm_encode('hi', NULL)$$),
  ($$SELECT llm_encode('hi', 'nobody')$$),
  ($$SELECT llm_decode('{104,105}', 'regress-args')$$),
  ($$SELECT llm_decode('{257}', 'regress-args')$$),
  ($$SELECT llm_decode('{-1}', 'regress-args')$$),
  ($$SELECT llm_decode('{1,NULL}', 'regress-args')$$),
  ($$SELECT llm_token_bytes(104, 'regress-args')$$),
  ($$SELECT llm_token_bytes(300, 'regress-args')$$),
  ($$SELECT (llm_tokenizer_info('regress-args')).vocab_size$$),
  ($$SELECT (llm_tokenizer_info('nobody')).vocab_size$$),
  -- logits: strict; empty, out-of-range and too long inputs are errors
  ($$SELECT cardinality(llm_logits('{1,2}', 'regress-args'))$$),
  ($$SELECT llm_logits(NULL, 'regress-args')$$),
  ($$SELECT llm_logits('{}', 'regress-args')$$),
  ($$SELECT llm_logits('{257}', 'regress-args')$$),
  ($$SELECT llm_logits('{1,NULL}', 'regress-args')$$),
  ($$SELECT llm_logits(array_fill(1, ARRAY[17]), 'regress-args')$$),
  ($$SELECT llm_logits('{1}', 'nobody')$$),
  ($$SELECT llm_logits('{1}', repeat('m', 201))$$),
  -- generation: NULL settings and out-of-range ones are errors that name the argument
  ($$SELECT length(llm_generate('hi', 3, 0, model => 'regress-args')) > 0$$),
  ($$SELECT llm_generate(NULL, 3, model => 'regress-args')$$),
  ($$SELECT llm_generate('hi', NULL, model => 'regress-args')$$),
  ($$SELECT llm_generate('hi', 0, model => 'regress-args')$$),
  ($$SELECT llm_generate('hi', 3, -1, model => 'regress-args')$$),
  ($$SELECT llm_generate('hi', 3, 'NaN', model => 'regress-args')$$),
  ($$SELECT llm_generate('hi', 3, topk => -1, model => 'regress-args')$$),
  ($$SELECT llm_generate('hi', 3, topp => 0, model => 'regress-args')$$),
  ($$SELECT llm_generate('hi', 3, topp => 1.5, model => 'regress-args')$$),
  ($$SELECT llm_generate('hi', 3, model => NULL)$$),
  ($$SELECT llm_generate('hi', 3, model => 'nobody')$$),
  ($$SELECT llm_generate(repeat('x', 17), 1, model => 'regress-args')$$),
  ($$SELECT cardinality(llm_generate_tokens('{1}', 3, 0, model => 'regress-args'))$$),
  ($$SELECT llm_generate_tokens('{1}', 3, 0, model => 'regress-args', eos_token => 257)$$),
  ($$SELECT llm_generate_tokens('{1}', 16, model => 'regress-args')$$),
  ($$SELECT count(*) FROM llm_generate_stream('hi', 3, 0, model => 'regress-args')$$),
  ($$SELECT count(*) FROM llm_generate_stream('hi', 0, model => 'regress-args')$$),
  ($$SELECT count(*) FROM llm_generate_batch('{hi,ho}', 3, 0, model => 'regress-args')$$),
  ($$SELECT count(*) FROM llm_generate_batch(NULL, 3, model => 'regress-args')$$),
  ($$SELECT count(*) FROM llm_generate_batch('{}', 3, model => 'regress-args')$$),
  ($$SELECT count(*) FROM llm_generate_batch('{hi,NULL}', 3, model => 'regress-args')$$),
  ($$SELECT count(*) FROM llm_generate_batch(array_fill('hi'::text, ARRAY[65]), 1, model => 'regress-args')$$),
  ($$SELECT count(*) FROM llm_beam_search('hi', 2, 3, 'regress-args')$$),
  ($$SELECT count(*) FROM llm_beam_search('hi', 0, 3, 'regress-args')$$),
  ($$SELECT count(*) FROM llm_beam_search('hi', 65, 3, 'regress-args')$$),
  ($$SELECT count(*) FROM llm_beam_search('hi', 2, 0, 'regress-args')$$),
  ($$SELECT count(*) FROM llm_beam_search(NULL, 2, 3, 'regress-args')$$),
  -- embeddings and perplexity: NULL for a text without tokens; too long is a limit
  ($$SELECT cardinality(llm_embed('hi', 'regress-args'))$$),
  ($$SELECT llm_embed('', 'regress-args')$$),
  ($$SELECT llm_embed(NULL, 'regress-args')$$),
  ($$SELECT llm_embed(repeat('x', 17), 'regress-args')$$),
  ($$SELECT llm_embed('hi', 'nobody')$$),
  ($$SELECT count(embedding) FROM llm_embed_batch('{hi,NULL,"",ho}', 'regress-args')$$),
  ($$SELECT count(*) FROM llm_embed_batch(NULL, 'regress-args')$$),
  ($$SELECT count(*) FROM llm_embed_batch('{hi}', NULL)$$),
  ($$SELECT count(*) FROM llm_embed_batch('{hi}', 'nobody')$$),
  ($$SELECT count(*) FROM llm_embed_batch(ARRAY['hi', repeat('x', 17)], 'regress-args')$$),
  ($$SELECT llm_perplexity('hello', 'regress-args') > 0$$),
  ($$SELECT llm_perplexity('h', 'regress-args')$$),
  ($$SELECT llm_perplexity('hello', 'regress-args', 0)$$),
  ($$SELECT llm_perplexity('hello', 'regress-args', 17)$$),
  -- models: architecture limits, names
  ($$SELECT llm_init('regress-bad', 2, 3, 8, 16, 257)$$),
  ($$SELECT llm_init('regress-bad', 0, 2, 8, 16, 257)$$),
  ($$SELECT llm_init('regress-bad', 2, 2, 8, 16, 10000001)$$),
  ($$SELECT llm_init(NULL, 2, 2, 8, 16, 257)$$),
  ($$SELECT llm_init(repeat('m', 201), 2, 2, 8, 16, 257)$$),
  ($$SELECT llm_init('regress-args', 2, 2, 8, 16, 257)$$),
  ($$SELECT llm_init('regress-new', seed => 1)$$),
  -- training and evaluation
  ($$SELECT llm_train('nobody', 1)$$),
  ($$SELECT llm_train('regress-args', 0)$$),
  ($$SELECT llm_train('regress-args', NULL)$$),
  ($$SELECT llm_train('regress-args', 1, lr_max => -1)$$),
  ($$SELECT llm_train('regress-args', 1, batch_size => 0)$$),
  ($$SELECT llm_train('regress-args', 1, dropout => 1.5)$$),
  ($$SELECT llm_train('regress-args', 1)$$),
  ($$SELECT (llm_eval('regress-args')).rows$$),
  ($$SELECT (llm_eval('regress-args', batch_size => 0)).rows$$),
  ($$SELECT (llm_eval('nobody')).rows$$),
  ($$SELECT llm_dataset_build('SELECT ''hello world''', 'regress', 'regress-args', 4)$$),
  ($$SELECT llm_dataset_build('SELECT ''hello world''', 'regress', 'regress-args', 1)$$),
  ($$SELECT llm_dataset_build('SELECT 1, 2', 'regress', 'regress-args', 4)$$),
  ($$SELECT llm_dataset_build('not sql', 'regress', 'regress-args', 4)$$),
  ($$SELECT llm_dataset_build(NULL, 'regress', 'regress-args', 4)$$),
  -- snapshots and shared copies
  ($$SELECT llm_checkpoint_save('nobody')$$),
  ($$SELECT llm_checkpoint_load('regress-args', NULL)$$),
  ($$SELECT llm_checkpoint_load('regress-args', -1)$$),
  ($$SELECT (pg_llm_weight_cache_build('regress-args', 'float32')).format$$),
  ($$SELECT (pg_llm_weight_cache_build('regress-args', 'fp16')).format$$),
  ($$SELECT (pg_llm_weight_cache_build('nobody', 'float32')).format$$),
  ($$SELECT count(*) > 0 FROM pg_llm_limits()$$)
) calls(call);

DROP EXTENSION pg_llm;
