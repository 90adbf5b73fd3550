-- pg_llm 0.4.0 -> 0.5.0.
--
-- pg_llm--0.1.0.sql and the upgrade scripts up to 0.4.0 are frozen (each was released): every
-- schema change since 0.4.0 is here. A fresh CREATE EXTENSION pg_llm runs 0.1.0's script and then
-- the upgrades in order, so a new install and an updated one are the same by construction. Keep
-- each change in the section of its topic.
\echo Use "CREATE EXTENSION pg_llm" or "ALTER EXTENSION pg_llm UPDATE" to load this file. \quit

-- ==== adapters: runs of pgllm train ====
-- pgllm train --adapter spreads one learning-rate schedule over many transactions, as it does for
-- a model: the schedule of its last run (start, total_steps, warmup, lr_max, lr_min) is kept with
-- the adapter, for --schedule continue, and one run at a time holds the adapter's training lock.
ALTER TABLE llm_adapter ADD COLUMN schedule jsonb;
COMMENT ON COLUMN llm_adapter.schedule IS 'the learning-rate schedule of the adapter''s last pgllm train run';

-- llm_adapter_train_lock(adapter): hold the adapter's training lock (the one llm_train(...,
-- adapter => ...) takes for its transaction) until the session ends, or fail at once. Held for a
-- whole session, like llm_train_lock: training roles only.
CREATE FUNCTION llm_adapter_train_lock(adapter text) RETURNS void
AS 'MODULE_PATHNAME', 'llm_adapter_train_lock' LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION llm_adapter_train_lock IS 'hold an adapter''s training lock for the session (pgllm train --adapter)';
REVOKE EXECUTE ON FUNCTION llm_adapter_train_lock(text) FROM PUBLIC;
DO $$
DECLARE
    r regrole;
BEGIN
    FOR r IN SELECT DISTINCT g.grantee::regrole
               FROM pg_catalog.pg_proc p,
                    LATERAL pg_catalog.aclexplode(p.proacl) g
              WHERE p.oid = '@extschema@.llm_train_lock(text)'::regprocedure AND g.grantee <> 0
                AND g.grantee <> p.proowner
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION @extschema@.llm_adapter_train_lock(text) TO %s', r);
    END LOOP;
END $$;

-- llm_grant / llm_revoke: as in 0.4.0, and the adapter's training lock goes with training rights.
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
        EXECUTE format('GRANT EXECUTE ON FUNCTION @extschema@.llm_adapter_train_lock(text) TO %s', role);
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
    EXECUTE format('REVOKE EXECUTE ON FUNCTION @extschema@.llm_adapter_train_lock(text) FROM %s', role);
    IF (SELECT extnamespace FROM pg_extension WHERE extname = 'pg_llm') <> 'public'::regnamespace THEN
        EXECUTE format('REVOKE USAGE ON SCHEMA @extschema@ FROM %s', role);
    END IF;
END $$;
