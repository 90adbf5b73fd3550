-- pg_llm 0.2.0 -> 0.3.0.
--
-- pg_llm--0.1.0.sql and pg_llm--0.1.0--0.2.0.sql are frozen (both were released): every schema
-- change since 0.2.0 is here. A fresh CREATE EXTENSION pg_llm runs 0.1.0's script and then the
-- upgrades in order, so a new install and an updated one are the same by construction. Keep each
-- change in the section of its topic.
\echo Use "CREATE EXTENSION pg_llm" or "ALTER EXTENSION pg_llm UPDATE" to load this file. \quit

-- ==== security: privileges, trigger functions ====

-- ==== models, datasets and tokenizers: lifecycle ====

-- ==== precision ====

-- ==== scale-out: volatility and parallel safety ====

-- ==== embeddings: batched, pgvector ====

-- llm_embed_batch: llm_embed of many texts in shared forward passes (each weight matrix read once
-- for up to 2048 tokens of texts), one row per element in array order; embedding is NULL for a
-- NULL text or one without tokens. For a table: see docs/guide.md ("Semantic search with pgvector").
-- Privileges: PUBLIC, as llm_embed: it reads the model's tables with the caller's rights.
CREATE FUNCTION llm_embed_batch(inputs text[], model text DEFAULT 'gpt2-small')
RETURNS TABLE (ord integer, embedding real[])
AS 'MODULE_PATHNAME', 'llm_embed_batch' LANGUAGE C VOLATILE PARALLEL UNSAFE;
