-- The schema of pg_llm: tables, the registered gpt2-small, storage, dump registration, versioning.
CREATE EXTENSION pg_llm;

SELECT model, n_layer, n_head, d_model, n_positions, vocab FROM llm_model_config ORDER BY model;

-- parameter and optimizer data are stored out of line without compression ('e' = EXTERNAL)
SELECT attrelid::regclass, attname, attstorage FROM pg_attribute
WHERE attrelid IN ('llm_param'::regclass, 'llm_optim_state'::regclass) AND atttypid = 'bytea'::regtype
ORDER BY 1, 2;

-- user-data tables are dumped by pg_dump
SELECT c.relname FROM pg_extension e, unnest(e.extconfig) AS cfg(oid) JOIN pg_class c ON c.oid = cfg.oid
WHERE e.extname = 'pg_llm' ORDER BY 1;

-- invalid architectures are refused
\set VERBOSITY terse
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) VALUES ('bad', 2, 3, 8, 16, 10);
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) VALUES ('bad', 0, 1, 8, 16, 10);

\set VERBOSITY default
-- any change to a model's parameters bumps its weights_version
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) VALUES ('tiny', 1, 1, 4, 8, 10);
SELECT weights_version FROM llm_model_config WHERE model = 'tiny';
INSERT INTO llm_param VALUES ('tiny', 'wte', '{10,4}', '\x00'), ('tiny', 'wpe', '{8,4}', '\x00');
SELECT weights_version FROM llm_model_config WHERE model = 'tiny';
UPDATE llm_param SET data = '\x01' WHERE model = 'tiny' AND name = 'wte';
SELECT weights_version FROM llm_model_config WHERE model = 'tiny';
DELETE FROM llm_param WHERE model = 'tiny';
SELECT weights_version FROM llm_model_config WHERE model = 'tiny';
SELECT weights_version FROM llm_model_config WHERE model = 'gpt2-small';

-- deleting a model removes its parameters
INSERT INTO llm_param VALUES ('tiny', 'wte', '{10,4}', '\x00');
DELETE FROM llm_model_config WHERE model = 'tiny';
SELECT count(*) FROM llm_param WHERE model = 'tiny';

-- the library and the schema carry one version number
SELECT pg_llm_version() = extversion AS library_matches_schema FROM pg_extension WHERE extname = 'pg_llm';
SELECT pg_llm_blas_info() LIKE 'lib%blas%threads' AS blas_loaded;
SET pg_llm.threads = 1;
SELECT pg_llm_blas_info() LIKE '%, 1 threads' AS one_thread;
SET pg_llm.threads = -1;
