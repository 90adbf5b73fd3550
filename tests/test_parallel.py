"""Parallel query within one server: pg_llm's functions are labelled as they behave, and what the
planner may run in a parallel worker runs there and returns exactly what the serial plan returns.

Plans are forced the usual ways (no setup or tuple cost, a table's parallel_workers, and
force_parallel_mode / debug_parallel_query for queries without a table); the leader does not take
part, so every row is computed by a worker. The model is small: what is tested is where it runs.
"""

from __future__ import annotations

import json
import re
import uuid

import psycopg
import pytest

from .conftest import REPO
from .weights import write_gpt2_tokenizer

MODEL = "parallel"
ROWS = 24


def forced(conn: psycopg.Connection, workers: int = 2) -> None:
    """Parallel plans whenever they are possible, computed by the workers alone."""
    conn.execute(f"SET max_parallel_workers_per_gather = {workers}")
    for setting in ("parallel_setup_cost = 0", "parallel_tuple_cost = 0", "min_parallel_table_scan_size = 0",
                    "parallel_leader_participation = off"):
        conn.execute(f"SET {setting}")


def single_worker(conn: psycopg.Connection) -> None:
    """Every parallel-safe query in one worker, the leader only gathering (Gather, Single Copy)."""
    version = int(conn.execute("SHOW server_version_num").fetchone()[0])
    forced(conn, 1)
    conn.execute("SET debug_parallel_query = on" if version >= 160000 else "SET force_parallel_mode = on")


def serial(conn: psycopg.Connection) -> None:
    conn.execute("RESET ALL")
    conn.execute("SET max_parallel_workers_per_gather = 0")


def plan(conn: psycopg.Connection, query: str, params=()) -> dict:
    [(doc,)] = conn.execute("EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) " + query, params).fetchall()
    return (json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]


def nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


@pytest.fixture(scope="module")
def pdb(cluster):
    """A database of its own with a small model, its tokenizer and a table of texts that spans
    several pages (a parallel scan hands out pages, so a one-page table would go to one worker)."""
    name = f"t_par_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = cluster.dsn(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_llm")
        conn.execute("SELECT llm_init(%s, 2, 4, 64, 128, 50257, seed => 3)", (MODEL,))
        write_gpt2_tokenizer(conn, MODEL)
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL, pad text) WITH (parallel_workers = 2)")
        conn.execute("ALTER TABLE docs ALTER COLUMN pad SET STORAGE PLAIN")
        conn.execute("INSERT INTO docs SELECT g, format('Document %%s: the %%s brown fox jumps over %%s lazy dogs.', g, "
                     "(ARRAY['quick','slow','red'])[g %% 3 + 1], g * 7), repeat('.', 2000) FROM generate_series(1, %s) g",
                     (ROWS,))
        conn.execute("ANALYZE docs")
        conn.execute("INSERT INTO llm_dataset (dataset, tokens, target) VALUES ('probe', '{1,2,3,4}', '{2,3,4,5}')")
    yield url
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---- the labels ---------------------------------------------------------------------------------

LABELS = {"immutable": "i", "stable": "s", "volatile": "v", "safe": "s", "restricted": "r", "unsafe": "u"}


def documented_labels() -> dict[str, tuple[str, str]]:
    """docs/scale-out.md's table: function -> (provolatile, proparallel)."""
    page = (REPO / "docs" / "scale-out.md").read_text()
    section = page.split("### Volatility and parallel safety of every function", 1)[1].split("\n#", 1)[0]
    labels = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1] in LABELS:
            for name in re.findall(r"`(\w+)`", cells[0]):
                labels[name] = (LABELS[cells[1]], LABELS[cells[2]])
    return labels


def test_every_function_is_labelled_as_documented(pdb):
    documented = documented_labels()
    with psycopg.connect(pdb) as conn:
        rows = conn.execute(
            "SELECT p.proname, p.provolatile, p.proparallel FROM pg_proc p "
            "JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e' "
            "JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'").fetchall()
    actual = {}
    for name, volatility, parallel in rows:
        actual.setdefault(name, set()).add((volatility, parallel))
    missing = sorted(set(actual) - set(documented))
    assert not missing, f"functions without a row in docs/scale-out.md's table of labels: {missing}"
    assert not sorted(set(documented) - set(actual)), "rows for functions that do not exist"
    wrong = {name: (sorted(got), documented[name]) for name, got in actual.items() if got != {documented[name]}}
    assert not wrong, f"labels in the catalog differ from the documented ones: {wrong}"


# ---- rows computed in workers -------------------------------------------------------------------

# Every per-row function of a table, greedy and seeded sampling.
ROW_QUERY = f"""
SELECT id, llm_embed(body, '{MODEL}') AS embedding, llm_perplexity(body, '{MODEL}') AS perplexity,
       llm_logits(llm_encode(body, '{MODEL}'), '{MODEL}') AS logits,
       llm_generate(body, 6, 0, model => '{MODEL}') AS greedy,
       llm_generate(body, 6, 0.9, 40, 0.9, '{MODEL}', id) AS seeded,
       llm_generate_tokens(llm_encode(body, '{MODEL}'), 4, 0.8, model => '{MODEL}', seed => 7) AS tokens,
       llm_decode(llm_encode(body, '{MODEL}'), '{MODEL}') AS roundtrip
  FROM docs"""
# Beam search as a set per row, in the select list (a correlated subquery would keep the rows in the
# leader; so would LATERAL, whose repeated calls the planner costs as one).
BEAM_QUERY = f"SELECT id, (b).rank, (b).score, (b).token_ids " \
             f"FROM (SELECT id, llm_beam_search(body, 2, 3, '{MODEL}') b FROM docs) s"


def test_a_table_scored_by_parallel_workers_equals_the_serial_plan(pdb):
    with psycopg.connect(pdb, autocommit=True) as conn:
        serial(conn)
        expected = sorted(conn.execute(ROW_QUERY).fetchall())
        forced(conn)
        root = plan(conn, ROW_QUERY)
        got = sorted(conn.execute(ROW_QUERY).fetchall())
    assert len(expected) == ROWS and all(r[3] and len(r[3]) == 50257 for r in expected)
    gather = next(n for n in nodes(root) if n["Node Type"] == "Gather")
    assert gather["Workers Launched"] >= 1, "no parallel worker started"
    scan = next(n for n in nodes(gather) if n["Node Type"] == "Seq Scan" and n.get("Parallel Aware"))
    computed_below = " ".join(scan["Output"])
    for fn in ("llm_embed", "llm_perplexity", "llm_logits", "llm_generate", "llm_generate_tokens", "llm_decode"):
        assert f"{fn}(" in computed_below, f"{fn} is not computed in the workers"
    assert got == expected

    with psycopg.connect(pdb, autocommit=True) as conn:
        serial(conn)
        expected = sorted(conn.execute(BEAM_QUERY).fetchall())
        forced(conn)
        root = plan(conn, BEAM_QUERY)
        got = sorted(conn.execute(BEAM_QUERY).fetchall())
    gather = next(n for n in nodes(root) if n["Node Type"] == "Gather")
    assert gather["Workers Launched"] >= 1
    assert any(n["Node Type"] == "ProjectSet" for n in nodes(gather))
    assert len(expected) == 2 * ROWS and got == expected


def test_every_serving_function_runs_in_a_worker(pdb):
    """A whole query in one worker (Gather, Single Copy) gives what the leader alone gives."""
    queries = [
        f"SELECT loss, perplexity, rows, tokens FROM llm_eval('{MODEL}', 'probe')",
        f"SELECT array_agg(text ORDER BY ord) FROM llm_generate_batch('{{Hello,Batch,a}}', 5, 0.9, 40, 0.9, '{MODEL}', 7)",
        f"SELECT array_agg(score ORDER BY rank) FROM llm_beam_search('Beam me', 3, 4, '{MODEL}')",
        f"SELECT vocab_size, tokens, merges, eot_id FROM llm_tokenizer_info('{MODEL}')",
        f"SELECT string_agg(coalesce(embedding::text, '-'), ';' ORDER BY ord) FROM llm_embed_batch('{{Hello,NULL,Embed me}}', '{MODEL}')",
        f"SELECT llm_tokenizer_fingerprint('{MODEL}')",
        f"SELECT llm_token_bytes(50256, '{MODEL}')",
        f"SELECT count(*) FROM pg_llm_weight_cache() WHERE model = '{MODEL}'",
        f"SELECT count(*) FROM pg_llm_batch_runners() WHERE model = '{MODEL}'",
        "SELECT pg_llm_version()",
        "SELECT count(*) FROM pg_llm_limits()",
    ]
    with psycopg.connect(pdb, autocommit=True) as conn:
        serial(conn)
        expected = [conn.execute(q).fetchall() for q in queries]
        single_worker(conn)
        for q, want in zip(queries, expected):
            root = plan(conn, q)
            assert root["Node Type"] == "Gather" and root.get("Single Copy") and root["Workers Launched"] == 1, q
            assert conn.execute(q).fetchall() == want, q
        # unseeded sampling runs in a worker too (random there as in the leader)
        assert conn.execute(f"SELECT llm_generate('Anything', 4, model => '{MODEL}')").fetchone()[0] is not None
        # a stream is computed by the leader, above the Gather: its rows reach the client as they come
        root = plan(conn, f"SELECT (llm_generate_stream('Stream', 3, 0, model => '{MODEL}')).token")
        assert not any(n["Node Type"] == "Gather" for n in nodes(root))


def test_workers_map_the_servers_shared_copies(pdb):
    """Each worker maps the shared copies (no worker reads the weights from the tables), and there
    is one copy per format on the server, not one per worker."""
    with psycopg.connect(pdb, autocommit=True) as conn:
        serial(conn)
        conn.execute(ROW_QUERY).fetchall()  # the copies exist: the workers have something to map
        forced(conn)
        conn.execute("SET client_min_messages = debug1")  # the workers' DEBUG1 lines reach the client
        loads = []
        conn.add_notice_handler(lambda diag: loads.append(diag.message_primary or ""))
        conn.execute(ROW_QUERY).fetchall()
        conn.execute("RESET client_min_messages")
        copies = conn.execute("SELECT format, count(*) FROM pg_llm_weight_cache() WHERE model = %s "
                              "GROUP BY format ORDER BY format", (MODEL,)).fetchall()
    loads = [m for m in loads if m.startswith(f'pg_llm: model "{MODEL}"')]
    assert any("(weights_version" in m and ", block)" in m for m in loads), loads
    assert any(", float32)" in m for m in loads), loads
    assert all("from the shared copy" in m for m in loads), loads
    assert copies == [("block", 1), ("float32", 1)]


def test_workers_leave_the_thread_budget_when_their_part_ends(pdb):
    """A parallel worker takes its share of the server's threads like any session, and gives it
    back when its part of the query ends: the leader's next statement has every thread again
    (before, it counted the finished workers for two seconds and got a third of them)."""
    with psycopg.connect(pdb, autocommit=True) as conn:
        serial(conn)
        conn.execute("SET pg_llm.server_threads = 4")
        conn.execute("SET pg_llm.threads = 4")
        assert conn.execute("SELECT pg_llm_blas_info()").fetchone()[0].endswith(", 4 threads")
        forced(conn)
        root = plan(conn, ROW_QUERY)
        assert next(n for n in nodes(root) if n["Node Type"] == "Gather")["Workers Launched"] == 2
        assert conn.execute("SELECT pg_llm_blas_info()").fetchone()[0].endswith(", 4 threads")


def test_the_same_numbers_on_any_number_of_threads(pdb):
    """What a worker computes with its share of the threads equals what a session computes with all
    of them: measuring's products are cut the same way whatever the thread count."""
    query = f"SELECT array_agg(llm_perplexity(body, '{MODEL}') ORDER BY id), " \
            f"array_agg(llm_embed(body, '{MODEL}') ORDER BY id), " \
            f"(SELECT loss FROM llm_eval('{MODEL}', 'probe')) FROM docs WHERE id <= 4"
    with psycopg.connect(pdb, autocommit=True) as conn:
        serial(conn)
        conn.execute("SET pg_llm.server_threads = 4")
        results = []
        for threads in (1, 2, 3, 4):
            conn.execute(f"SET pg_llm.threads = {threads}")
            results.append(conn.execute(query).fetchone())
    assert all(r == results[0] for r in results[1:])


def test_a_stable_embedding_is_an_index_condition(pdb):
    """llm_embed is STABLE: compared with an indexed column it is computed once, as the index scan's
    key, instead of once per row."""
    with psycopg.connect(pdb, autocommit=True) as conn:
        serial(conn)
        conn.execute("CREATE TABLE IF NOT EXISTS vectors (id int, embedding real[])")
        conn.execute("CREATE INDEX IF NOT EXISTS vectors_embedding ON vectors (embedding)")
        conn.execute(f"INSERT INTO vectors SELECT id, llm_embed(body, '{MODEL}') FROM docs")
        conn.execute("ANALYZE vectors")
        conn.execute("SET enable_seqscan = off")
        query = f"SELECT id FROM vectors WHERE embedding = llm_embed('Document 3: the quick brown fox jumps " \
                f"over 21 lazy dogs.', '{MODEL}')"
        root = plan(conn, query)
        assert any("llm_embed(" in n.get("Index Cond", "") for n in nodes(root)), root
        assert conn.execute(query).fetchall() == [(3,)]


def test_a_worker_checks_the_callers_rights_as_the_leader_does(pdb):
    """Serving checks the caller's rights on llm_param on every call (row-level security
    included, through SPI): in a worker, as the leader's role, with the same outcome."""
    role = f"par_{uuid.uuid4().hex[:6]}"
    hidden = "parallel-hidden"
    query = "SELECT id, llm_embed(body, %s) FROM docs"
    with psycopg.connect(pdb, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role}")
        try:
            conn.execute("SELECT llm_init(%s, 1, 2, 32, 64, 50257, seed => 4)", (hidden,))
            conn.execute("INSERT INTO llm_bpe_vocab SELECT %s, token_id, token FROM llm_bpe_vocab WHERE model = %s",
                         (hidden, MODEL))
            conn.execute("INSERT INTO llm_bpe_merges SELECT %s, rank, \"left\", \"right\" FROM llm_bpe_merges "
                         "WHERE model = %s", (hidden, MODEL))
            conn.execute("SELECT llm_grant(%s)", (role,))
            conn.execute(f"GRANT SELECT ON docs TO {role}")
            conn.execute("ALTER TABLE llm_param ENABLE ROW LEVEL SECURITY")
            conn.execute(f"CREATE POLICY shown ON llm_param FOR SELECT TO {role} USING (model = '{MODEL}')")
            serial(conn)
            expected = sorted(conn.execute(query, (MODEL,)).fetchall())
            forced(conn)
            conn.execute(f"SET ROLE {role}")
            root = plan(conn, query, (MODEL,))
            assert next(n for n in nodes(root) if n["Node Type"] == "Gather")["Workers Launched"] >= 1
            assert sorted(conn.execute(query, (MODEL,)).fetchall()) == expected
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f'weights of model "{hidden}"'):
                conn.execute(query, (hidden,))
        finally:
            conn.execute("RESET ROLE")
            conn.execute("DROP POLICY IF EXISTS shown ON llm_param")
            conn.execute("ALTER TABLE llm_param DISABLE ROW LEVEL SECURITY")
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
