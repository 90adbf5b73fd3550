-- pg_llm 0.1.0: GPT-2 training and inference inside PostgreSQL.
\echo Use "CREATE EXTENSION pg_llm" to load this file. \quit

-- ===========================================================================
-- Schema
-- ===========================================================================

-- One row per model architecture. weights_version is bumped by a trigger whenever the model's
-- rows in llm_param change, so that backends can keep weights cached and check freshness cheaply.
-- Versions come from a sequence so that no number is ever used twice, not even by a rolled-back
-- transaction: a backend that cached weights under a version can trust it.
CREATE SEQUENCE llm_weights_version_seq;

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
-- Weight versioning: any change to a model's parameters bumps its weights_version, once per
-- statement. A row trigger notes the models and a statement trigger bumps them (src/model.c):
-- transition tables would copy every row written, and a row here is a whole tensor.
-- ===========================================================================

CREATE FUNCTION llm_param_note_change() RETURNS trigger
AS 'MODULE_PATHNAME', 'llm_param_note_change' LANGUAGE C;
CREATE FUNCTION llm_param_bump_version() RETURNS trigger
AS 'MODULE_PATHNAME', 'llm_param_bump_version' LANGUAGE C;

CREATE TRIGGER llm_param_note BEFORE INSERT OR UPDATE OR DELETE ON llm_param
    FOR EACH ROW EXECUTE FUNCTION llm_param_note_change();
CREATE TRIGGER llm_param_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON llm_param
    FOR EACH STATEMENT EXECUTE FUNCTION llm_param_bump_version();

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
-- Tokenizer (bpe.c)
-- ===========================================================================

-- Ids below 10 million (as llm_model_config.vocab); a pair merges at one rank only.
ALTER TABLE llm_bpe_vocab ADD CONSTRAINT llm_bpe_vocab_token_id_max CHECK (token_id <= 9999999);
ALTER TABLE llm_bpe_merges ADD CONSTRAINT llm_bpe_merges_pair_key UNIQUE (model, "left", "right");

-- Version of each model's tokenizer. Backends cache tokenizers and compare this number once per
-- call. It comes from a sequence, so that no number is ever reused, not even by a rolled-back
-- load. Derived state, rebuilt by the triggers when a dump is restored: not dumped itself.
CREATE SEQUENCE llm_tokenizer_version_seq;
CREATE TABLE llm_tokenizer_version (
    model   text PRIMARY KEY,
    version bigint NOT NULL
);
COMMENT ON TABLE llm_tokenizer_version IS 'set from a sequence by any change to llm_bpe_vocab or llm_bpe_merges';

-- SECURITY DEFINER: whoever may write the tokenizer tables (a role loading a tokenizer) bumps
-- the version without needing rights on the version table or its sequence.
CREATE FUNCTION llm_bpe_bump_version() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = @extschema@, pg_temp AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE llm_tokenizer_version SET version = nextval('llm_tokenizer_version_seq');
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO llm_tokenizer_version AS v (model, version)
        SELECT m, nextval('llm_tokenizer_version_seq') FROM (SELECT DISTINCT model FROM new_rows) s(m)
        ON CONFLICT (model) DO UPDATE SET version = excluded.version;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO llm_tokenizer_version AS v (model, version)
        SELECT m, nextval('llm_tokenizer_version_seq')
        FROM (SELECT model FROM old_rows UNION SELECT model FROM new_rows) s(m)
        ON CONFLICT (model) DO UPDATE SET version = excluded.version;
    ELSE
        INSERT INTO llm_tokenizer_version AS v (model, version)
        SELECT m, nextval('llm_tokenizer_version_seq') FROM (SELECT DISTINCT model FROM old_rows) s(m)
        ON CONFLICT (model) DO UPDATE SET version = excluded.version;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER llm_bpe_vocab_version_ins AFTER INSERT ON llm_bpe_vocab
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_bpe_bump_version();
CREATE TRIGGER llm_bpe_vocab_version_upd AFTER UPDATE ON llm_bpe_vocab
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_bpe_bump_version();
CREATE TRIGGER llm_bpe_vocab_version_del AFTER DELETE ON llm_bpe_vocab
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_bpe_bump_version();
CREATE TRIGGER llm_bpe_vocab_version_trunc AFTER TRUNCATE ON llm_bpe_vocab
    FOR EACH STATEMENT EXECUTE FUNCTION llm_bpe_bump_version();
CREATE TRIGGER llm_bpe_merges_version_ins AFTER INSERT ON llm_bpe_merges
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_bpe_bump_version();
CREATE TRIGGER llm_bpe_merges_version_upd AFTER UPDATE ON llm_bpe_merges
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_bpe_bump_version();
CREATE TRIGGER llm_bpe_merges_version_del AFTER DELETE ON llm_bpe_merges
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION llm_bpe_bump_version();
CREATE TRIGGER llm_bpe_merges_version_trunc AFTER TRUNCATE ON llm_bpe_merges
    FOR EACH STATEMENT EXECUTE FUNCTION llm_bpe_bump_version();

-- Text -> token ids, exactly as Hugging Face's GPT-2 tokenizer (<|endoftext|> is a special token).
CREATE FUNCTION llm_encode(input text, model text DEFAULT 'gpt2-small') RETURNS int[]
AS 'MODULE_PATHNAME', 'llm_encode' LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- Token ids -> text: the tokens' bytes joined; what is not valid UTF-8 (and NUL) becomes U+FFFD.
CREATE FUNCTION llm_decode(tokens int[], model text DEFAULT 'gpt2-small') RETURNS text
AS 'MODULE_PATHNAME', 'llm_decode' LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- The raw bytes of one token (a token may hold part of a UTF-8 character).
CREATE FUNCTION llm_token_bytes(token_id int, model text DEFAULT 'gpt2-small') RETURNS bytea
AS 'MODULE_PATHNAME', 'llm_token_bytes' LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- A model's tokenizer: vocab_size is the highest id + 1; eot_id is <|endoftext|>'s id (-1: none).
CREATE FUNCTION llm_tokenizer_info(model text DEFAULT 'gpt2-small',
    OUT vocab_size int, OUT tokens int, OUT merges int, OUT eot_id int, OUT version bigint)
AS 'MODULE_PATHNAME', 'llm_tokenizer_info' LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- Load vocab.json / merges.txt from files the server can read (superuser or pg_read_server_files).
-- The vocabulary first: merges are checked against it. replace => true replaces what the model
-- had (replacing the vocabulary deletes the model's merges too). A malformed file is refused with
-- the line at fault, and nothing is loaded. pgllm tokenizer does the same from the client.
CREATE FUNCTION pg_llm_load_bpe_vocab(path text, model text, replace boolean DEFAULT false) RETURNS bigint
AS 'MODULE_PATHNAME', 'pg_llm_load_bpe_vocab' LANGUAGE C VOLATILE STRICT;
CREATE FUNCTION pg_llm_load_bpe_merges(path text, model text, replace boolean DEFAULT false) RETURNS bigint
AS 'MODULE_PATHNAME', 'pg_llm_load_bpe_merges' LANGUAGE C VOLATILE STRICT;

-- ===========================================================================
-- Checkpoint files, initialisation and snapshots (src/npz.c, src/checkpoint.c)
-- ===========================================================================

-- The training position is part of a snapshot, so that a load resumes exactly.
ALTER TABLE llm_checkpoint ADD COLUMN data_pos bigint NOT NULL DEFAULT 0;
CREATE INDEX llm_checkpoint_model ON llm_checkpoint (model, id);

-- A snapshot's tensors: parameters and, when the model had them, AdamW moments.
CREATE TABLE llm_checkpoint_tensor (
    checkpoint_id bigint NOT NULL REFERENCES llm_checkpoint (id) ON DELETE CASCADE,
    name          text NOT NULL,
    shape         int[] NOT NULL,
    data          bytea NOT NULL,
    m             bytea,
    v             bytea,
    PRIMARY KEY (checkpoint_id, name)
);
ALTER TABLE llm_checkpoint_tensor ALTER COLUMN data SET STORAGE EXTERNAL;
ALTER TABLE llm_checkpoint_tensor ALTER COLUMN m SET STORAGE EXTERNAL;
ALTER TABLE llm_checkpoint_tensor ALTER COLUMN v SET STORAGE EXTERNAL;
COMMENT ON TABLE llm_checkpoint_tensor IS 'tensors of the snapshots in llm_checkpoint (parameters, AdamW m and v)';
SELECT pg_catalog.pg_extension_config_dump('llm_checkpoint_tensor', '');

-- Import a checkpoint file (see src/npz.c for the format) into llm_param. The file registers
-- its architecture when it carries a configuration record and the model is absent. Atomic:
-- all tensors or none. Existing weights are replaced only with replace => true (which also
-- clears the model's optimizer state, training state and training log).
CREATE FUNCTION pg_llm_import_npz(path text, model text, replace boolean DEFAULT false) RETURNS int
AS 'MODULE_PATHNAME', 'pg_llm_import_npz' LANGUAGE C VOLATILE STRICT;
-- The same from the file's bytes, for clients whose files the server cannot read.
CREATE FUNCTION pg_llm_import_npz_bytes(data bytea, model text, replace boolean DEFAULT false) RETURNS int
AS 'MODULE_PATHNAME', 'pg_llm_import_npz_bytes' LANGUAGE C VOLATILE STRICT;
-- Files of any size over the connection: stage the bytes piece by piece into a temporary file
-- of the transaction, then import what was staged (pgllm import does this).
CREATE FUNCTION pg_llm_import_npz_stage(piece bytea) RETURNS bigint
AS 'MODULE_PATHNAME', 'pg_llm_import_npz_stage' LANGUAGE C VOLATILE STRICT;
CREATE FUNCTION pg_llm_import_npz_staged(model text, replace boolean DEFAULT false) RETURNS int
AS 'MODULE_PATHNAME', 'pg_llm_import_npz_staged' LANGUAGE C VOLATILE STRICT;

-- Write a model to a checkpoint file on the server (configuration record first); returns bytes.
CREATE FUNCTION pg_llm_export_npz(path text, model text) RETURNS bigint
AS 'MODULE_PATHNAME', 'pg_llm_export_npz' LANGUAGE C VOLATILE STRICT;

-- Server files: superusers and members of pg_read_server_files / pg_write_server_files only
-- (checked again inside the functions).
REVOKE EXECUTE ON FUNCTION pg_llm_import_npz(text, text, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_llm_export_npz(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_llm_import_npz(text, text, boolean) TO pg_read_server_files;
GRANT EXECUTE ON FUNCTION pg_llm_export_npz(text, text) TO pg_write_server_files;

-- Register a model (when absent) and initialise its weights as GPT-2 does, from a seed.
-- Architecture arguments left NULL are taken from the model's row. Returns the parameter count.
CREATE FUNCTION llm_init(model text, n_layer int DEFAULT NULL, n_head int DEFAULT NULL,
                         d_model int DEFAULT NULL, n_positions int DEFAULT NULL, vocab int DEFAULT NULL,
                         seed bigint DEFAULT 0, replace boolean DEFAULT false) RETURNS bigint
AS 'MODULE_PATHNAME', 'llm_init' LANGUAGE C VOLATILE;

-- Snapshots: save copies parameters, AdamW moments, step and data position; load restores them.
CREATE FUNCTION llm_checkpoint_save(model text, note text DEFAULT NULL) RETURNS bigint
AS 'MODULE_PATHNAME', 'llm_checkpoint_save' LANGUAGE C VOLATILE CALLED ON NULL INPUT;
CREATE FUNCTION llm_checkpoint_load(model text, id bigint) RETURNS int
AS 'MODULE_PATHNAME', 'llm_checkpoint_load' LANGUAGE C VOLATILE STRICT;

-- ===========================================================================
-- Inference (src/infer.c, src/sample.c, src/generate.c)
-- ===========================================================================
-- Nothing here writes, so every function runs on a hot standby. They are PARALLEL RESTRICTED:
-- each parallel worker would load its own copy of the weights for no gain.
-- Sampling settings are double precision so that clients sending float8 (psycopg's default for
-- Python floats) find the function, as do numeric literals and real values.

-- Next-token logits (vocab values) after the last of tokens.
CREATE FUNCTION llm_logits(tokens int[], model text DEFAULT 'gpt2-small') RETURNS real[]
AS 'MODULE_PATHNAME', 'llm_logits' LANGUAGE C STABLE STRICT PARALLEL RESTRICTED;

-- Generated token ids after the prompt's. temperature 0 = greedy; topk 0 and topp 1 turn those
-- filters off; a seed makes sampling reproducible; generation stops after eos_token (included).
CREATE FUNCTION llm_generate_tokens(tokens int[], max_tokens int DEFAULT 64,
                                    temperature double precision DEFAULT 1.0, topk int DEFAULT 50,
                                    topp double precision DEFAULT 0.95, model text DEFAULT 'gpt2-small',
                                    seed bigint DEFAULT NULL, eos_token int DEFAULT NULL)
RETURNS int[]
AS 'MODULE_PATHNAME', 'llm_generate_tokens' LANGUAGE C VOLATILE CALLED ON NULL INPUT PARALLEL RESTRICTED;

-- Beam search on token ids, as transformers' generate(num_beams => beam_width, do_sample => False):
-- beam_width hypotheses, best first; score = sum of log-probabilities / length ^ length_penalty.
CREATE FUNCTION llm_beam_search_tokens(tokens int[], beam_width int DEFAULT 4, max_tokens int DEFAULT 32,
                                       model text DEFAULT 'gpt2-small', eos_token int DEFAULT NULL,
                                       length_penalty double precision DEFAULT 1.0)
RETURNS TABLE (rank int, score double precision, token_ids int[])
AS 'MODULE_PATHNAME', 'llm_beam_search_tokens' LANGUAGE C VOLATILE CALLED ON NULL INPUT PARALLEL RESTRICTED ROWS 4;

-- Text generation with the model's tokenizer; generation stops at <|endoftext|>.
-- Returns the text generated after the prompt.
CREATE FUNCTION llm_generate(prompt text, max_tokens int DEFAULT 64,
                             temperature double precision DEFAULT 1.0, topk int DEFAULT 50,
                             topp double precision DEFAULT 0.95, model text DEFAULT 'gpt2-small',
                             seed bigint DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'llm_generate' LANGUAGE C VOLATILE CALLED ON NULL INPUT PARALLEL RESTRICTED;

-- One row per generated token, sent to the client as it is produced when called in the select
-- list: SELECT (e).* FROM (SELECT llm_generate_stream('Hello') AS e) s; (in FROM, PostgreSQL
-- collects all rows before sending the first). token is the new text (whole characters; a token
-- that ends inside a character gives '' and the next one carries it); text is all text so far.
CREATE FUNCTION llm_generate_stream(prompt text, max_tokens int DEFAULT 64,
                                    temperature double precision DEFAULT 1.0, topk int DEFAULT 50,
                                    topp double precision DEFAULT 0.95, model text DEFAULT 'gpt2-small',
                                    seed bigint DEFAULT NULL)
RETURNS TABLE (step int, token_id int, token text, text text, is_complete boolean)
AS 'MODULE_PATHNAME', 'llm_generate_stream' LANGUAGE C VOLATILE CALLED ON NULL INPUT PARALLEL RESTRICTED ROWS 64;

-- Beam search on text: beam_width rows, best first; token_ids are the generated ids (with the
-- <|endoftext|> that ended a hypothesis), text their text without it.
CREATE FUNCTION llm_beam_search(prompt text, beam_width int DEFAULT 4, max_tokens int DEFAULT 32,
                                model text DEFAULT 'gpt2-small', length_penalty double precision DEFAULT 1.0)
RETURNS TABLE (rank int, score double precision, token_ids int[], text text)
AS 'MODULE_PATHNAME', 'llm_beam_search' LANGUAGE C VOLATILE CALLED ON NULL INPUT PARALLEL RESTRICTED ROWS 4;

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
