-- pg_llm 0.2.0 -> 0.3.0.
--
-- pg_llm--0.1.0.sql and pg_llm--0.1.0--0.2.0.sql are frozen (both were released): every schema
-- change since 0.2.0 is here. A fresh CREATE EXTENSION pg_llm runs 0.1.0's script and then the
-- upgrades in order, so a new install and an updated one are the same by construction. Keep each
-- change in the section of its topic.
\echo Use "CREATE EXTENSION pg_llm" or "ALTER EXTENSION pg_llm UPDATE" to load this file. \quit

-- ==== security: privileges, trigger functions ====
-- Every object of the extension has an explicit privilege decision (docs/deployment.md, "Roles";
-- tests/test_security.py holds the whole table): PUBLIC executes the entry points, which act only
-- through the caller's own rights on the tables (serving checks them on every call, row-level
-- security included, since it computes with a copy of the weights); never a trigger function, the
-- training lock or the server-file functions. Every function that sets search_path puts
-- pg_catalog first and pg_temp last and names the extension's objects with their schema, so that
-- no object of a role that can create one (a type, a cast, an operator, a function) is ever
-- resolved in place of the catalog's, whoever calls.

-- The trigger functions: invoker's rights (0.1.0 and 0.2.0 made two of them SECURITY DEFINER,
-- and any role could attach them to a table of its own whose cast to text ran as the owner),
-- never executable by PUBLIC, and each refuses to run on any table but its own (the C ones check
-- in src/privileges.c). A role that writes the tokenizer tables now needs the rights on
-- llm_tokenizer_version and its sequence too: llm_grant(role, train => true) gives them.
CREATE OR REPLACE FUNCTION llm_bpe_bump_version() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID NOT IN ('@extschema@.llm_bpe_vocab'::regclass, '@extschema@.llm_bpe_merges'::regclass)
       OR TG_LEVEL <> 'STATEMENT' OR TG_WHEN <> 'AFTER' THEN
        RAISE EXCEPTION 'llm_bpe_bump_version() is a trigger of pg_llm''s tables llm_bpe_vocab and llm_bpe_merges only'
            USING ERRCODE = 'triggered_action_exception',
                  DETAIL = format('It fired %s %s ... FOR EACH %s on table %s.', TG_WHEN, TG_OP, TG_LEVEL, TG_RELID::regclass);
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE @extschema@.llm_tokenizer_version SET version = nextval('@extschema@.llm_tokenizer_version_seq');
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO @extschema@.llm_tokenizer_version AS v (model, version)
        SELECT m, nextval('@extschema@.llm_tokenizer_version_seq') FROM (SELECT DISTINCT model FROM new_rows) s(m)
        ON CONFLICT (model) DO UPDATE SET version = excluded.version;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO @extschema@.llm_tokenizer_version AS v (model, version)
        SELECT m, nextval('@extschema@.llm_tokenizer_version_seq')
        FROM (SELECT model FROM old_rows UNION SELECT model FROM new_rows) s(m)
        ON CONFLICT (model) DO UPDATE SET version = excluded.version;
    ELSE
        INSERT INTO @extschema@.llm_tokenizer_version AS v (model, version)
        SELECT m, nextval('@extschema@.llm_tokenizer_version_seq') FROM (SELECT DISTINCT model FROM old_rows) s(m)
        ON CONFLICT (model) DO UPDATE SET version = excluded.version;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION llm_model_config_replace_builtin() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ref record;
    used boolean;
BEGIN
    IF TG_RELID <> '@extschema@.llm_model_config'::regclass OR TG_LEVEL <> 'ROW' OR TG_WHEN <> 'BEFORE'
       OR TG_OP <> 'INSERT' THEN
        RAISE EXCEPTION 'llm_model_config_replace_builtin() is a trigger of pg_llm''s table llm_model_config only'
            USING ERRCODE = 'triggered_action_exception',
                  DETAIL = format('It fired %s %s ... FOR EACH %s on table %s.', TG_WHEN, TG_OP, TG_LEVEL, TG_RELID::regclass);
    END IF;
    -- every table that references llm_model_config, so that a table added later counts too
    FOR ref IN SELECT c.conrelid::regclass AS tab, a.attname
                 FROM pg_constraint c
                 JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
                WHERE c.confrelid = '@extschema@.llm_model_config'::regclass AND c.contype = 'f'
    LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I OPERATOR(pg_catalog.=) $1)', ref.tab, ref.attname)
            INTO used USING NEW.model;
        IF used THEN
            RETURN NEW;
        END IF;
    END LOOP;
    DELETE FROM @extschema@.llm_model_config c
     WHERE c.model = NEW.model
       AND (c.n_layer, c.n_head, c.d_model, c.n_positions, c.vocab) = (12, 12, 768, 1024, 50257);
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION llm_dataset_check_length() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    bad record;
BEGIN
    IF TG_RELID <> '@extschema@.llm_dataset'::regclass OR TG_LEVEL <> 'STATEMENT' OR TG_WHEN <> 'AFTER'
       OR TG_OP NOT IN ('INSERT', 'UPDATE') THEN
        RAISE EXCEPTION 'llm_dataset_check_length() is a trigger of pg_llm''s table llm_dataset only'
            USING ERRCODE = 'triggered_action_exception',
                  DETAIL = format('It fired %s %s ... FOR EACH %s on table %s.', TG_WHEN, TG_OP, TG_LEVEL, TG_RELID::regclass);
    END IF;
    SELECT n.dataset, n.lo, n.hi, o.len INTO bad
      FROM (SELECT dataset, min(cardinality(tokens)) AS lo, max(cardinality(tokens)) AS hi
              FROM new_rows GROUP BY dataset) n
      CROSS JOIN LATERAL (SELECT cardinality(d.tokens) AS len FROM @extschema@.llm_dataset d
                           WHERE d.dataset = n.dataset ORDER BY d.id LIMIT 1) o
     WHERE n.lo <> n.hi OR n.lo <> o.len
        OR (TG_OP = 'UPDATE' AND EXISTS (SELECT 1 FROM @extschema@.llm_dataset d
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

REVOKE EXECUTE ON FUNCTION llm_param_note_change() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION llm_param_bump_version() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION llm_bpe_bump_version() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION llm_model_config_replace_builtin() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION llm_dataset_check_length() FROM PUBLIC;

-- Files the server reads: superusers and pg_read_server_files (checked inside as before).
REVOKE EXECUTE ON FUNCTION pg_llm_load_bpe_vocab(text, text, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_llm_load_bpe_merges(text, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_llm_load_bpe_vocab(text, text, boolean) TO pg_read_server_files;
GRANT EXECUTE ON FUNCTION pg_llm_load_bpe_merges(text, text, boolean) TO pg_read_server_files;

-- The training lock is held for a whole session: training roles only (and it checks inside that
-- the caller may write the model's weights). Roles already granted training rights keep it.
REVOKE EXECUTE ON FUNCTION llm_train_lock(text) FROM PUBLIC;
DO $$
DECLARE
    r regrole;
BEGIN
    FOR r IN SELECT DISTINCT g.grantee::regrole
               FROM pg_catalog.pg_class c,
                    LATERAL pg_catalog.aclexplode(c.relacl) g
              WHERE c.oid = '@extschema@.llm_param'::regclass AND g.privilege_type = 'UPDATE' AND g.grantee <> 0
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION @extschema@.llm_train_lock(text) TO %s', r);
    END LOOP;
END $$;

-- llm_grant / llm_revoke: the owner's, as before; the training lock goes with training rights, and
-- a view gets SELECT only (it writes nothing).
CREATE OR REPLACE FUNCTION llm_grant(role regrole, train boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
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
            EXECUTE format(CASE rel.relkind WHEN 'S' THEN 'GRANT USAGE, SELECT, UPDATE ON SEQUENCE %s TO %s'
                                            WHEN 'v' THEN 'GRANT SELECT ON %s TO %s'
                                            ELSE 'GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON %s TO %s' END,
                           rel.name, role);
        ELSIF rel.relname IN ('llm_model_config', 'llm_param', 'llm_bpe_vocab', 'llm_bpe_merges',
                              'llm_tokenizer_version', 'llm_train_state', 'llm_train_log', 'llm_checkpoint',
                              'llm_models') THEN
            EXECUTE format('GRANT SELECT ON %s TO %s', rel.name, role);
        END IF;
    END LOOP;
    IF train THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION @extschema@.llm_train_lock(text) TO %s', role);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION llm_revoke(role regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
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
    EXECUTE format('REVOKE EXECUTE ON FUNCTION @extschema@.llm_train_lock(text) FROM %s', role);
    IF (SELECT extnamespace FROM pg_extension WHERE extname = 'pg_llm') <> 'public'::regnamespace THEN
        EXECUTE format('REVOKE USAGE ON SCHEMA @extschema@ FROM %s', role);
    END IF;
END $$;

-- The batch runner's list shows only the models the caller may read, and the key/value cache each
-- runner reserved (the positions a sequence can use: n_positions per slot, prompt included).
DROP FUNCTION pg_llm_batch_runners();
CREATE FUNCTION pg_llm_batch_runners(
    OUT model text, OUT weights_version bigint, OUT inference_precision text, OUT pid int, OUT slots int,
    OUT active int, OUT sequences bigint, OUT steps bigint, OUT rows bigint, OUT cache_bytes bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'pg_llm_batch_runners' LANGUAGE C VOLATILE STRICT;

-- ==== models, datasets and tokenizers: lifecycle ====

-- ==== precision ====

-- ==== scale-out: volatility and parallel safety ====
-- Every function says what it really does (docs/scale-out.md has the table; tests/test_parallel.py
-- compares it with pg_proc), so that the planner may run the model in parallel workers, use an
-- index for a comparison with llm_embed(...), and so that pgpool-II, which sends a VOLATILE call to
-- the primary, needs to be told only about generation.
--
-- STABLE: same arguments, same result within a statement, nothing written. Measuring, logits and
-- beam search compute the same numbers from the same weights (the weights a statement sees do not
-- change under it: their SPI reads use the statement's snapshot). Generation stays VOLATILE:
-- without a seed each call samples anew, and a STABLE label would let the planner call it once
-- for several rows (an index condition, a hoisted subquery).
--
-- PARALLEL SAFE: each runs in a parallel worker and returns there exactly what it returns in the
-- leader: the worker maps the server's shared copy of the weights (the float32 block for
-- measuring, model.c), takes its share of the server's threads like any session (threads.c), checks
-- the caller's rights on every call with read-only SPI (privileges.c; a worker runs as the leader's
-- user, with its snapshot), and products give the same bits on any number of threads (blas.c).
-- Seeded sampling is the same stream in any process; unseeded sampling is random in any process.
-- llm_generate_stream stays PARALLEL RESTRICTED: a worker's rows reach the leader in batches of
-- kilobytes (shm_mq), so a stream computed there would arrive all at once at its end.
-- pg_llm_blas_info is RESTRICTED: it describes the threads of the backend that runs it.
-- Writing functions (training, imports, checkpoints, datasets, tokenizer loads, grants, the
-- training lock, the staged import file, files written on the server) stay VOLATILE PARALLEL UNSAFE.
--
-- COST, in units of cpu_operator_cost: a forward pass over a short text costs about what reading
-- a few hundred pages does (GPT-2 small, 32 tokens: ~30 ms), a generation or a dataset's
-- evaluation ten times that. With the default cost of 1 the planner judged a table's worth of
-- forward passes cheaper than starting one worker (parallel_setup_cost 1000) and never used any.
ALTER FUNCTION llm_logits(int[], text) STABLE PARALLEL SAFE COST 100000;
ALTER FUNCTION llm_embed(text, text) STABLE PARALLEL SAFE COST 100000;
ALTER FUNCTION llm_perplexity(text, text, int) STABLE PARALLEL SAFE COST 100000;
ALTER FUNCTION llm_eval(text, text, int, int) STABLE PARALLEL SAFE COST 1000000;
ALTER FUNCTION llm_beam_search(text, int, int, text, double precision) STABLE PARALLEL SAFE COST 1000000;
ALTER FUNCTION llm_beam_search_tokens(int[], int, int, text, int, double precision) STABLE PARALLEL SAFE COST 1000000;
ALTER FUNCTION llm_generate(text, int, double precision, int, double precision, text, bigint)
    VOLATILE PARALLEL SAFE COST 1000000;
ALTER FUNCTION llm_generate_tokens(int[], int, double precision, int, double precision, text, bigint, int)
    VOLATILE PARALLEL SAFE COST 1000000;
ALTER FUNCTION llm_generate_batch(text[], int, double precision, int, double precision, text, bigint)
    VOLATILE PARALLEL SAFE COST 1000000;
ALTER FUNCTION llm_generate_stream(text, int, double precision, int, double precision, text, bigint)
    VOLATILE PARALLEL RESTRICTED COST 1000000;
ALTER FUNCTION pg_llm_blas_info() VOLATILE PARALLEL RESTRICTED;
-- what the server holds (files of the data directory, read the same from any process)
ALTER FUNCTION pg_llm_weight_cache() VOLATILE PARALLEL SAFE;
ALTER FUNCTION pg_llm_batch_runners() VOLATILE PARALLEL SAFE;
