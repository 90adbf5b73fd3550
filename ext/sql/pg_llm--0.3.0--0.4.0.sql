-- pg_llm 0.3.0 -> 0.4.0.
--
-- pg_llm--0.1.0.sql and the upgrade scripts up to 0.3.0 are frozen (each was released): every
-- schema change since 0.3.0 is here. A fresh CREATE EXTENSION pg_llm runs 0.1.0's script and then
-- the upgrades in order, so a new install and an updated one are the same by construction. Keep
-- each change in the section of its topic.
\echo Use "CREATE EXTENSION pg_llm" or "ALTER EXTENSION pg_llm UPDATE" to load this file. \quit

-- ==== adapters: LoRA ====
-- A LoRA adapter of a model (PEFT's LoRA on GPT-2's Conv1D products): for each target product and
-- layer, lora_A (rank, in) and lora_B (out, rank) in PEFT's orientation and names
-- (h.{l}.attn.c_attn.lora_A, ...), so that the product gains (alpha / rank) * x A^T B^T. Training
-- (llm_train(model, ..., adapter => a)) changes only the adapter's rows; the base model is frozen
-- and never copied. base_version: the base's weights_version when the adapter last trained.
CREATE TABLE llm_adapter (
    adapter      text PRIMARY KEY CHECK (length(adapter) BETWEEN 1 AND 200),
    model        text NOT NULL REFERENCES llm_model_config (model) ON UPDATE CASCADE ON DELETE CASCADE,
    rank         int NOT NULL CHECK (rank BETWEEN 1 AND 1024),
    alpha        real NOT NULL CHECK (alpha > 0 AND alpha < 'Infinity'),
    dropout      real NOT NULL DEFAULT 0 CHECK (dropout >= 0 AND dropout < 1),
    targets      text[] NOT NULL CHECK (cardinality(targets) BETWEEN 1 AND 4 AND array_position(targets, NULL) IS NULL
                                        AND targets <@ ARRAY['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj']),
    step         int NOT NULL DEFAULT 0 CHECK (step >= 0),
    data_pos     bigint NOT NULL DEFAULT 0,
    base_version bigint,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_adapter_model ON llm_adapter (model);
COMMENT ON TABLE llm_adapter IS 'LoRA adapters: one row per adapter of a model';

-- The adapter's tensors (float32 little-endian, row-major) and their AdamW moments (NULL before
-- the adapter's first training step).
CREATE TABLE llm_adapter_param (
    adapter text NOT NULL REFERENCES llm_adapter (adapter) ON UPDATE CASCADE ON DELETE CASCADE,
    name    text NOT NULL,
    shape   int[] NOT NULL,
    data    bytea NOT NULL,
    m       bytea,
    v       bytea,
    PRIMARY KEY (adapter, name)
);
ALTER TABLE llm_adapter_param ALTER COLUMN data SET STORAGE EXTERNAL;
ALTER TABLE llm_adapter_param ALTER COLUMN m SET STORAGE EXTERNAL;
ALTER TABLE llm_adapter_param ALTER COLUMN v SET STORAGE EXTERNAL;
COMMENT ON TABLE llm_adapter_param IS 'LoRA adapters'' tensors, one row per tensor (float32 LE, row-major), with their AdamW moments';

-- An adapter's training log, as llm_train_log is a model's.
CREATE TABLE llm_adapter_train_log (
    adapter      text NOT NULL REFERENCES llm_adapter (adapter) ON UPDATE CASCADE ON DELETE CASCADE,
    step         int NOT NULL,
    lr           real NOT NULL,
    loss         real NOT NULL,
    grad_norm    real,
    tokens_per_s real,
    val_loss     real,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (adapter, step)
);

SELECT pg_catalog.pg_extension_config_dump('llm_adapter', '');
SELECT pg_catalog.pg_extension_config_dump('llm_adapter_param', '');
SELECT pg_catalog.pg_extension_config_dump('llm_adapter_train_log', '');

-- llm_adapter_create: a new adapter of a model with PEFT's initial values (A uniform in
-- +-1/sqrt(in), B zero: it changes nothing until trained). PUBLIC: it writes llm_adapter and
-- llm_adapter_param with the caller's rights.
CREATE FUNCTION llm_adapter_create(adapter text, model text, rank int DEFAULT 8, alpha double precision DEFAULT 16,
                                   dropout double precision DEFAULT 0,
                                   targets text[] DEFAULT ARRAY['attn.c_attn'], seed bigint DEFAULT 1337)
RETURNS void
AS 'MODULE_PATHNAME', 'llm_adapter_create' LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- llm_adapter_drop(adapter) -> whether it existed; its tensors and log go with it. PUBLIC: the
-- caller's rights on llm_adapter apply.
CREATE FUNCTION llm_adapter_drop(adapter text) RETURNS boolean
LANGUAGE sql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (DELETE FROM @extschema@.llm_adapter a WHERE a.adapter = $1 RETURNING 1)
    SELECT count(*) > 0 FROM gone
$$;

-- llm_adapter_copy(source, target): the adapter under another name (of the same model), its
-- tensors, moments, step and log with it. PUBLIC: the caller's rights on the tables apply.
CREATE FUNCTION llm_adapter_copy(source text, target text) RETURNS void
LANGUAGE plpgsql VOLATILE STRICT SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM @extschema@.llm_adapter a WHERE a.adapter = source) THEN
        RAISE EXCEPTION 'adapter "%" does not exist', source USING ERRCODE = 'undefined_object',
            HINT = 'SELECT adapter FROM llm_adapters lists them.';
    END IF;
    IF EXISTS (SELECT 1 FROM @extschema@.llm_adapter a WHERE a.adapter = target) THEN
        RAISE EXCEPTION 'adapter "%" already exists', target USING ERRCODE = 'duplicate_object',
            HINT = 'Drop it first (llm_adapter_drop), or choose another name.';
    END IF;
    INSERT INTO @extschema@.llm_adapter (adapter, model, rank, alpha, dropout, targets, step, data_pos, base_version)
    SELECT target, a.model, a.rank, a.alpha, a.dropout, a.targets, a.step, a.data_pos, a.base_version
      FROM @extschema@.llm_adapter a WHERE a.adapter = source;
    INSERT INTO @extschema@.llm_adapter_param (adapter, name, shape, data, m, v)
    SELECT target, p.name, p.shape, p.data, p.m, p.v FROM @extschema@.llm_adapter_param p WHERE p.adapter = source;
    INSERT INTO @extschema@.llm_adapter_train_log (adapter, step, lr, loss, grad_norm, tokens_per_s, val_loss, created_at)
    SELECT target, g.step, g.lr, g.loss, g.grad_norm, g.tokens_per_s, g.val_loss, g.created_at
      FROM @extschema@.llm_adapter_train_log g WHERE g.adapter = source;
END $$;

-- llm_adapter_merge(adapter, model): a new model, the adapter's base with the adapter merged into
-- its weights (W += alpha / rank * A^T B^T), its tokenizer and training state copied as
-- llm_model_copy does. PUBLIC: it writes with the caller's rights.
CREATE FUNCTION llm_adapter_merge(adapter text, model text) RETURNS void
AS 'MODULE_PATHNAME', 'llm_adapter_merge' LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- A model's copy (llm_model_copy) takes its own rows of every table that references the model,
-- but not its adapters: an adapter's name is its own, and a copy of the base has none.
CREATE OR REPLACE FUNCTION llm_model_copy(source text, target text, checkpoints boolean DEFAULT false) RETURNS void
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
                  AND k.conrelid NOT IN ('@extschema@.llm_checkpoint'::regclass, '@extschema@.llm_adapter'::regclass)
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

-- llm_adapters: each adapter with its size and whether its base changed since it last trained
-- (stale: its update was learnt on other weights). security_invoker: the caller's rights apply.
CREATE VIEW llm_adapters WITH (security_invoker = true) AS
SELECT a.adapter, a.model, a.rank, a.alpha, a.dropout, a.targets, a.step,
       (SELECT pg_catalog.sum(pg_catalog.octet_length(p.data)) / 4 FROM llm_adapter_param p
         WHERE p.adapter = a.adapter)::bigint AS parameters,
       a.base_version, a.base_version IS DISTINCT FROM c.weights_version AND a.step > 0 AS stale,
       a.created_at, a.updated_at
  FROM llm_adapter a JOIN llm_model_config c ON c.model = a.model;

-- llm_train trains an adapter of the model when given one: adapter, the last argument.
DROP FUNCTION llm_train(text, int, double precision, double precision, double precision, double precision,
                        double precision, int, int, int, int, int, int, int, double precision,
                        double precision, int, double precision, bigint, int, text, text, int, int, int);
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
    schedule_start int DEFAULT 0,
    adapter text DEFAULT NULL)
RETURNS real
AS 'MODULE_PATHNAME', 'llm_train' LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION llm_train IS 'train a model, or an adapter of it, on a dataset of llm_dataset with AdamW; resumable';

-- Serving with an adapter: adapter, the last argument of every inference entry point (NULL: the
-- model alone); the adapter is read with the caller's rights on every call. Labels as before
-- (docs/scale-out.md); the functions are re-created, so their grants are PUBLIC's as before.
DROP FUNCTION llm_logits(int[], text);
CREATE FUNCTION llm_logits(tokens int[], model text DEFAULT 'gpt2-small', adapter text DEFAULT NULL) RETURNS real[]
AS 'MODULE_PATHNAME', 'llm_logits' LANGUAGE C STABLE CALLED ON NULL INPUT PARALLEL SAFE COST 100000;

DROP FUNCTION llm_generate(text, int, double precision, int, double precision, text, bigint);
CREATE FUNCTION llm_generate(prompt text, max_tokens int DEFAULT 64,
                             temperature double precision DEFAULT 1.0, topk int DEFAULT 50,
                             topp double precision DEFAULT 0.95, model text DEFAULT 'gpt2-small',
                             seed bigint DEFAULT NULL, adapter text DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'llm_generate' LANGUAGE C VOLATILE CALLED ON NULL INPUT PARALLEL SAFE COST 1000000;

DROP FUNCTION llm_generate_tokens(int[], int, double precision, int, double precision, text, bigint, int);
CREATE FUNCTION llm_generate_tokens(tokens int[], max_tokens int DEFAULT 64,
                                    temperature double precision DEFAULT 1.0, topk int DEFAULT 50,
                                    topp double precision DEFAULT 0.95, model text DEFAULT 'gpt2-small',
                                    seed bigint DEFAULT NULL, eos_token int DEFAULT NULL, adapter text DEFAULT NULL)
RETURNS int[]
AS 'MODULE_PATHNAME', 'llm_generate_tokens' LANGUAGE C VOLATILE CALLED ON NULL INPUT PARALLEL SAFE COST 1000000;

DROP FUNCTION llm_generate_stream(text, int, double precision, int, double precision, text, bigint);
CREATE FUNCTION llm_generate_stream(prompt text, max_tokens int DEFAULT 64,
                                    temperature double precision DEFAULT 1.0, topk int DEFAULT 50,
                                    topp double precision DEFAULT 0.95, model text DEFAULT 'gpt2-small',
                                    seed bigint DEFAULT NULL, adapter text DEFAULT NULL)
RETURNS TABLE (step int, token_id int, token text, text text, is_complete boolean)
AS 'MODULE_PATHNAME', 'llm_generate_stream' LANGUAGE C VOLATILE CALLED ON NULL INPUT PARALLEL RESTRICTED
COST 1000000 ROWS 64;

DROP FUNCTION llm_beam_search_tokens(int[], int, int, text, int, double precision);
CREATE FUNCTION llm_beam_search_tokens(tokens int[], beam_width int DEFAULT 4, max_tokens int DEFAULT 32,
                                       model text DEFAULT 'gpt2-small', eos_token int DEFAULT NULL,
                                       length_penalty double precision DEFAULT 1.0, adapter text DEFAULT NULL)
RETURNS TABLE (rank int, score double precision, token_ids int[])
AS 'MODULE_PATHNAME', 'llm_beam_search_tokens' LANGUAGE C STABLE CALLED ON NULL INPUT PARALLEL SAFE
COST 1000000 ROWS 4;

DROP FUNCTION llm_beam_search(text, int, int, text, double precision);
CREATE FUNCTION llm_beam_search(prompt text, beam_width int DEFAULT 4, max_tokens int DEFAULT 32,
                                model text DEFAULT 'gpt2-small', length_penalty double precision DEFAULT 1.0,
                                adapter text DEFAULT NULL)
RETURNS TABLE (rank int, score double precision, token_ids int[], text text)
AS 'MODULE_PATHNAME', 'llm_beam_search' LANGUAGE C STABLE CALLED ON NULL INPUT PARALLEL SAFE COST 1000000 ROWS 4;

-- llm_generate_batch: adapters, one per prompt (NULL: none) or one for all; rows with different
-- adapters share every pass over the model's weights.
DROP FUNCTION llm_generate_batch(text[], int, double precision, int, double precision, text, bigint);
CREATE FUNCTION llm_generate_batch(prompts text[], max_tokens int DEFAULT 64,
                                   temperature double precision DEFAULT 1.0, topk int DEFAULT 50,
                                   topp double precision DEFAULT 0.95, model text DEFAULT 'gpt2-small',
                                   seed bigint DEFAULT NULL, adapters text[] DEFAULT NULL)
RETURNS TABLE (ord int, text text)
AS 'MODULE_PATHNAME', 'llm_generate_batch' LANGUAGE C VOLATILE CALLED ON NULL INPUT PARALLEL SAFE
COST 1000000 ROWS 100;

DROP FUNCTION llm_eval(text, text, int, int);
CREATE FUNCTION llm_eval(model text, dataset text DEFAULT 'val', max_rows int DEFAULT NULL,
                         batch_size int DEFAULT 8, adapter text DEFAULT NULL,
                         OUT loss double precision, OUT perplexity double precision, OUT rows bigint,
                         OUT tokens bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'llm_eval' LANGUAGE C STABLE PARALLEL SAFE COST 1000000;

DROP FUNCTION llm_perplexity(text, text, int);
CREATE FUNCTION llm_perplexity(input text, model text DEFAULT 'gpt2-small', stride int DEFAULT NULL,
                               adapter text DEFAULT NULL)
RETURNS double precision
AS 'MODULE_PATHNAME', 'llm_perplexity' LANGUAGE C STABLE PARALLEL SAFE COST 100000;

DROP FUNCTION llm_embed(text, text);
CREATE FUNCTION llm_embed(input text, model text DEFAULT 'gpt2-small', adapter text DEFAULT NULL) RETURNS real[]
AS 'MODULE_PATHNAME', 'llm_embed' LANGUAGE C STABLE PARALLEL SAFE COST 100000;

DROP FUNCTION llm_embed_batch(text[], text);
CREATE FUNCTION llm_embed_batch(inputs text[], model text DEFAULT 'gpt2-small', adapter text DEFAULT NULL)
RETURNS TABLE (ord integer, embedding real[])
AS 'MODULE_PATHNAME', 'llm_embed_batch' LANGUAGE C STABLE PARALLEL SAFE COST 1000000;

-- Serving roles read adapters too (an adapter is served with its model's rights and its own rows').
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
                              'llm_models', 'llm_adapter', 'llm_adapter_param', 'llm_adapter_train_log',
                              'llm_adapters') THEN
            EXECUTE format('GRANT SELECT ON %s TO %s', rel.name, role);
        END IF;
    END LOOP;
    IF train THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION @extschema@.llm_train_lock(text) TO %s', role);
    END IF;
END $$;

-- Roles that serve or train already get the new tables as llm_grant would give them.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT g.grantee::regrole AS role, bool_or(g.privilege_type = 'UPDATE') AS train
               FROM pg_catalog.pg_class c, LATERAL pg_catalog.aclexplode(c.relacl) g
              WHERE c.oid = '@extschema@.llm_param'::regclass AND g.grantee <> 0
                AND g.grantee <> c.relowner
              GROUP BY g.grantee
    LOOP
        IF r.train THEN
            EXECUTE pg_catalog.format('GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON @extschema@.llm_adapter, '
                                      '@extschema@.llm_adapter_param, @extschema@.llm_adapter_train_log TO %s', r.role);
        ELSE
            EXECUTE pg_catalog.format('GRANT SELECT ON @extschema@.llm_adapter, @extschema@.llm_adapter_param, '
                                      '@extschema@.llm_adapter_train_log TO %s', r.role);
        END IF;
        EXECUTE pg_catalog.format('GRANT SELECT ON @extschema@.llm_adapters TO %s', r.role);
    END LOOP;
END $$;
