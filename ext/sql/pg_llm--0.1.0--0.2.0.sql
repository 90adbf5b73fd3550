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
-- stream, beams, logits, encode/decode, the models' state); with train => true, every right on
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
                              'llm_tokenizer_version', 'llm_train_state', 'llm_train_log', 'llm_models') THEN
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
