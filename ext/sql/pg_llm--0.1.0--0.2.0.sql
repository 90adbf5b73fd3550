-- pg_llm 0.1.0 -> 0.2.0.
--
-- pg_llm--0.1.0.sql is frozen (0.1.0 was released): every schema change since then is here.
-- A fresh CREATE EXTENSION pg_llm runs 0.1.0's script and then this one (PostgreSQL follows the
-- update path when no install script exists for the default version), so a new install and an
-- updated one are the same by construction. Keep each change in the section of its topic.
\echo Use "CREATE EXTENSION pg_llm" or "ALTER EXTENSION pg_llm UPDATE" to load this file. \quit

-- ==== structure: one source of truth (limits, tokenizer files) ====
-- SQL names: pg_llm_* for the extension itself (version, BLAS, limits) and for files going in and
-- out (checkpoint and tokenizer files, read on the server or sent as bytes by the client); llm_*
-- for models and data in the database (training, inference, tokenizing, snapshots). llm_train
-- keeps both "D" and d: SQL folds an unquoted D => 48 (as the seed writes it) to d.

-- The limits the extension enforces (src/llm_limits.h), for clients, which ask instead of copying.
CREATE FUNCTION pg_llm_limits() RETURNS TABLE (name text, value bigint)
AS 'MODULE_PATHNAME', 'pg_llm_limits' LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- Tokenizer files sent by the client (pgllm tokenizer), checked by the same loader as the server
-- files: the rights needed are those on llm_bpe_vocab and llm_bpe_merges. file names the file in
-- messages ("vocabulary file \"<file>\", line N: ...").
CREATE FUNCTION pg_llm_load_bpe_vocab_bytes(data bytea, model text, replace boolean DEFAULT false,
                                            file text DEFAULT 'vocab.json') RETURNS bigint
AS 'MODULE_PATHNAME', 'pg_llm_load_bpe_vocab_bytes' LANGUAGE C VOLATILE STRICT;
CREATE FUNCTION pg_llm_load_bpe_merges_bytes(data bytea, model text, replace boolean DEFAULT false,
                                             file text DEFAULT 'merges.txt') RETURNS bigint
AS 'MODULE_PATHNAME', 'pg_llm_load_bpe_merges_bytes' LANGUAGE C VOLATILE STRICT;
