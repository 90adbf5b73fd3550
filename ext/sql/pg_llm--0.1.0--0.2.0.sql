-- pg_llm 0.1.0 -> 0.2.0.
--
-- pg_llm--0.1.0.sql is frozen (0.1.0 was released): every schema change since then is here.
-- A fresh CREATE EXTENSION pg_llm runs 0.1.0's script and then this one (PostgreSQL follows the
-- update path when no install script exists for the default version), so a new install and an
-- updated one are the same by construction. Keep each change in the section of its topic.
\echo Use "CREATE EXTENSION pg_llm" or "ALTER EXTENSION pg_llm UPDATE" to load this file. \quit

-- ==== release: pg_dump keeps a user's own gpt2-small ====
-- 0.1.0 left gpt2-small's row out of dumps, since CREATE EXTENSION registers it: a gpt2-small
-- that a user had re-created with another shape lost its row, and its weights then failed to
-- restore. Every row is dumped now. On restore, CREATE EXTENSION has registered the built-in
-- gpt2-small again before the dumped rows arrive; the dumped gpt2-small row takes its place,
-- provided it is still the built-in registration (GPT-2 small's shape) that nothing uses yet.
-- At any other time the same holds: inserting gpt2-small replaces an unused built-in row, and
-- is refused by the primary key as before when that row has weights or state.
CREATE FUNCTION llm_model_config_replace_builtin() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = @extschema@, pg_catalog, pg_temp AS $$
DECLARE
    ref record;
    used boolean;
BEGIN
    -- every table that references llm_model_config, so that a table added later counts too
    FOR ref IN SELECT c.conrelid::regclass AS tab, a.attname
                 FROM pg_constraint c
                 JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
                WHERE c.confrelid = 'llm_model_config'::regclass AND c.contype = 'f'
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I = $1)', ref.tab, ref.attname)
            INTO used USING NEW.model;
        IF used THEN
            RETURN NEW;
        END IF;
    END LOOP;
    DELETE FROM llm_model_config c
     WHERE c.model = NEW.model
       AND (c.n_layer, c.n_head, c.d_model, c.n_positions, c.vocab) = (12, 12, 768, 1024, 50257);
    RETURN NEW;
END $$;
CREATE TRIGGER llm_model_config_builtin BEFORE INSERT ON llm_model_config
    FOR EACH ROW WHEN (NEW.model = 'gpt2-small') EXECUTE FUNCTION llm_model_config_replace_builtin();
SELECT pg_catalog.pg_extension_config_dump('llm_model_config', '');

-- ==== shared weights ====
-- The shared read-only copies of model weights (one file per database, model, weights_version
-- and format in the data directory's pgsql_tmp_pg_llm/): every backend that serves a model maps
-- the same copy. Rows of other databases only for roles with pg_read_all_stats' privileges.
CREATE FUNCTION pg_llm_weight_cache(
    OUT database text, OUT model text, OUT weights_version bigint, OUT format text, OUT bytes bigint,
    OUT built_at timestamptz, OUT last_used timestamptz, OUT backends int, OUT path text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'pg_llm_weight_cache' LANGUAGE C VOLATILE STRICT;

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

-- ==== batch: many prompts decoded together ====
-- One row per prompt, ord its 1-based position in the array (rows come in that order). All
-- prompts decode together, each step one pass over the weights for every unfinished sequence
-- (up to pg_llm.batch_rows at once); row i equals llm_generate(prompts[i], ...) with the same
-- arguments: each prompt samples from its own stream, seeded with seed as a single call is.
-- A NULL element gives a NULL text; a NULL array no rows. A table's prompts in one call:
--   SELECT a.ids[g.ord] AS id, g.text
--     FROM (SELECT array_agg(id ORDER BY id) AS ids, array_agg(prompt ORDER BY id) AS prompts FROM t) a,
--          llm_generate_batch(a.prompts, 32) g;
CREATE FUNCTION llm_generate_batch(prompts text[], max_tokens int DEFAULT 64,
                                   temperature double precision DEFAULT 1.0, topk int DEFAULT 50,
                                   topp double precision DEFAULT 0.95, model text DEFAULT 'gpt2-small',
                                   seed bigint DEFAULT NULL)
RETURNS TABLE (ord int, text text)
AS 'MODULE_PATHNAME', 'llm_generate_batch' LANGUAGE C VOLATILE CALLED ON NULL INPUT PARALLEL RESTRICTED ROWS 100;
