"""Beyond one server, with PostgreSQL's own tools (docs/scale-out.md), on servers this module
starts itself (tests/topology.py):

- a primary and two hot standbys (standby1, standby2) streaming from it, the standbys in
  synchronous_standby_names so that a commit with synchronous_commit = remote_apply returns once
  both have applied it;
- pgpool-II in front of the three (streaming replication, statement-level load balancing, the
  read_only_function_list of docs/scale-out.md), PgBouncer in front of each node, and libpq's
  multi-host connection strings;
- PL/Proxy on the primary with the two standbys as its cluster (ext/sql/contrib/pg_llm_plproxy.sql);
- an independent serving server with data of its own, subscribed by logical replication to the
  primary's models.

Every wait is for a state (a standby's replay position, a subscription's tables ready, a backend
waiting on a lock), never for a time. The models are small: what is tested is where work runs
and that every path returns exactly what one server returns.
"""

from __future__ import annotations

import os
import re
import threading
import uuid

import psycopg
import pytest
from typer.testing import CliRunner

from pg_llm_client import PGLLMClient
from pgllm.cli import app

from .conftest import REPO
from .topology import PGBOUNCER, PGPOOL, Node, Topology, wait_for
from .weights import write_gpt2_tokenizer

MODEL = "scale"
SHAPE = (2, 4, 64, 128, 50257)  # n_layer, n_head, d_model, n_positions, vocab
STANDBYS = ("standby1", "standby2")
PLPROXY = REPO / "ext" / "sql" / "contrib" / "pg_llm_plproxy.sql"


def pgllm(*args: str) -> str:
    """`pgllm ARGS` in-process; its standard output (a failure shows its output)."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def new_model(conn: psycopg.Connection, name: str, seed: int, shape=SHAPE) -> None:
    conn.execute("SELECT llm_init(%s, %s, %s, %s, %s, %s, seed => %s)", (name, *shape, seed))
    write_gpt2_tokenizer(conn, name)


@pytest.fixture(scope="module")
def topo():
    t = Topology()
    try:
        primary = t.start_primary()
        for name in STANDBYS:
            t.add_standby(name)
        with primary.connect() as conn:
            conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = 'FIRST 2 ({', '.join(STANDBYS)})'")
            conn.execute("ALTER SYSTEM SET synchronous_commit = 'local'")
            conn.execute("SELECT pg_reload_conf()")
            new_model(conn, MODEL, 1)
            conn.execute("INSERT INTO llm_dataset (dataset, tokens, target) SELECT %s, array_agg((g * 31 + i) %% 50000 "
                         "ORDER BY i), array_agg((g * 31 + i + 1) %% 50000 ORDER BY i) FROM generate_series(1, 8) g, "
                         "generate_series(1, 16) i GROUP BY g", (MODEL,))
        t.wait_for_replay(*standbys(t))
        yield t
    finally:
        t.stop()


@pytest.fixture(scope="module")
def plproxy(topo):
    """PL/Proxy on the primary, the two standbys its cluster's partitions, the recipe loaded."""
    with topo.primary.connect() as conn:
        if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'plproxy'").fetchone():
            pytest.skip("PL/Proxy is not installed (apt-get install postgresql-15-plproxy)")
        conn.execute("CREATE EXTENSION plproxy")
        nodes = [topo.nodes[n].libpq(options="-c client_connection_check_interval=1s").replace("'", "''")
                 for n in STANDBYS]
        conn.execute(f"CREATE SERVER pg_llm_nodes FOREIGN DATA WRAPPER plproxy OPTIONS (p0 '{nodes[0]}', "
                     f"p1 '{nodes[1]}')")
        conn.execute("CREATE USER MAPPING FOR PUBLIC SERVER pg_llm_nodes")
        conn.execute(PLPROXY.read_text())
    topo.wait_for_replay(*standbys(topo))
    return topo


def standbys(t: Topology) -> list[Node]:
    return [t.nodes[n] for n in STANDBYS]


def pgpool_setting(name: str) -> str:
    """A setting of docs/scale-out.md's pgpool.conf, as written there (quotes included)."""
    page = (REPO / "docs" / "scale-out.md").read_text()
    return re.search(rf"^{name} = (.*?)\s*(#.*)?$", page, re.M).group(1)


@pytest.fixture(scope="module")
def pgpool(topo):
    """pgpool-II as docs/scale-out.md configures it; a session whose application_name is
    to_standby1 (to_standby2) has its reads sent to that standby."""
    if not os.path.exists(PGPOOL):
        pytest.skip("pgpool-II is not installed (apt-get install pgpool2)")
    nodes = [topo.primary, *standbys(topo)]
    return topo.start_pgpool(nodes, [0, 1, 1], {
        "read_only_function_list": pgpool_setting("read_only_function_list"),
        # a client's backends end with it, and so flush their statistics at once
        "connection_cache": "off",
        "app_name_redirect_preference_list": "'" + ",".join(f"to_{n}:{i + 1}(1.0)" for i, n in enumerate(STANDBYS)) + "'",
    })


def pool_counts(pgpool) -> list[int]:
    """SELECTs pgpool has sent to each node (SHOW POOL_NODES' select_cnt), node 0 the primary."""
    with psycopg.connect(pgpool.dsn(), autocommit=True) as conn:
        # never prepared: pgpool answers SHOW POOL_NODES itself only as a plain statement
        rows = conn.execute("SHOW POOL_NODES", prepare=False).fetchall()
    return [int(r[8]) for r in sorted(rows, key=lambda r: int(r[0]))]


def serve(conn: psycopg.Connection, model: str = MODEL) -> list:
    """Every serving path on one connection: the client's methods and the SQL functions."""
    client = PGLLMClient(conn, model=model)
    out = [
        client.generate("Hello from a replica", max_tokens=8, temperature=0),
        client.generate("Seeded", max_tokens=8, temperature=0.9, top_k=40, top_p=0.9, seed=7),
        list(client.stream("Stream", max_tokens=6, temperature=0)),
        client.beam_search("Beam me", beam_width=2, max_tokens=4),
        client.generate_batch(["Hello", "Batch", "a"], max_tokens=6, seed=3),
    ]
    for query, args in [
        ("SELECT llm_logits(llm_encode('Some logits', %s), %s)", (model, model)),
        ("SELECT llm_embed('Embeddings on a replica', %s)", (model,)),
        ("SELECT llm_perplexity('Perplexity on a replica', %s)", (model,)),
        ("SELECT loss FROM llm_eval(%s, %s)", (model, MODEL)),
        ("SELECT llm_decode(llm_encode('Round trip é 漢字', %s), %s)", (model, model)),
    ]:
        with conn.transaction():
            out.append(conn.execute(query, args, prepare=False).fetchone()[0])
    return out


# ---- pgpool-II ------------------------------------------------------------------------------------

def test_the_pgpool_list_is_every_function_that_writes_nothing(topo):
    """docs/scale-out.md's read_only_function_list names exactly pg_llm's functions that are not
    PARALLEL UNSAFE (those write), with or without a schema."""
    pattern = pgpool_setting("read_only_function_list").strip("'")
    match = re.fullmatch(r"\(\.\+\\\.\)\?\(([\w|]+)\)", pattern)
    assert match, pattern
    with topo.primary.connect() as conn:
        rows = conn.execute(
            "SELECT p.proname, p.proparallel FROM pg_proc p "
            "JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e' "
            "JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'").fetchall()
    assert set(match.group(1).split("|")) == {name for name, parallel in rows if parallel != "u"}
    for name in ("llm_generate", "public.llm_generate", "s.llm_embed"):
        assert re.fullmatch(pattern, name)
    assert not re.fullmatch(pattern, "llm_train") and not re.fullmatch(pattern, "public.llm_init")


def test_pgpool_sends_serving_to_both_standbys_with_the_primarys_results(topo, pgpool):
    with topo.primary.connect() as direct:
        expected = serve(direct)
    before = pool_counts(pgpool)
    for autocommit in (True, False, True):
        with psycopg.connect(pgpool.dsn(), autocommit=autocommit) as conn:
            assert serve(conn) == expected
    after = pool_counts(pgpool)
    # on the primary, only each client's one lookup of pg_llm's schema (pgpool sends a SELECT of
    # the system catalogs there): the 3 clients' 3, out of 3 x 10 SELECTs
    assert after[0] - before[0] == 3, f"a serving call went to the primary: {before} -> {after}"
    assert after[1] > before[1] and after[2] > before[2], f"not on both standbys: {before} -> {after}"
    assert after[1] + after[2] - before[1] - before[2] == 3 * 10
    # the CLI too
    assert pgllm("--dsn", pgpool.dsn(), "generate", "Hello from a replica", "-m", MODEL, "-n", "8",
                 "--temperature", "0", "--no-stream") == expected[0] + "\n"
    assert pool_counts(pgpool)[0] - after[0] == 1
    # a stream read through a cursor works, on the primary (pgpool's rule for DECLARE and FETCH)
    streams = function_calls(topo.primary, "llm_generate_stream")
    with psycopg.connect(pgpool.dsn()) as conn:
        conn.execute("DECLARE held CURSOR FOR SELECT (llm_generate_stream('Stream', 6, 0, model => %s)).token",
                     (MODEL,))
        assert "".join(r[0] for r in conn.execute("FETCH ALL FROM held").fetchall()) == expected[2][-1].text
    wait_for("the cursor's stream in the primary's statistics",
             lambda: function_calls(topo.primary, "llm_generate_stream") > streams)


def test_training_through_pgpool_reaches_every_standby_at_its_commit(topo, pgpool):
    """Writes go to the primary; committed with synchronous_commit = remote_apply, the very next
    call on each standby serves the new weights from a new shared copy (no stale copy)."""
    logits = "SELECT llm_logits('{1,2,3}', %s)"
    version = "SELECT weights_version FROM llm_model_config WHERE model = %s"
    copies = "SELECT DISTINCT weights_version FROM pg_llm_weight_cache() WHERE model = %s"
    old = {}
    for node in standbys(topo):
        with node.connect() as conn:
            old[node.name] = conn.execute(logits, (MODEL,)).fetchone()[0]
    with psycopg.connect(pgpool.dsn(), autocommit=True) as conn:
        conn.execute("SET synchronous_commit = remote_apply")
        conn.execute("SELECT llm_train(%s, 2, lr_max => 0.01, warmup => 0, batch_size => 2, dataset => %s)",
                     (MODEL, MODEL))
        with conn.transaction():  # a checkpoint, and the snapshot listing: the primary's
            conn.execute("SELECT llm_checkpoint_save(%s, 'through pgpool')", (MODEL,))
    with topo.primary.connect() as direct:
        new = direct.execute(logits, (MODEL,)).fetchone()[0]
        new_version = direct.execute(version, (MODEL,)).fetchone()[0]
        assert direct.execute("SELECT count(*) FROM llm_checkpoint WHERE model = %s AND note = 'through pgpool'",
                              (MODEL,)).fetchone()[0] == 1
    assert all(new != o for o in old.values())
    for name in STANDBYS:
        with psycopg.connect(pgpool.dsn(application_name=f"to_{name}"), autocommit=True) as conn:
            assert conn.execute(logits, (MODEL,), prepare=False).fetchone()[0] == new
        with topo.nodes[name].connect() as conn:
            assert conn.execute(version, (MODEL,)).fetchone()[0] == new_version
            assert conn.execute(copies, (MODEL,)).fetchall() == [(new_version,)]


def test_each_standby_serves_through_its_own_batch_runner_and_shared_copy(topo):
    # the runner of the current weights (an earlier version's may still be idling out)
    query = ("SELECT llm_generate('Runner', 8, 0, model => %s), "
             "(SELECT count(*) FROM pg_llm_batch_runners() r JOIN llm_model_config c USING (model, weights_version) "
             " WHERE model = %s AND r.sequences > 0), "
             "(SELECT count(*) FROM pg_llm_weight_cache() w JOIN llm_model_config c USING (model, weights_version) "
             " WHERE model = %s AND w.format = 'float32' AND w.database = current_database())")
    with topo.primary.connect() as direct:
        expected = direct.execute(query, (MODEL,) * 3).fetchone()[0]
    for node in standbys(topo):
        with node.connect() as conn:
            assert conn.execute(query, (MODEL,) * 3).fetchone() == (expected, 1, 1), node.name


# ---- PgBouncer, libpq --------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(PGBOUNCER), reason="pgbouncer is not installed (apt-get install pgbouncer)")
def test_pgbouncer_in_front_of_each_node(topo):
    nodes = ["primary", *STANDBYS]
    bouncer = topo.start_pgbouncer({name: topo.nodes[name] for name in nodes})
    with topo.primary.connect() as direct:
        expected = serve(direct)
    for node in nodes:
        with psycopg.connect(bouncer.dsn(node), autocommit=False) as a, \
                psycopg.connect(bouncer.dsn(node), autocommit=True) as b:
            for conn in (a, b, a):  # two clients taking turns on one server connection
                assert serve(conn) == expected
                if not conn.autocommit:
                    conn.commit()
            for _ in PGLLMClient(a, model=MODEL).stream("Hello", max_tokens=100, temperature=0):
                break  # left early: cancelled through PgBouncer, the connection still serves
            assert PGLLMClient(a, model=MODEL).generate("Hello from a replica", max_tokens=8, temperature=0) == expected[0]
        assert pgllm("--dsn", bouncer.dsn(node), "generate", "Seeded", "-m", MODEL, "-n", "8", "--temperature", "0.9",
                     "--top-k", "40", "--top-p", "0.9", "--seed", "7", "--no-stream") == expected[1] + "\n"


def multi_host(nodes: list[Node], **params) -> str:
    hosts = ",".join(str(n.run) for n in nodes)
    ports = ",".join(str(n.port) for n in nodes)
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return f"postgresql://{nodes[0].role}@/pgllm?host={hosts}&port={ports}{extra}"


def function_calls(node: Node, name: str) -> int:
    with node.connect() as conn:
        return conn.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = %s",
                            (name,)).fetchone()[0]


def test_multi_host_connection_strings(topo):
    """target_session_attrs picks a standby for serving and the primary for writing;
    load_balance_hosts=random spreads connections over the standbys."""
    serving = multi_host([topo.primary, *standbys(topo)], target_session_attrs="standby", load_balance_hosts="random")
    writing = multi_host([*standbys(topo), topo.primary], target_session_attrs="read-write")
    with topo.primary.connect() as direct:
        expected = serve(direct)
    landed = set()
    for _ in range(24):
        with psycopg.connect(serving, autocommit=True) as conn:
            landed.add(conn.execute("SELECT current_setting('cluster_name')").fetchone()[0])
    assert landed == set(STANDBYS)
    with psycopg.connect(serving) as conn:
        assert serve(conn) == expected
    # the CLI: its backend's statistics count the call once the connection has ended
    calls = {n.name: function_calls(n, "llm_generate") for n in standbys(topo)}
    assert pgllm("--dsn", serving, "generate", "Hello from a replica", "-m", MODEL, "-n", "8", "--temperature", "0",
                 "--no-stream") == expected[0] + "\n"
    wait_for("the CLI's call in a standby's statistics",
             lambda: sum(function_calls(n, "llm_generate") for n in standbys(topo)) > sum(calls.values()))
    with psycopg.connect(writing) as conn:
        assert conn.execute("SELECT current_setting('cluster_name')").fetchone()[0] == "primary"
    out = pgllm("--dsn", writing, "checkpoint", "save", "-m", MODEL, "--note", "multi-host")
    assert out.strip()
    with topo.primary.connect() as conn:
        assert conn.execute("SELECT count(*) FROM llm_checkpoint WHERE note = 'multi-host'").fetchone()[0] == 1


# ---- PL/Proxy ------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_model(plproxy):
    """A model that no server has served yet (so each node's shared copy shows that it computed)."""
    name = f"spread-{uuid.uuid4().hex[:6]}"
    with plproxy.primary.connect() as conn:
        new_model(conn, name, 5)
    plproxy.wait_for_replay(*standbys(plproxy))
    return name


def copies_on(node: Node, model: str) -> int:
    with node.connect() as conn:
        return conn.execute("SELECT count(*) FROM pg_llm_weight_cache() WHERE model = %s", (model,)).fetchone()[0]


def test_plproxy_spreads_a_batch_and_rows_over_the_nodes_in_order(plproxy, fresh_model):
    topo = plproxy
    prompts = [f"Prompt number {i} of the batch" for i in range(1, 12)] + [None]
    ids = [3, 10, 11, 4, 7, 100]
    bodies = [f"Row {i} of a table" for i in ids]
    with topo.primary.connect() as conn:
        one = conn.execute("SELECT ord, text FROM llm_generate_batch(%s, 8, 0.9, 40, 0.9, %s, 5)",
                           (prompts, fresh_model)).fetchall()
        rows = conn.execute("SELECT u.id, llm_embed(u.body, %s) FROM unnest(%s::bigint[], %s::text[]) u(id, body)",
                            (fresh_model, ids, bodies)).fetchall()
        assert [copies_on(n, fresh_model) for n in standbys(topo)] == [0, 0]
        spread = conn.execute("SELECT ord, text FROM llm_generate_batch_spread(%s, 8, 0.9, 40, 0.9, %s, 5)",
                              (prompts, fresh_model)).fetchall()
        assert spread == one and spread[-1] == (12, None)
        assert all(copies_on(n, fresh_model) == 1 for n in standbys(topo)), "a node computed nothing"
        assert conn.execute("SELECT id, embedding FROM llm_embed_spread(%s::bigint[], %s::text[], %s)",
                            (ids, bodies, fresh_model)).fetchall() == rows
        assert conn.execute("SELECT llm_generate_any('Hello', 8, 0, model => %s)", (fresh_model,)).fetchone()[0] == \
            conn.execute("SELECT llm_generate('Hello', 8, 0, model => %s)", (fresh_model,)).fetchone()[0]
        assert conn.execute("SELECT count(*) FROM llm_generate_batch_spread('{}'::text[], model => %s)",
                            (fresh_model,)).fetchone()[0] == 0


class LockedWeights:
    """llm_param locked on the primary (ACCESS EXCLUSIVE, replayed on the standbys): a node that
    must read a model's weights waits there until the lock goes, a state the test can see."""

    def __init__(self, topo: Topology):
        self.topo = topo

    def __enter__(self):
        self.conn = self.topo.primary.connect(autocommit=False)
        self.conn.execute("LOCK TABLE llm_param IN ACCESS EXCLUSIVE MODE")
        lsn = self.conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        for node in standbys(self.topo):
            with node.connect() as c:
                wait_for(f"{node.name} to replay the lock", lambda: c.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0])
        return self

    def __exit__(self, *exc):
        self.conn.rollback()
        self.conn.close()


def node_statements(node: Node, waiting: bool = False) -> int:
    """The node's backends running a part of a spread batch (waiting on a lock, if asked)."""
    with node.connect() as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%llm_generate_batch(%' "
            "AND pid <> pg_backend_pid()" + (" AND wait_event_type = 'Lock'" if waiting else "")).fetchone()[0]


def test_plproxy_an_error_on_one_node_ends_the_whole_call(plproxy, fresh_model):
    """Prompt 1 (partition 1, standby2) is too long for the model: standby2 fails at once, while
    standby1 waits for the weights; the call fails with standby2's error and standby1's part ends."""
    topo = plproxy
    prompts = ["word " * 300, "A prompt that fits"]
    with LockedWeights(topo):
        with topo.primary.connect() as conn, pytest.raises(psycopg.errors.ProgramLimitExceeded) as failed:
            conn.execute("SELECT * FROM llm_generate_batch_spread(%s, 8, model => %s)", (prompts, fresh_model))
        assert "longer than the 128 positions" in failed.value.diag.message_primary
        wait_for("standby1's part to end", lambda: node_statements(topo.nodes["standby1"]) == 0)
    with topo.primary.connect() as conn:  # the proxy's connections serve the next call
        assert len(conn.execute("SELECT * FROM llm_generate_batch_spread(%s, 4, model => %s)",
                                (prompts[1:] * 2, fresh_model)).fetchall()) == 2


def test_plproxy_cancel_ends_every_node(plproxy, fresh_model):
    topo = plproxy
    prompts = ["First prompt", "Second prompt", "Third", "Fourth"]
    with LockedWeights(topo):
        with topo.primary.connect() as conn:
            pid = conn.info.backend_pid
            failure = []

            def call():
                try:
                    conn.execute("SELECT * FROM llm_generate_batch_spread(%s, 8, model => %s)", (prompts, fresh_model))
                except psycopg.Error as e:
                    failure.append(e)
            thread = threading.Thread(target=call)
            thread.start()
            for node in standbys(topo):
                wait_for(f"{node.name}'s part to wait for the weights", lambda: node_statements(node, waiting=True) == 1)
            with topo.primary.connect() as admin:
                admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
            thread.join(timeout=300)
            assert not thread.is_alive() and len(failure) == 1
            assert isinstance(failure[0], psycopg.errors.QueryCanceled), failure
        for node in standbys(topo):
            wait_for(f"{node.name}'s part to end", lambda: node_statements(node) == 0)


# ---- logical replication ------------------------------------------------------------------------------

def published(models: list[str]) -> str:
    """docs/scale-out.md's publication, for these models."""
    page = (REPO / "docs" / "scale-out.md").read_text()
    sql = re.search(r"```sql\n(CREATE PUBLICATION pg_llm_models.*?;)\n", page, re.S).group(1)
    return sql.replace("'my-model'", ", ".join(f"'{m}'" for m in models))


def subscribed(topo: Topology) -> str:
    page = (REPO / "docs" / "scale-out.md").read_text()
    sql = re.search(r"```sql\n(ALTER TABLE llm_model_config ENABLE ALWAYS TRIGGER.*?CREATE SUBSCRIPTION.*?;)\n",
                    page, re.S).group(1)
    return sql.replace("host=training.example dbname=app user=replicator", topo.primary.libpq())


@pytest.fixture(scope="module")
def serving(topo):
    """An independent server with a model of its own, subscribed to the primary's models
    `shipped` and gpt2-small (re-registered small on the primary, so that its row must replace the
    subscriber's unused built-in one: the trigger that does it is enabled for the apply)."""
    node = topo.add_server("serving", {"max_worker_processes": "24"})
    with node.connect() as conn:
        new_model(conn, "local", 11)
        conn.execute("CREATE TABLE articles (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO articles VALUES (1, 'Data of its own')")
    with topo.primary.connect() as conn:
        new_model(conn, "shipped", 12)
        with conn.transaction():
            conn.execute("DELETE FROM llm_model_config WHERE model = 'gpt2-small'")
            conn.execute("SELECT llm_init('gpt2-small', 1, 2, 32, 64, 50257, seed => 13)")
        write_gpt2_tokenizer(conn, "gpt2-small")
        conn.execute(published(["shipped", "gpt2-small"]))
    with node.connect() as conn:
        for statement in subscribed(topo).split(";\n"):
            conn.execute(statement)
    wait_for_sync(node)
    return node


def wait_for_sync(node: Node) -> None:
    with node.connect() as conn:
        wait_for("the subscription's tables to be copied", lambda: conn.execute(
            "SELECT count(*) = 5 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel").fetchone()[0])


def caught_up(topo: Topology, node: Node, model: str) -> None:
    """Until the subscriber has the publisher's weights_version and shape of the model."""
    row = "SELECT weights_version, n_layer, d_model FROM llm_model_config WHERE model = %s"
    with topo.primary.connect() as p, node.connect() as s:
        want = p.execute(row, (model,)).fetchone()
        wait_for(f"{node.name} to apply model {model}", lambda: s.execute(row, (model,)).fetchone() == want)


SHIPPED_QUERIES = [
    "SELECT llm_logits(llm_encode('Shipped', %(m)s), %(m)s)",
    "SELECT llm_generate('Shipped', 8, 0, model => %(m)s)",
    "SELECT llm_generate('Shipped', 8, 0.9, 40, 0.9, %(m)s, 3)",
    "SELECT llm_embed('Shipped to serve', %(m)s)",
]


def results(node: Node, model: str) -> list:
    with node.connect() as conn:
        return [conn.execute(q, {"m": model}).fetchone()[0] for q in SHIPPED_QUERIES]


def test_logical_replication_ships_models_to_a_server_with_data_of_its_own(topo, serving):
    for model in ("shipped", "gpt2-small"):
        caught_up(topo, serving, model)
        assert results(serving, model) == results(topo.primary, model)
    with serving.connect() as conn:
        assert conn.execute("SELECT body FROM articles").fetchall() == [("Data of its own",)]
        assert conn.execute("SELECT llm_generate('Local', 4, 0, model => 'local')").fetchone()[0]
        assert conn.execute("SELECT n_layer, d_model FROM llm_model_config WHERE model = 'gpt2-small'").fetchone() == (1, 32)


def test_each_training_commit_is_served_by_the_subscriber(topo, serving):
    copies = "SELECT DISTINCT weights_version FROM pg_llm_weight_cache() WHERE model = 'shipped'"
    runner = "SELECT count(*) FROM pg_llm_batch_runners() WHERE model = 'shipped' AND weights_version = %s " \
             "AND sequences > 0"
    with topo.primary.connect() as conn:
        conn.execute("INSERT INTO llm_dataset (dataset, tokens, target) SELECT 'shipped', tokens, target "
                     "FROM llm_dataset WHERE dataset = %s", (MODEL,))
    for chunk in range(2):
        before = results(serving, "shipped")
        with topo.primary.connect() as conn:
            conn.execute("SELECT llm_train('shipped', 2, lr_max => 0.01, warmup => 0, batch_size => 2, "
                         "dataset => 'shipped')")
            version = conn.execute("SELECT weights_version FROM llm_model_config WHERE model = 'shipped'").fetchone()[0]
        caught_up(topo, serving, "shipped")
        after = results(serving, "shipped")
        assert after != before and after == results(topo.primary, "shipped")
        with serving.connect() as conn:
            assert conn.execute(copies).fetchall() == [(version,)]
            # a generation's runner serves the new version
            assert conn.execute(f"SELECT llm_generate('Runner', 4, 0, model => 'shipped'), ({runner})",
                                (version,)).fetchone()[1] == 1


def test_a_model_reinitialised_with_another_shape_is_served_in_its_new_shape(topo, serving):
    with topo.primary.connect() as conn:
        conn.execute("SELECT llm_init('shipped', 3, 2, 32, 64, 50257, seed => 14, replace => true)")
    caught_up(topo, serving, "shipped")
    with serving.connect() as conn:
        assert conn.execute("SELECT n_layer, d_model, n_positions FROM llm_model_config WHERE model = 'shipped'"
                            ).fetchone() == (3, 32, 64)
        assert conn.execute("SELECT count(*) FROM llm_param WHERE model = 'shipped'").fetchone()[0] == 4 + 12 * 3
    assert results(serving, "shipped") == results(topo.primary, "shipped")
