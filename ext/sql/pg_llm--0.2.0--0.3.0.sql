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
    -- every table that references llm_model_config, so that a table added later counts too; but
    -- in a subscription's apply (session_replication_role replica: docs/scale-out.md enables this
    -- trigger for it) the tokenizer does not: the publication ships the model with its tokenizer,
    -- whose rows may be copied before the model's row, and the delete below cascades nothing there
    FOR ref IN SELECT c.conrelid::regclass AS tab, a.attname
                 FROM pg_constraint c
                 JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
                WHERE c.confrelid = '@extschema@.llm_model_config'::regclass AND c.contype = 'f'
                  AND NOT (c.conrelid IN ('@extschema@.llm_bpe_vocab'::regclass, '@extschema@.llm_bpe_merges'::regclass)
                           AND pg_catalog.current_setting('session_replication_role') OPERATOR(pg_catalog.=) 'replica')
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
-- A model's rows in every table follow it. The tokenizer and the training log now reference
-- llm_model_config, as the weights, optimizer state, training state and snapshots already did:
-- renaming a model (ON UPDATE CASCADE) or dropping it (ON DELETE CASCADE) takes them along, and a
-- tokenizer can no longer be loaded for a model that does not exist. NOT VALID: rows that a
-- database already holds for models deleted before this version are left alone; new rows are
-- checked.
ALTER TABLE llm_bpe_vocab ADD CONSTRAINT llm_bpe_vocab_model_fkey FOREIGN KEY (model)
    REFERENCES llm_model_config (model) ON UPDATE CASCADE ON DELETE CASCADE NOT VALID;
ALTER TABLE llm_bpe_merges ADD CONSTRAINT llm_bpe_merges_model_fkey FOREIGN KEY (model)
    REFERENCES llm_model_config (model) ON UPDATE CASCADE ON DELETE CASCADE NOT VALID;
ALTER TABLE llm_train_log ADD CONSTRAINT llm_train_log_model_fkey FOREIGN KEY (model)
    REFERENCES llm_model_config (model) ON UPDATE CASCADE ON DELETE CASCADE NOT VALID;

-- The learning-rate schedule of the model's last pgllm train run ({"start", "total_steps",
-- "warmup", "lr_max", "lr_min"}), which `pgllm train --schedule continue` follows. llm_train
-- takes the schedule as arguments (schedule_start, total_steps, warmup, ...) and records none.
ALTER TABLE llm_train_state ADD COLUMN schedule jsonb;

-- llm_train: schedule_start, the step at which the schedule's warmup starts (default 0, the
-- model's first step). pgllm train --schedule new passes the model's step, so that training a
-- trained model warms up and decays again instead of running at the end of its old schedule.
DROP FUNCTION llm_train(text, int, double precision, double precision, double precision, double precision,
                        double precision, int, int, int, int, int, int, int, double precision,
                        double precision, int, double precision, bigint, int, text, text, int, int);
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
    eval_rows int DEFAULT NULL,
    schedule_start int DEFAULT 0)
RETURNS real
AS 'MODULE_PATHNAME', 'llm_train' LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION llm_train IS 'train a model on a dataset of llm_dataset with AdamW; resumable';

-- The identity of a model's tokenizer: the md5 of its vocabulary (id TAB token, by id) and merges
-- (left SPACE right, by rank), NULL when it has none. Equal fingerprints encode alike; pgllm
-- computes the same from vocab.json and merges.txt (pgllm/tokenizer_files.py). PUBLIC: it reads
-- the tokenizer tables with the caller's rights.
CREATE FUNCTION llm_tokenizer_fingerprint(model text) RETURNS text
LANGUAGE sql STABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT md5(v.s || E'\n\n' || coalesce(m.s, ''))
      FROM (SELECT string_agg(b.token_id || E'\t' || b.token, E'\n' ORDER BY b.token_id) AS s
              FROM @extschema@.llm_bpe_vocab b WHERE b.model = $1) v,
           (SELECT string_agg(g."left" || ' ' || g."right", E'\n' ORDER BY g.rank) AS s
              FROM @extschema@.llm_bpe_merges g WHERE g.model = $1) m
     WHERE v.s IS NOT NULL
$$;

-- Datasets remember the tokenizer their rows were made with, in each row: tokenizer says which
-- (`model NAME` for the server's tokenizer of a model, as llm_dataset_build and pgllm dataset
-- --tokenizer db write it; `gpt2 (transformers)` or `DIR (transformers)` for pgllm dataset's
-- other tokenizers), tokenizer_fingerprint is llm_tokenizer_fingerprint of it. NULL: unknown
-- (rows written by hand, or before this version).
ALTER TABLE llm_dataset ADD COLUMN tokenizer text, ADD COLUMN tokenizer_fingerprint text;

-- llm_dataset_check_tokenizer(dataset, model, for_training, fingerprint): the rule, in one place.
-- A dataset's tokenizer is that of its first row (by id); nothing is checked when it is unknown,
-- or when the other side has no tokenizer. for_training: a model (its tokenizer, or fingerprint
-- when given) about to train or be evaluated on the dataset (llm_train and llm_eval call this
-- unless pg_llm.check_dataset_tokenizer is off). Otherwise: rows about to be added, made with
-- the model's tokenizer or the one of fingerprint (llm_dataset_build, pgllm dataset). PUBLIC: it
-- reads llm_dataset and the tokenizer tables with the caller's rights.
CREATE FUNCTION llm_dataset_check_tokenizer(dataset text, model text, for_training boolean DEFAULT true,
                                            fingerprint text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    have record;
    fp text := llm_dataset_check_tokenizer.fingerprint;
BEGIN
    SELECT d.tokenizer, d.tokenizer_fingerprint INTO have FROM @extschema@.llm_dataset d
     WHERE d.dataset = llm_dataset_check_tokenizer.dataset ORDER BY d.id LIMIT 1;
    IF NOT FOUND OR have.tokenizer_fingerprint IS NULL THEN
        RETURN;
    END IF;
    IF fp IS NULL AND llm_dataset_check_tokenizer.model IS NOT NULL THEN
        fp := @extschema@.llm_tokenizer_fingerprint(llm_dataset_check_tokenizer.model);
    END IF;
    IF fp IS NULL OR fp = have.tokenizer_fingerprint THEN
        RETURN;
    END IF;
    IF for_training THEN
        RAISE EXCEPTION 'dataset "%" was tokenized with another tokenizer than model "%" has',
                        llm_dataset_check_tokenizer.dataset, llm_dataset_check_tokenizer.model
            USING ERRCODE = 'data_exception',
                  DETAIL = format('Its rows were made with %s; their token ids would mean other text to this model.',
                                  coalesce(have.tokenizer, 'an unnamed tokenizer')),
                  HINT = format('Rebuild it with the model''s tokenizer (pgllm dataset --model %s --dataset %s '
                                '--truncate ...), or SET pg_llm.check_dataset_tokenizer = off to use it anyway.',
                                llm_dataset_check_tokenizer.model, llm_dataset_check_tokenizer.dataset);
    END IF;
    RAISE EXCEPTION 'dataset "%" holds rows made with another tokenizer', llm_dataset_check_tokenizer.dataset
        USING ERRCODE = 'data_exception',
              DETAIL = format('Its rows were made with %s; these would be made with %s.',
                              coalesce(have.tokenizer, 'an unnamed tokenizer'),
                              coalesce('model ' || llm_dataset_check_tokenizer.model, 'another')),
              HINT = 'Write them to another dataset, or replace its rows (pgllm dataset --truncate, '
                     'llm_dataset_build(..., replace => true)).';
END $$;

-- Every dataset: rows, block size, tokens, and the tokenizer its rows were made with (of its first
-- row). Counting reads the (dataset, id) index, not the token arrays. The caller's rights apply.
CREATE VIEW llm_datasets WITH (security_invoker = true) AS
SELECT s.dataset, s.rows, f.block_size, s.rows * f.block_size AS tokens, f.tokenizer, f.tokenizer_fingerprint
  FROM (SELECT d.dataset, count(*) AS rows, min(d.id) AS first_id FROM llm_dataset d GROUP BY d.dataset) s
 CROSS JOIN LATERAL (SELECT pg_catalog.cardinality(d.tokens) AS block_size, d.tokenizer, d.tokenizer_fingerprint
                       FROM llm_dataset d WHERE d.id = s.first_id) f;

-- llm_dataset_drop(dataset) -> rows deleted (0 when it has none). PUBLIC: the caller's rights on
-- llm_dataset apply.
CREATE FUNCTION llm_dataset_drop(dataset text) RETURNS bigint
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (DELETE FROM @extschema@.llm_dataset d WHERE d.dataset = $1 RETURNING 1)
    SELECT count(*) FROM gone
$$;

-- llm_tokenizer_copy(source, target, replace): the target model gets a copy of the source
-- model's tokenizer (a model made by llm_init or import with the vocabulary of another);
-- returns its tokens. A target that has a tokenizer keeps it unless replace. PUBLIC: the caller's
-- rights on the tokenizer tables apply.
CREATE FUNCTION llm_tokenizer_copy(source text, target text, replace boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM @extschema@.llm_bpe_vocab v WHERE v.model = source) THEN
        RAISE EXCEPTION 'model "%" has no tokenizer', source USING ERRCODE = 'undefined_object',
            HINT = 'pgllm models shows which models have one.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM @extschema@.llm_model_config c WHERE c.model = target) THEN
        RAISE EXCEPTION 'model "%" does not exist', target USING ERRCODE = 'undefined_object',
            HINT = 'Create it first (pgllm init, pgllm import).';
    END IF;
    IF EXISTS (SELECT 1 FROM @extschema@.llm_bpe_vocab v WHERE v.model = target) THEN
        IF NOT replace THEN
            RAISE EXCEPTION 'model "%" already has a tokenizer', target USING ERRCODE = 'duplicate_object',
                HINT = 'Pass replace => true to replace it (pgllm tokenizer --truncate).';
        END IF;
        DELETE FROM @extschema@.llm_bpe_merges g WHERE g.model = target;
        DELETE FROM @extschema@.llm_bpe_vocab v WHERE v.model = target;
    END IF;
    INSERT INTO @extschema@.llm_bpe_vocab (model, token_id, token)
    SELECT target, v.token_id, v.token FROM @extschema@.llm_bpe_vocab v WHERE v.model = source;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO @extschema@.llm_bpe_merges (model, rank, "left", "right")
    SELECT target, g.rank, g."left", g."right" FROM @extschema@.llm_bpe_merges g WHERE g.model = source;
    RETURN n;
END $$;

-- The shared copies of a model's weights (weights_cache.c): unlinked when the model is dropped or
-- renamed, so that they do not wait for eviction (its batch runner retires with them). PUBLIC: it
-- checks itself that the caller may delete the model's weights (DELETE on llm_param).
CREATE FUNCTION pg_llm_weight_cache_discard(model text) RETURNS int
AS 'MODULE_PATHNAME', 'pg_llm_weight_cache_discard' LANGUAGE C VOLATILE STRICT;

-- A model that a session trains is neither dropped nor renamed under it: llm_model_drop and
-- llm_model_rename take the model's training lock for their transaction, or fail at once naming
-- the training session. The lock is train_lock.c's advisory lock (LLM_TRAIN_LOCK_CLASS,
-- hash_bytes(model)), which pg_try_advisory_xact_lock(int, int) takes as (1819045236,
-- hashtext(model)); tests/test_lifecycle.py holds the two to each other. They take it first, and
-- every path of a role without the rights to drop or rename ends in an error, which releases it.
-- llm_model_drop(model): the model and all of it (weights, optimizer and training state, training
-- log, snapshots, tokenizer, the server's shared copies). PUBLIC: the caller's rights on the
-- tables apply (a role with pgllm grant --train may).
CREATE FUNCTION llm_model_drop(model text) RETURNS void
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(1819045236, hashtext(model COLLATE "C")) THEN
        RAISE EXCEPTION 'model "%" is being trained by another session', model USING ERRCODE = 'lock_not_available',
            HINT = 'Wait for that run to finish, or stop it: pg_locks shows its pid (classid 1819045236).';
    END IF;
    DELETE FROM @extschema@.llm_model_config c WHERE c.model = llm_model_drop.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'model "%" does not exist', model USING ERRCODE = 'undefined_object',
            HINT = 'pgllm models lists them (SELECT model FROM llm_models).';
    END IF;
    PERFORM @extschema@.pg_llm_weight_cache_discard(model);
END $$;

-- llm_model_rename(model, new_name): every row of the model follows the new name. new_name may
-- be gpt2-small while that is only the built-in registration (GPT-2 small's shape, nothing
-- stored for it): it takes its place, so that commands and clients that default to gpt2-small
-- use the renamed model. PUBLIC: the caller's rights apply.
CREATE FUNCTION llm_model_rename(model text, new_name text) RETURNS void
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ref record;
    used boolean;
BEGIN
    IF NOT pg_try_advisory_xact_lock(1819045236, hashtext(model COLLATE "C")) THEN
        RAISE EXCEPTION 'model "%" is being trained by another session', model USING ERRCODE = 'lock_not_available',
            HINT = 'Wait for that run to finish, or stop it: pg_locks shows its pid (classid 1819045236).';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM @extschema@.llm_model_config c WHERE c.model = llm_model_rename.model) THEN
        RAISE EXCEPTION 'model "%" does not exist', model USING ERRCODE = 'undefined_object',
            HINT = 'pgllm models lists them (SELECT model FROM llm_models).';
    END IF;
    IF new_name = model THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM @extschema@.llm_model_config c WHERE c.model = new_name) THEN
        -- the built-in gpt2-small registration, with nothing stored for it, gives way
        used := new_name <> 'gpt2-small' OR NOT EXISTS (
            SELECT 1 FROM @extschema@.llm_model_config c WHERE c.model = new_name
               AND (c.n_layer, c.n_head, c.d_model, c.n_positions, c.vocab) = (12, 12, 768, 1024, 50257));
        FOR ref IN SELECT k.conrelid::regclass AS tab, a.attname AS col
                     FROM pg_constraint k
                     JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
                    WHERE k.confrelid = '@extschema@.llm_model_config'::regclass AND k.contype = 'f'
        LOOP
            EXIT WHEN used;
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I = $1)', ref.tab, ref.col) INTO used USING new_name;
        END LOOP;
        IF used THEN
            RAISE EXCEPTION 'model "%" already exists', new_name USING ERRCODE = 'duplicate_object',
                HINT = 'Drop it first (pgllm models rm, llm_model_drop), or choose another name.';
        END IF;
        DELETE FROM @extschema@.llm_model_config c WHERE c.model = new_name;
    END IF;
    UPDATE @extschema@.llm_model_config c SET model = new_name WHERE c.model = llm_model_rename.model;
    PERFORM @extschema@.pg_llm_weight_cache_discard(model);
END $$;

-- llm_model_copy(source, target, checkpoints): a new model with the source's shape, weights,
-- optimizer and training state, training log and tokenizer (and its snapshots, with checkpoints).
-- Every table that references llm_model_config is copied, so that one added later is too. The
-- target may be the unused built-in gpt2-small, as for llm_model_rename. PUBLIC: the caller's
-- rights apply.
CREATE FUNCTION llm_model_copy(source text, target text, checkpoints boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ref record;
    cols text;
    vals text;
    snap record;
    new_id bigint;
    used boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM @extschema@.llm_model_config c WHERE c.model = source) THEN
        RAISE EXCEPTION 'model "%" does not exist', source USING ERRCODE = 'undefined_object',
            HINT = 'pgllm models lists them (SELECT model FROM llm_models).';
    END IF;
    IF EXISTS (SELECT 1 FROM @extschema@.llm_model_config c WHERE c.model = target) THEN
        -- the built-in gpt2-small registration, with nothing stored for it, gives way
        used := target <> 'gpt2-small' OR NOT EXISTS (
            SELECT 1 FROM @extschema@.llm_model_config c WHERE c.model = target
               AND (c.n_layer, c.n_head, c.d_model, c.n_positions, c.vocab) = (12, 12, 768, 1024, 50257));
        FOR ref IN SELECT k.conrelid::regclass AS tab, a.attname AS col
                     FROM pg_constraint k
                     JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
                    WHERE k.confrelid = '@extschema@.llm_model_config'::regclass AND k.contype = 'f'
        LOOP
            EXIT WHEN used;
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I = $1)', ref.tab, ref.col) INTO used USING target;
        END LOOP;
        IF used THEN
            RAISE EXCEPTION 'model "%" already exists', target USING ERRCODE = 'duplicate_object',
                HINT = 'Drop it first (pgllm models rm, llm_model_drop), or choose another name.';
        END IF;
        DELETE FROM @extschema@.llm_model_config c WHERE c.model = target;
    END IF;
    INSERT INTO @extschema@.llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab)
    SELECT target, c.n_layer, c.n_head, c.d_model, c.n_positions, c.vocab
      FROM @extschema@.llm_model_config c WHERE c.model = source;
    FOR ref IN SELECT k.conrelid::regclass AS tab, a.attname AS col
                 FROM pg_constraint k
                 JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
                WHERE k.confrelid = '@extschema@.llm_model_config'::regclass AND k.contype = 'f'
                  AND k.conrelid <> '@extschema@.llm_checkpoint'::regclass
                ORDER BY k.conrelid
    LOOP
        SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum),
               string_agg(CASE WHEN a.attname = ref.col THEN '$2' ELSE quote_ident(a.attname) END, ', '
                          ORDER BY a.attnum)
          INTO cols, vals
          FROM pg_attribute a
         WHERE a.attrelid = ref.tab AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
        EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM %s WHERE %I = $1', ref.tab, cols, vals, ref.tab, ref.col)
            USING source, target;
    END LOOP;
    IF checkpoints THEN
        FOR snap IN SELECT k.id FROM @extschema@.llm_checkpoint k WHERE k.model = source ORDER BY k.id LOOP
            INSERT INTO @extschema@.llm_checkpoint (model, step, created_at, note, data_pos)
            SELECT target, k.step, k.created_at, k.note, k.data_pos FROM @extschema@.llm_checkpoint k
             WHERE k.id = snap.id
            RETURNING llm_checkpoint.id INTO new_id;
            INSERT INTO @extschema@.llm_checkpoint_tensor (checkpoint_id, name, shape, data, m, v)
            SELECT new_id, t.name, t.shape, t.data, t.m, t.v FROM @extschema@.llm_checkpoint_tensor t
             WHERE t.checkpoint_id = snap.id;
        END LOOP;
    END IF;
END $$;


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
-- measuring, weights/models.c), takes its share of the server's threads like any session
-- (base/thread_budget.c), checks the caller's rights on every call with read-only SPI
-- (weights/rights.c; a worker runs as the leader's user, with its snapshot), and products give the
-- same bits on any number of threads (compute/blas.c).
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

-- ==== embeddings: batched, pgvector ====

-- llm_embed_batch: llm_embed of many texts in shared forward passes (each weight matrix read once
-- for up to 2048 tokens of texts), one row per element in array order; embedding is NULL for a
-- NULL text or one without tokens. For a table: see docs/guide.md ("Semantic search with pgvector").
-- Privileges: PUBLIC, as llm_embed: it reads the model's tables with the caller's rights.
-- Labels as llm_embed's (docs/scale-out.md): the same numbers from the weights the statement sees,
-- in any process.
CREATE FUNCTION llm_embed_batch(inputs text[], model text DEFAULT 'gpt2-small')
RETURNS TABLE (ord integer, embedding real[])
AS 'MODULE_PATHNAME', 'llm_embed_batch' LANGUAGE C STABLE PARALLEL SAFE COST 1000000;
