-- Checkpoint files, initialisation and snapshots (src/npz.c, src/checkpoint.c).
-- Leaves the database as it found it: schema.sql expects a fresh install.
CREATE EXTENSION pg_llm;
\set VERBOSITY terse

-- llm_init registers the model and writes every tensor, as GPT-2 initialises them
SELECT llm_init('tiny', 2, 2, 8, 16, 10, seed => 7);
SELECT model, n_layer, n_head, d_model, n_positions, vocab FROM llm_model_config WHERE model = 'tiny';
SELECT count(*), sum(octet_length(data)) FROM llm_param WHERE model = 'tiny';
SELECT name, shape FROM llm_param WHERE model = 'tiny' AND name LIKE 'h.1.%' ORDER BY name;
-- LayerNorm weights are ones (0x3f800000), biases zeros
SELECT count(*) FROM llm_param WHERE model = 'tiny' AND name LIKE '%ln_%.weight' AND data = decode(repeat('0000803f', 8), 'hex');
SELECT count(*) FROM llm_param WHERE model = 'tiny' AND name LIKE '%.bias' AND data = decode(repeat('00', octet_length(data)), 'hex');

-- the same seed gives the same weights; another seed other random tensors
CREATE TEMP TABLE first_init AS SELECT name, data FROM llm_param WHERE model = 'tiny';
SELECT llm_init('tiny', seed => 7);
SELECT llm_init('tiny', seed => 7, replace => true);
SELECT count(*) FROM llm_param p JOIN first_init f USING (name) WHERE p.model = 'tiny' AND p.data = f.data;
SELECT llm_init('tiny', seed => 8, replace => true);
SELECT count(*) FROM llm_param p JOIN first_init f USING (name) WHERE p.model = 'tiny' AND p.data = f.data;
SELECT llm_init('other', 2, 3, 8, 16, 10);
SELECT llm_init('other', n_layer => 2);

-- a server file round trip (relative paths are in the data directory): identical tensors,
-- and the file registers its own architecture
SELECT pg_llm_export_npz('pg_llm_regress.npz', 'tiny') > 0 AS written;
SELECT pg_llm_import_npz('pg_llm_regress.npz', 'tiny copy');
SELECT n_layer, n_head, d_model, n_positions, vocab FROM llm_model_config WHERE model = 'tiny copy';
SELECT count(*) FROM llm_param a JOIN llm_param b USING (name)
WHERE a.model = 'tiny' AND b.model = 'tiny copy' AND a.data = b.data AND a.shape = b.shape;
SELECT pg_llm_import_npz('pg_llm_regress.npz', 'tiny copy');
SELECT pg_llm_import_npz('pg_llm_regress.npz', 'tiny copy', replace => true);
-- weights of another architecture: refused for a model that has weights (unless replace), and
-- they replace a bare registration, which loses nothing
SELECT pg_llm_import_npz('pg_llm_regress.npz', 'tiny copy 2');
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) VALUES ('wide', 2, 2, 16, 16, 10);
SELECT llm_init('wide', seed => 1) > 0 AS initialised;
SELECT pg_llm_import_npz('pg_llm_regress.npz', 'wide');
SELECT n_layer, d_model FROM llm_model_config WHERE model = 'wide';
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) VALUES ('bare', 2, 2, 16, 16, 10);
SELECT pg_llm_import_npz('pg_llm_regress.npz', 'bare');
SELECT (SELECT n_layer FROM llm_model_config WHERE model = 'bare') = (SELECT n_layer FROM llm_model_config WHERE model = 'tiny') AS reshaped;
SELECT llm_model_drop('bare');
SELECT llm_model_drop('tiny copy 2');

-- bad input is refused with the cause, and nothing is written
SELECT pg_llm_import_npz('no such file.npz', 'x');
SELECT pg_llm_import_npz('.', 'x');
SELECT pg_llm_import_npz_bytes('\x'::bytea, 'x');
SELECT pg_llm_import_npz_bytes('\x00010203'::bytea, 'x');
SELECT pg_llm_import_npz_bytes('\x1f8b08000000000000ff'::bytea, 'x');
SELECT pg_llm_import_npz_bytes('\x1f8b'::bytea, E'bad\nname');
SELECT pg_llm_export_npz('pg_llm_regress.npz', 'nobody');
SELECT count(*) FROM llm_model_config WHERE model IN ('x', 'nobody');

-- staging: the bytes of a file in pieces, then one import (what pgllm import sends)
SELECT pg_llm_import_npz_staged('x');
BEGIN;
SELECT pg_llm_import_npz_stage(substr(pg_read_binary_file('pg_llm_regress.npz'), 1, 100));
SELECT pg_llm_import_npz_stage(substr(pg_read_binary_file('pg_llm_regress.npz'), 101)) = octet_length(pg_read_binary_file('pg_llm_regress.npz'));
SELECT pg_llm_import_npz_staged('staged');
COMMIT;
SELECT count(*) FROM llm_param a JOIN llm_param b USING (name) WHERE a.model = 'tiny' AND b.model = 'staged' AND a.data = b.data;

-- snapshots restore parameters, optimizer state and training position exactly
INSERT INTO llm_optim_state (model, name, m, v) SELECT p.model, p.name, f.data, p.data FROM llm_param p JOIN first_init f USING (name) WHERE p.model = 'tiny';
INSERT INTO llm_train_state (model, step, data_pos) VALUES ('tiny', 5, 640);
INSERT INTO llm_train_log (model, step, lr, loss) SELECT 'tiny', s, 0.001, 1.0 FROM generate_series(1, 8) s;
SELECT llm_checkpoint_save('tiny', 'step 5') AS snapshot \gset
SELECT model, step, data_pos, note FROM llm_checkpoint WHERE id = :snapshot;
SELECT count(*), count(m), count(v) FROM llm_checkpoint_tensor WHERE checkpoint_id = :snapshot;
CREATE TEMP TABLE saved AS SELECT p.name, p.data, o.m, o.v FROM llm_param p JOIN llm_optim_state o USING (model, name) WHERE model = 'tiny';
SELECT weights_version AS version_before FROM llm_model_config WHERE model = 'tiny' \gset
UPDATE llm_param SET data = data || '\x00'::bytea WHERE model = 'tiny';
UPDATE llm_optim_state SET m = v WHERE model = 'tiny';
UPDATE llm_train_state SET step = 8, data_pos = 1024 WHERE model = 'tiny';
SELECT llm_checkpoint_load('tiny', :snapshot);
SELECT count(*) FROM llm_param p JOIN llm_optim_state o USING (model, name) JOIN saved s USING (name)
WHERE model = 'tiny' AND p.data = s.data AND o.m = s.m AND o.v = s.v;
SELECT step, data_pos FROM llm_train_state WHERE model = 'tiny';
SELECT max(step) FROM llm_train_log WHERE model = 'tiny';
SELECT weights_version > :version_before AS caches_refresh FROM llm_model_config WHERE model = 'tiny';
-- a snapshot without optimizer state restores none
DELETE FROM llm_optim_state WHERE model = 'tiny copy';
SELECT llm_checkpoint_save('tiny copy', NULL) AS bare \gset
INSERT INTO llm_optim_state (model, name, m, v) SELECT model, name, data, data FROM llm_param WHERE model = 'tiny copy';
SELECT llm_checkpoint_load('tiny copy', :bare);
SELECT count(*) FROM llm_optim_state WHERE model = 'tiny copy';
-- refusals
SELECT llm_checkpoint_load('tiny copy', :snapshot);
SELECT llm_checkpoint_load('tiny', 999999);
INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) VALUES ('empty', 2, 2, 16, 16, 10);
SELECT llm_checkpoint_save('empty', NULL);
SELECT llm_checkpoint_save('nobody', NULL);
UPDATE llm_optim_state SET v = v || v WHERE model = 'tiny' AND name = 'wpe';
SELECT llm_checkpoint_save('tiny', NULL);
-- deleting a snapshot deletes its tensors; deleting a model its snapshots
DELETE FROM llm_checkpoint WHERE id = :bare;
SELECT count(*) FROM llm_checkpoint_tensor WHERE checkpoint_id = :bare;
DELETE FROM llm_model_config WHERE model = 'tiny';
SELECT count(*) FROM llm_checkpoint_tensor;

-- server files are for superusers and the pg_read/write_server_files roles only
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public,
       has_function_privilege('pg_read_server_files', p.oid, 'EXECUTE') AS readers,
       has_function_privilege('pg_write_server_files', p.oid, 'EXECUTE') AS writers
FROM pg_proc p WHERE p.proname IN ('pg_llm_import_npz', 'pg_llm_export_npz', 'pg_llm_import_npz_bytes') ORDER BY 1;
CREATE ROLE regress_pg_llm_user;
GRANT EXECUTE ON FUNCTION pg_llm_import_npz(text, text, boolean) TO regress_pg_llm_user;
SET ROLE regress_pg_llm_user;
SELECT pg_llm_import_npz('pg_llm_regress.npz', 'x');
SELECT pg_llm_export_npz('pg_llm_regress.npz', 'x');
RESET ROLE;
REVOKE ALL ON FUNCTION pg_llm_import_npz(text, text, boolean) FROM regress_pg_llm_user;
DROP ROLE regress_pg_llm_user;

-- snapshot tensors are stored uncompressed and dumped by pg_dump
SELECT attname, attstorage FROM pg_attribute
WHERE attrelid = 'llm_checkpoint_tensor'::regclass AND atttypid = 'bytea'::regtype ORDER BY attnum;
SELECT 'llm_checkpoint_tensor'::regclass::oid = ANY (extconfig) AS dumped FROM pg_extension WHERE extname = 'pg_llm';

DROP EXTENSION pg_llm;
