-- pg_llm 0.1.0: GPT-2 training and inference inside PostgreSQL.
\echo Use "CREATE EXTENSION pg_llm" to load this file. \quit

-- ===========================================================================
-- Schema
-- ===========================================================================

-- One row per model architecture. weights_version is bumped by a trigger whenever the model's
-- rows in llm_param change, so that backends can keep weights cached and check freshness cheaply.
CREATE TABLE llm_model_config (
    model           text PRIMARY KEY CHECK (length(model) BETWEEN 1 AND 200),
    n_layer         int NOT NULL CHECK (n_layer BETWEEN 1 AND 1000),
    n_head          int NOT NULL CHECK (n_head BETWEEN 1 AND 1000),
    d_model         int NOT NULL CHECK (d_model BETWEEN 1 AND 65536),
    n_positions     int NOT NULL CHECK (n_positions BETWEEN 1 AND 1048576),
    vocab           int NOT NULL CHECK (vocab BETWEEN 1 AND 10000000),
    weights_version bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (d_model % n_head = 0)
);
COMMENT ON TABLE llm_model_config IS 'GPT-2 architectures known to pg_llm';

INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab)
VALUES ('gpt2-small', 12, 12, 768, 1024, 50257);

-- One row per named tensor, float32 little-endian, row-major, Hugging Face orientation.
CREATE TABLE llm_param (
    model text NOT NULL REFERENCES llm_model_config (model) ON UPDATE CASCADE ON DELETE CASCADE,
    name  text NOT NULL,
    shape int[] NOT NULL,
    data  bytea NOT NULL,
    PRIMARY KEY (model, name)
);
-- Stored out of line but never pglz-compressed: float data does not compress, and
-- decompressing half a gigabyte on every load would cost more than reading it.
ALTER TABLE llm_param ALTER COLUMN data SET STORAGE EXTERNAL;
COMMENT ON TABLE llm_param IS 'model parameters, one row per tensor (float32 LE, row-major)';

-- AdamW state: first and second moments per tensor, plus the step counter per model,
-- so that training resumes exactly where it stopped.
CREATE TABLE llm_optim_state (
    model text NOT NULL REFERENCES llm_model_config (model) ON UPDATE CASCADE ON DELETE CASCADE,
    name  text NOT NULL,
    m     bytea NOT NULL,
    v     bytea NOT NULL,
    PRIMARY KEY (model, name)
);
ALTER TABLE llm_optim_state ALTER COLUMN m SET STORAGE EXTERNAL;
ALTER TABLE llm_optim_state ALTER COLUMN v SET STORAGE EXTERNAL;

CREATE TABLE llm_train_state (
    model      text PRIMARY KEY REFERENCES llm_model_config (model) ON UPDATE CASCADE ON DELETE CASCADE,
    step       int NOT NULL DEFAULT 0 CHECK (step >= 0),
    data_pos   bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Tokenizer tables, keyed by model: several tokenizers can live in one database.
-- token is the byte-level (unicode-mapped) form used by vocab.json.
CREATE TABLE llm_bpe_vocab (
    model    text NOT NULL,
    token_id int NOT NULL CHECK (token_id >= 0),
    token    text NOT NULL,
    PRIMARY KEY (model, token_id),
    UNIQUE (model, token)
);

CREATE TABLE llm_bpe_merges (
    model text NOT NULL,
    rank  int NOT NULL CHECK (rank >= 0),
    "left"  text NOT NULL,
    "right" text NOT NULL,
    PRIMARY KEY (model, rank)
);

-- Training data: fixed-length blocks; target is tokens shifted by one.
CREATE TABLE llm_dataset (
    id     bigserial PRIMARY KEY,
    tokens int[] NOT NULL,
    target int[] NOT NULL,
    CHECK (cardinality(tokens) = cardinality(target) AND cardinality(tokens) > 0)
);

CREATE TABLE llm_train_log (
    model        text NOT NULL,
    step         int NOT NULL,
    lr           real NOT NULL,
    loss         real NOT NULL,
    grad_norm    real,
    tokens_per_s real,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, step)
);

CREATE TABLE llm_checkpoint (
    id         bigserial PRIMARY KEY,
    model      text NOT NULL REFERENCES llm_model_config (model) ON UPDATE CASCADE ON DELETE CASCADE,
    step       int NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    note       text
);

-- ===========================================================================
-- Weight versioning: any change to a model's parameters bumps its weights_version.
-- ===========================================================================

CREATE FUNCTION llm_param_bump_version() RETURNS trigger
LANGUAGE plpgsql SET search_path = @extschema@, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE llm_model_config c SET weights_version = weights_version + 1
        WHERE c.model IN (SELECT model FROM old_rows);
    ELSE
        UPDATE llm_model_config c SET weights_version = weights_version + 1
        WHERE c.model IN (SELECT model FROM new_rows);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER llm_param_version_ins AFTER INSERT ON llm_param
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_param_bump_version();
CREATE TRIGGER llm_param_version_upd AFTER UPDATE ON llm_param
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_param_bump_version();
CREATE TRIGGER llm_param_version_del AFTER DELETE ON llm_param
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_param_bump_version();

-- User data survives pg_dump / pg_restore; the built-in gpt2-small row is recreated by the extension.
SELECT pg_catalog.pg_extension_config_dump('llm_model_config', 'WHERE model <> ''gpt2-small''');
SELECT pg_catalog.pg_extension_config_dump('llm_param', '');
SELECT pg_catalog.pg_extension_config_dump('llm_optim_state', '');
SELECT pg_catalog.pg_extension_config_dump('llm_train_state', '');
SELECT pg_catalog.pg_extension_config_dump('llm_bpe_vocab', '');
SELECT pg_catalog.pg_extension_config_dump('llm_bpe_merges', '');
SELECT pg_catalog.pg_extension_config_dump('llm_dataset', '');
SELECT pg_catalog.pg_extension_config_dump('llm_dataset_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('llm_train_log', '');
SELECT pg_catalog.pg_extension_config_dump('llm_checkpoint', '');
SELECT pg_catalog.pg_extension_config_dump('llm_checkpoint_id_seq', '');

-- ===========================================================================
-- Core functions
-- ===========================================================================

-- Version of the loaded shared library (may differ from the SQL version after an upgrade).
CREATE FUNCTION pg_llm_version() RETURNS text
AS 'MODULE_PATHNAME', 'pg_llm_version' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Which BLAS the backend opened, and how many threads it uses.
CREATE FUNCTION pg_llm_blas_info() RETURNS text
AS 'MODULE_PATHNAME', 'pg_llm_blas_info' LANGUAGE C VOLATILE STRICT;

-- ===========================================================================
-- Training (src/train.c, src/kernels.c)
-- ===========================================================================

-- Runs `steps` AdamW steps over llm_dataset and writes back the parameters (llm_param), the
-- moments (llm_optim_state), the step counter and data position (llm_train_state); one row per
-- step goes to llm_train_log. Returns the last step's mean loss. The architecture comes from
-- llm_model_config: n_layer, n_head, D (or d) and vocab, when given, must match it.
-- The learning rate warms up linearly to lr_max over `warmup` steps, then follows a cosine to
-- lr_min at total_steps (default: the end of this call, or the end of the warmup if later).
-- grad_clip 0 turns clipping off; seed drives the dropout masks (data order is fixed).
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
    d int DEFAULT NULL)
RETURNS real
AS 'MODULE_PATHNAME', 'llm_train' LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION llm_train IS 'train a model on llm_dataset with AdamW; resumable';
