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

-- ==== hardening: one trainer per model, roles ====
-- llm_train_lock(model): hold the model's training lock (an advisory lock, see src/train_lock.c)
-- for the session, or fail at once naming the session that holds it. llm_train itself waits for
-- the same lock for its transaction; pgllm train calls this first, so that a second run is refused.
CREATE FUNCTION llm_train_lock(model text) RETURNS void
AS 'MODULE_PATHNAME', 'llm_train_lock' LANGUAGE C VOLATILE STRICT;

-- Rights of ordinary roles. Every pg_llm function runs with its caller's rights, so what a role
-- may do is what it may do on the tables. llm_grant(role) gives what serving reads (generate,
-- stream, beams, logits, encode/decode, the models' state and the llm_models view, which counts
-- checkpoints); with train => true, every right on
-- every table and sequence of the extension too (training, init, import and tokenizers sent over
-- the connection, datasets, checkpoints; a table added by a later version counts). Never the
-- server-file functions: pg_llm_import_npz and pg_llm_export_npz stay with superusers and
-- pg_read_server_files / pg_write_server_files. llm_revoke(role) takes back all of it.
-- pgllm grant ROLE [--train] and pgllm revoke ROLE call these.
CREATE FUNCTION llm_grant(role regrole, train boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql SET search_path = @extschema@, pg_catalog, pg_temp AS $$
DECLARE
    rel record;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA @extschema@ TO %s', role);
    FOR rel IN SELECT c.oid::regclass AS name, c.relkind, c.relname
                 FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
                WHERE d.classid = 'pg_class'::regclass AND d.deptype = 'e'
                  AND d.refclassid = 'pg_extension'::regclass
                  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_llm')
    LOOP
        IF train THEN
            EXECUTE format(CASE WHEN rel.relkind = 'S' THEN 'GRANT USAGE, SELECT, UPDATE ON SEQUENCE %s TO %s'
                                ELSE 'GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON %s TO %s' END,
                           rel.name, role);
        ELSIF rel.relname IN ('llm_model_config', 'llm_param', 'llm_bpe_vocab', 'llm_bpe_merges',
                              'llm_tokenizer_version', 'llm_train_state', 'llm_train_log', 'llm_checkpoint',
                              'llm_models') THEN
            EXECUTE format('GRANT SELECT ON %s TO %s', rel.name, role);
        END IF;
    END LOOP;
END $$;

CREATE FUNCTION llm_revoke(role regrole) RETURNS void
LANGUAGE plpgsql SET search_path = @extschema@, pg_catalog, pg_temp AS $$
DECLARE
    rel record;
BEGIN
    FOR rel IN SELECT c.oid::regclass AS name, c.relkind
                 FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
                WHERE d.classid = 'pg_class'::regclass AND d.deptype = 'e'
                  AND d.refclassid = 'pg_extension'::regclass
                  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_llm')
    LOOP
        EXECUTE format(CASE WHEN rel.relkind = 'S' THEN 'REVOKE ALL ON SEQUENCE %s FROM %s'
                            ELSE 'REVOKE ALL ON %s FROM %s' END, rel.name, role);
    END LOOP;
    IF (SELECT extnamespace FROM pg_extension WHERE extname = 'pg_llm') <> 'public'::regnamespace THEN
        EXECUTE format('REVOKE USAGE ON SCHEMA @extschema@ FROM %s', role);
    END IF;
END $$;
-- Granting is the owner's: others get "permission denied" instead of GRANT's mere warning.
REVOKE EXECUTE ON FUNCTION llm_grant(regrole, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION llm_revoke(regrole) FROM PUBLIC;

-- ==== data: named datasets, datasets from a query, evaluation ====
-- llm_dataset holds several named datasets (train, val, ...); rows written without a dataset
-- (the seed's INSERT INTO llm_dataset (tokens, target)) land in 'train'. All rows of one dataset
-- have one length, the block size: checked once per statement (a COPY of many rows costs one
-- check), against the dataset's oldest row, which every older row already matches.
ALTER TABLE llm_dataset ADD COLUMN dataset text NOT NULL DEFAULT 'train'
    CHECK (dataset <> '' AND length(dataset) <= 63);
CREATE INDEX llm_dataset_dataset_id ON llm_dataset (dataset, id);
-- Token ids stored uncompressed (out of line, as llm_param's tensors): pglz took 40% of the time to
-- write a dataset (perf, bench/dataset_build.py) and saves little on ids, and training reads them
-- back without decompressing.
ALTER TABLE llm_dataset ALTER COLUMN tokens SET STORAGE EXTERNAL, ALTER COLUMN target SET STORAGE EXTERNAL;

CREATE FUNCTION llm_dataset_check_length() RETURNS trigger
LANGUAGE plpgsql SET search_path = @extschema@, pg_catalog, pg_temp AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.dataset, n.lo, n.hi, o.len INTO bad
      FROM (SELECT dataset, min(cardinality(tokens)) AS lo, max(cardinality(tokens)) AS hi
              FROM new_rows GROUP BY dataset) n
      CROSS JOIN LATERAL (SELECT cardinality(d.tokens) AS len FROM llm_dataset d
                           WHERE d.dataset = n.dataset ORDER BY d.id LIMIT 1) o
     WHERE n.lo <> n.hi OR n.lo <> o.len
        OR (TG_OP = 'UPDATE' AND EXISTS (SELECT 1 FROM llm_dataset d
                                          WHERE d.dataset = n.dataset AND cardinality(d.tokens) <> n.lo))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'every row of dataset "%" must have the same length (its block size)', bad.dataset
            USING ERRCODE = 'check_violation',
                  DETAIL = format('Dataset "%s" has rows of %s tokens; these rows have %s.', bad.dataset, bad.len,
                                  CASE WHEN bad.lo = bad.hi THEN bad.lo::text ELSE bad.lo || ' to ' || bad.hi END),
                  HINT = 'Write them to another dataset (pgllm dataset --dataset NAME), or replace this one '
                         '(pgllm dataset --dataset NAME --truncate).';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER llm_dataset_length_insert AFTER INSERT ON llm_dataset
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_dataset_check_length();
CREATE TRIGGER llm_dataset_length_update AFTER UPDATE ON llm_dataset
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_dataset_check_length();

-- llm_train trains on one dataset; the new parameters come last, so that every call of 0.1.0
-- (positional or named) still means the same. With eval_dataset, the mean loss over its rows (the
-- first eval_rows; all when NULL) goes into llm_train_log.val_loss every eval_every steps (0: only
-- after the call's last step) and after the last step.
ALTER TABLE llm_train_log ADD COLUMN val_loss real;
DROP FUNCTION llm_train(text, int, double precision, double precision, double precision, double precision,
                        double precision, int, int, int, int, int, int, int, double precision,
                        double precision, int, double precision, bigint, int);
CREATE FUNCTION llm_train(
    model text,
    steps int,
    beta1 double precision DEFAULT 0.9,
    beta2 double precision DEFAULT 0.999,
    eps double precision DEFAULT 1e-8,
    wd double precision DEFAULT 0.01,
    lr_max double precision DEFAULT 2.5e-4,
    warmup int DEFAULT 2000,
    n_layer int DEFAULT NULL,
    n_head int DEFAULT NULL,
    "D" int DEFAULT NULL,
    vocab int DEFAULT NULL,
    batch_size int DEFAULT 4,
    grad_accum int DEFAULT 1,
    grad_clip double precision DEFAULT 1.0,
    lr_min double precision DEFAULT 0,
    total_steps int DEFAULT NULL,
    dropout double precision DEFAULT 0,
    seed bigint DEFAULT 1337,
    d int DEFAULT NULL,
    dataset text DEFAULT 'train',
    eval_dataset text DEFAULT NULL,
    eval_every int DEFAULT 0,
    eval_rows int DEFAULT NULL)
RETURNS real
AS 'MODULE_PATHNAME', 'llm_train' LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION llm_train IS 'train a model on a dataset of llm_dataset with AdamW; resumable';

-- A dataset from the documents (first column, text; NULL rows skipped) that a query returns, run
-- with the caller's rights and tokenized in the server with the model's tokenizer: the rows of
-- pgllm dataset for the same documents. replace empties the dataset first. Returns rows written.
CREATE FUNCTION llm_dataset_build(query text, dataset text DEFAULT 'train', model text DEFAULT 'gpt2-small',
                                  block_size int DEFAULT 1024, replace boolean DEFAULT false)
RETURNS bigint
AS 'MODULE_PATHNAME', 'llm_dataset_build' LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- Measuring a model (they write nothing: they run on a hot standby). llm_eval: the mean
-- cross-entropy over every target token of a dataset's rows (the first max_rows in id order; all
-- when NULL), and its exp. llm_perplexity: Hugging Face's sliding-window perplexity of one text
-- (windows of n_positions tokens every stride tokens; stride NULL = half the window; NULL for a
-- text under two tokens). llm_embed: the mean of the final hidden states (after ln_f) over the
-- text's tokens, for pgvector users as llm_embed(t)::vector.
CREATE FUNCTION llm_eval(model text, dataset text DEFAULT 'val', max_rows int DEFAULT NULL,
                         batch_size int DEFAULT 8,
                         OUT loss double precision, OUT perplexity double precision, OUT rows bigint,
                         OUT tokens bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'llm_eval' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION llm_perplexity(input text, model text DEFAULT 'gpt2-small', stride int DEFAULT NULL)
RETURNS double precision
AS 'MODULE_PATHNAME', 'llm_perplexity' LANGUAGE C VOLATILE PARALLEL UNSAFE;
CREATE FUNCTION llm_embed(input text, model text DEFAULT 'gpt2-small') RETURNS real[]
AS 'MODULE_PATHNAME', 'llm_embed' LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- One row per model: its shape, parameter count, stored size, training state, losses, tokenizer,
-- snapshots, and which formats of its current weights this server keeps a shared copy of. The
-- caller's rights apply (security_invoker): the view shows what the tables would.
CREATE VIEW llm_models WITH (security_invoker = true) AS
SELECT c.model, c.n_layer, c.n_head, c.d_model, c.n_positions, c.vocab,
       c.vocab::bigint * c.d_model + c.n_positions::bigint * c.d_model
           + c.n_layer::bigint * (12::bigint * c.d_model * c.d_model + 13 * c.d_model) + 2 * c.d_model AS parameters,
       (SELECT sum(pg_catalog.pg_column_size(p.data)) FROM llm_param p WHERE p.model = c.model)::bigint AS stored_bytes,
       coalesce(s.step, 0) AS step,
       (SELECT l.loss FROM llm_train_log l
         WHERE l.model = c.model AND l.step <= coalesce(s.step, 0) ORDER BY l.step DESC LIMIT 1) AS train_loss,
       (SELECT l.val_loss FROM llm_train_log l
         WHERE l.model = c.model AND l.step <= coalesce(s.step, 0) AND l.val_loss IS NOT NULL
         ORDER BY l.step DESC LIMIT 1) AS val_loss,
       EXISTS (SELECT 1 FROM llm_bpe_vocab v WHERE v.model = c.model) AS tokenizer,
       (SELECT count(*) FROM llm_checkpoint k WHERE k.model = c.model) AS checkpoints,
       (SELECT pg_catalog.string_agg(w.format, ', ' ORDER BY w.format) FROM pg_llm_weight_cache() w
         WHERE w.database = pg_catalog.current_database() AND w.model = c.model
           AND w.weights_version = c.weights_version) AS cached
  FROM llm_model_config c LEFT JOIN llm_train_state s ON s.model = c.model;

-- ==== decode: inference precision ====
-- pg_llm.inference_precision (float32, the default, bfloat16 or int8; per session, role or
-- database) picks the copy of a model's weights that inference computes with. Each precision is
-- derived from llm_param and shared by the server's backends like the float32 copy (the format
-- column of pg_llm_weight_cache()). This builds one ahead of time (pgllm quantize), so that no
-- session waits for it; inference_precision NULL means the session's setting.
CREATE FUNCTION pg_llm_weight_cache_build(model text, inference_precision text DEFAULT NULL,
    OUT format text, OUT weights_version bigint, OUT bytes bigint, OUT shared boolean)
RETURNS record
AS 'MODULE_PATHNAME', 'pg_llm_weight_cache_build' LANGUAGE C VOLATILE;

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

-- ==== continuous batching across sessions ====
-- Sessions generating with the same model, weights_version and precision at the same time share
-- one background worker per model, the batch runner, which runs all their decode steps together
-- (pg_llm.batch_sessions sequences at once; 0: each session computes alone). This lists the live
-- runners of the current database: rows / steps is how many sequences a step served on average.
CREATE FUNCTION pg_llm_batch_runners(
    OUT model text, OUT weights_version bigint, OUT inference_precision text, OUT pid int, OUT slots int,
    OUT active int, OUT sequences bigint, OUT steps bigint, OUT rows bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'pg_llm_batch_runners' LANGUAGE C VOLATILE STRICT;
