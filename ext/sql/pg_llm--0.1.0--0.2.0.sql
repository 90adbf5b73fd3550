-- pg_llm 0.1.0 -> 0.2.0.
--
-- pg_llm--0.1.0.sql is frozen (0.1.0 was released): every schema change since then is here.
-- A fresh CREATE EXTENSION pg_llm runs 0.1.0's script and then this one (PostgreSQL follows the
-- update path when no install script exists for the default version), so a new install and an
-- updated one are the same by construction. Keep each change in the section of its topic.
\echo Use "CREATE EXTENSION pg_llm" or "ALTER EXTENSION pg_llm UPDATE" to load this file. \quit

-- ==== shared weights ====
-- The shared read-only copies of model weights (one file per database, model, weights_version
-- and format in the data directory's pgsql_tmp_pg_llm/): every backend that serves a model maps
-- the same copy. Rows of other databases only for roles with pg_read_all_stats' privileges.
CREATE FUNCTION pg_llm_weight_cache(
    OUT database text, OUT model text, OUT weights_version bigint, OUT format text, OUT bytes bigint,
    OUT built_at timestamptz, OUT last_used timestamptz, OUT backends int, OUT path text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'pg_llm_weight_cache' LANGUAGE C VOLATILE STRICT;
