-- pg_llm 0.1.0 -> 0.2.0.
--
-- pg_llm--0.1.0.sql is frozen (0.1.0 was released): every schema change since then is here.
-- A fresh CREATE EXTENSION pg_llm runs 0.1.0's script and then this one (PostgreSQL follows the
-- update path when no install script exists for the default version), so a new install and an
-- updated one are the same by construction. Keep each change in the section of its topic.
\echo Use "CREATE EXTENSION pg_llm" or "ALTER EXTENSION pg_llm UPDATE" to load this file. \quit
