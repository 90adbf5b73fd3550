-- pg_llm over several servers with PL/Proxy: one batch of prompts, or one table's rows, split over
-- the servers of a cluster, computed there at the same time, and returned in order. Not part of the
-- extension: run it in the database the calls arrive at (the proxy), after the steps below.
-- docs/scale-out.md explains it; tests/test_scaleout.py runs it against two servers.
--
-- The servers (the nodes) each have pg_llm and the same models: hot standbys of one primary, or
-- servers that a training server feeds by logical replication. They need nothing else. The proxy
-- (any database, a node's or another server's) needs PL/Proxy (Debian: postgresql-15-plproxy) and
-- the nodes, as a cluster named pg_llm_nodes with a power of two of partitions (PL/Proxy's rule;
-- list a node twice to make up the number, or set the server option modular_mapping), each
-- connection checking every second that the proxy is still there (client_connection_check_interval,
-- see "errors" below):
--
--   CREATE EXTENSION plproxy;
--   CREATE SERVER pg_llm_nodes FOREIGN DATA WRAPPER plproxy OPTIONS (
--       p0 'host=node1 dbname=app options=''-c client_connection_check_interval=1s''',
--       p1 'host=node2 dbname=app options=''-c client_connection_check_interval=1s''');
--   CREATE USER MAPPING FOR PUBLIC SERVER pg_llm_nodes;   -- or per role, with user and password
--   GRANT USAGE ON FOREIGN SERVER pg_llm_nodes TO PUBLIC;  -- or to the roles that may call the nodes
--   \i pg_llm_plproxy.sql
--
-- Each call runs on the nodes as the connecting role of the user mapping (the caller's own name
-- when the mapping gives none), with that role's rights there: the functions below are executable
-- by PUBLIC and grant nothing on the nodes. The node queries name pg_llm's functions unqualified:
-- the nodes' search_path must find them (the default does when pg_llm is in public).
--
-- Rows come back in the order of the arrays given. Each node's part is one statement. Errors: a
-- cancel of the call (or its statement_timeout) is sent to every node by PL/Proxy. An error on a
-- node fails the call at once with that node's error (its SQLSTATE kept); PL/Proxy leaves the other
-- nodes' parts running until its next call drops their connections, so the functions below make
-- that call at once (llm_nodes_release), and a node stops its part within
-- client_connection_check_interval of its proxy's connection going. The nodes compute on their own
-- cores; the proxy only sends and gathers.

-- One trivial statement on every node: PL/Proxy first drops any connection still busy with a part
-- of a call that failed elsewhere.
CREATE FUNCTION llm_nodes_release() RETURNS SETOF int
LANGUAGE plproxy AS $$
    CLUSTER 'pg_llm_nodes';
    RUN ON ALL;
    SELECT 1 AS llm_nodes_release;
$$;

-- The same, for an error handler: a node that cannot be reached has no part left running, and a
-- failure here must not hide the error being handled.
CREATE FUNCTION llm_nodes_release_quietly() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM llm_nodes_release();
EXCEPTION WHEN OTHERS THEN
    NULL;
END $$;

-- llm_generate_batch over the nodes: prompt i goes to partition i mod N, and row i equals
-- llm_generate_batch(prompts, ...) row i on one server (each prompt samples its own stream, seeded
-- with seed as a single call is, whatever the other prompts and wherever it runs).
CREATE FUNCTION llm_generate_batch_part(ords int[], prompts text[], max_tokens int, temperature double precision,
                                        topk int, topp double precision, model text, seed bigint)
RETURNS TABLE (ord int, text text)
LANGUAGE plproxy AS $$
    CLUSTER 'pg_llm_nodes';
    SPLIT ords, prompts;
    RUN ON ords;
    SELECT (ords)[g.ord] AS ord, g.text
      FROM llm_generate_batch(prompts, max_tokens, temperature, topk, topp, model, seed) AS g;
$$;

CREATE FUNCTION llm_generate_batch_spread(prompts text[], max_tokens int DEFAULT 64,
                                          temperature double precision DEFAULT 1.0, topk int DEFAULT 50,
                                          topp double precision DEFAULT 0.95, model text DEFAULT 'gpt2-small',
                                          seed bigint DEFAULT NULL)
RETURNS TABLE (ord int, text text)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF pg_catalog.cardinality(prompts) > 0 THEN
        RETURN QUERY
            SELECT p.ord, p.text
              FROM llm_generate_batch_part(
                       (SELECT pg_catalog.array_agg(i)
                          FROM pg_catalog.generate_series(1, pg_catalog.cardinality(prompts)) AS i),
                       prompts, max_tokens, temperature, topk, topp, model, seed) AS p
             ORDER BY p.ord;
    END IF;
EXCEPTION WHEN OTHERS THEN  -- never a cancel (OTHERS leaves it out): PL/Proxy cancelled the nodes then
    PERFORM llm_nodes_release_quietly();
    RAISE;
END $$;

-- llm_embed over the nodes, for rows keyed by id: row (ids[i], inputs[i]) goes to partition
-- ids[i] mod N, so that a row always goes to the same node; rows come back in the arrays' order.
--   SELECT e.id, e.embedding
--     FROM (SELECT array_agg(id ORDER BY id) AS ids, array_agg(body ORDER BY id) AS bodies FROM docs) AS a,
--          llm_embed_spread(a.ids, a.bodies, 'my-model') AS e;
CREATE FUNCTION llm_embed_part(ords int[], ids bigint[], inputs text[], model text)
RETURNS TABLE (ord int, embedding real[])
LANGUAGE plproxy AS $$
    CLUSTER 'pg_llm_nodes';
    SPLIT ords, ids, inputs;
    RUN ON ids;
    SELECT u.ord, llm_embed(u.input, model) AS embedding FROM unnest(ords, inputs) AS u(ord, input);
$$;

CREATE FUNCTION llm_embed_spread(ids bigint[], inputs text[], model text DEFAULT 'gpt2-small')
RETURNS TABLE (id bigint, embedding real[])
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF pg_catalog.cardinality(ids) > 0 THEN
        RETURN QUERY
            SELECT ids[p.ord], p.embedding
              FROM llm_embed_part(
                       (SELECT pg_catalog.array_agg(i)
                          FROM pg_catalog.generate_series(1, pg_catalog.cardinality(ids)) AS i),
                       ids, inputs, model) AS p
             ORDER BY p.ord;
    END IF;
EXCEPTION WHEN OTHERS THEN
    PERFORM llm_nodes_release_quietly();
    RAISE;
END $$;

-- One call on any node, for serving one request at a time over the nodes (as pgpool-II's load
-- balancing does, without pgpool): llm_generate's arguments and result.
CREATE FUNCTION llm_generate_any(prompt text, max_tokens int DEFAULT 64, temperature double precision DEFAULT 1.0,
                                 topk int DEFAULT 50, topp double precision DEFAULT 0.95,
                                 model text DEFAULT 'gpt2-small', seed bigint DEFAULT NULL)
RETURNS text
LANGUAGE plproxy AS $$
    CLUSTER 'pg_llm_nodes';
    RUN ON ANY;
    SELECT llm_generate(prompt, max_tokens, temperature, topk, topp, model, seed);
$$;
