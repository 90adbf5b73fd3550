-- The tokenizer (bpe.c) on a tiny hand-written byte-level vocabulary.
CREATE EXTENSION IF NOT EXISTS pg_llm;

-- A tokenizer belongs to a registered model.
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) VALUES ('regress', 1, 1, 8, 8, 263);

-- One token per byte, id = byte value, spelled with GPT-2's byte-to-unicode map
-- (printable bytes stand for themselves, the 68 others for U+0100 onwards in byte order).
INSERT INTO llm_bpe_vocab (model, token_id, token)
SELECT 'regress', b, chr(CASE WHEN b BETWEEN 33 AND 126 OR b BETWEEN 161 AND 172 OR b BETWEEN 174 AND 255 THEN b
                         ELSE 256 + (SELECT count(*)::int FROM generate_series(0, b - 1) x
                                     WHERE NOT (x BETWEEN 33 AND 126 OR x BETWEEN 161 AND 172 OR x BETWEEN 174 AND 255)) END)
FROM generate_series(0, 255) b;
INSERT INTO llm_bpe_vocab (model, token_id, token) VALUES
    ('regress', 256, 'Ġt'), ('regress', 257, 'he'), ('regress', 258, 'Ġthe'), ('regress', 259, 'll'),
    ('regress', 260, 'Ġ1'), ('regress', 262, '<|endoftext|>');
INSERT INTO llm_bpe_merges (model, rank, "left", "right") VALUES
    ('regress', 0, 'h', 'e'), ('regress', 1, 'Ġ', 't'), ('regress', 2, 'Ġt', 'he'), ('regress', 3, 'l', 'l'),
    ('regress', 4, 'Ġ', '1');
SELECT vocab_size, tokens, merges, eot_id FROM llm_tokenizer_info('regress');

-- pieces: letters, a space joining what follows, contractions (lowercase only), digits, white space
SELECT llm_encode('hello the 1', 'regress');
SELECT llm_encode('it''s IT''S', 'regress');
SELECT llm_encode(E'a  b\t\n', 'regress');
-- <|endoftext|> is one token wherever it stands
SELECT llm_encode('the<|endoftext|> the', 'regress');
-- multi-byte characters are byte tokens; the round trip gives back the text
SELECT llm_encode('é😀', 'regress');
SELECT llm_decode(llm_encode(t, 'regress'), 'regress') = t AS round_trip
FROM (VALUES ('hello the world'), (E'tabs\tand\r\nCRLF  '), ('日本語 👍🏽'), ('<|endoftext|>')) v(t);
-- a cut character becomes U+FFFD; a token's raw bytes
SELECT llm_decode('{240,159}', 'regress'), llm_token_bytes(258, 'regress'), llm_token_bytes(240, 'regress');

-- changing the tables is seen at once (no stale cache)
DELETE FROM llm_bpe_merges WHERE model = 'regress' AND rank = 2;
SELECT llm_encode('hello the 1', 'regress');

-- errors
\set VERBOSITY default
SELECT llm_decode('{-1}', 'regress');
SELECT llm_decode('{261}', 'regress');
SELECT llm_decode('{0,NULL}', 'regress');
SELECT llm_encode('x', 'no-such-model');
SELECT llm_decode('{1}', 'no-such-model');
INSERT INTO llm_bpe_merges (model, rank, "left", "right") VALUES ('regress', 9, 'Ġ1', 'x');
SELECT llm_encode('x', 'regress');
DELETE FROM llm_bpe_merges WHERE model = 'regress' AND rank = 9;
\set VERBOSITY terse
-- loading files needs superuser or pg_read_server_files
SET client_min_messages = warning;
DROP ROLE IF EXISTS llm_regress_reader;
RESET client_min_messages;
CREATE ROLE llm_regress_reader;
SET ROLE llm_regress_reader;
SELECT pg_llm_load_bpe_vocab('/nonexistent/vocab.json', 'regress');
RESET ROLE;
DROP ROLE llm_regress_reader;
SELECT pg_llm_load_bpe_vocab('/nonexistent/vocab.json', 'other');

-- the same loader on the files' bytes (what pgllm tokenizer sends); file names them in messages
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab)
VALUES ('regress2', 1, 1, 8, 8, 3), ('regress3', 1, 1, 8, 8, 3);
SELECT pg_llm_load_bpe_vocab_bytes(convert_to('{"a": 0, "b": 1, "ab": 2}', 'UTF8'), 'regress2');
SELECT pg_llm_load_bpe_merges_bytes(convert_to(E'#version: 0.2\na b\n', 'UTF8'), 'regress2');
SELECT llm_encode('abba', 'regress2');
SELECT pg_llm_load_bpe_vocab_bytes(convert_to('{"a": 0}', 'UTF8'), 'regress2');
SELECT pg_llm_load_bpe_vocab_bytes(convert_to(E'{"a": 0,\n"": 1}', 'UTF8'), 'regress3', file => 'v.json');
SELECT pg_llm_load_bpe_merges_bytes(convert_to(E'#version: 0.2\na c\n', 'UTF8'), 'regress2', true, 'm.txt');
DELETE FROM llm_bpe_merges WHERE model LIKE 'regress%';
DELETE FROM llm_bpe_vocab WHERE model LIKE 'regress%';
