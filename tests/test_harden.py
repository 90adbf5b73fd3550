"""Hardening (issue 11): one trainer per model, non-finite weights, roles, entry-point consistency.

Concurrency is tested with real sessions, each step waiting for a state that pg_stat_activity
shows (a backend waiting on a lock), never for a time.
"""

from __future__ import annotations

import random
import struct
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from .conftest import PGLLM_BIN, run_pgllm
from .weights import write_gpt2_tokenizer

TINY = dict(n_layer=1, n_head=2, d=32, n_positions=32, vocab=64)


def make_model(conn, model: str, vocab: int = 64, rows: int = 8, block: int = 8) -> None:
    conn.execute("SELECT llm_init(%s, 1, 2, 32, 32, %s, seed => 1)", (model, vocab))
    if conn.execute("SELECT count(*) FROM llm_dataset").fetchone()[0] == 0:
        rng = random.Random(0)
        for _ in range(rows):
            seq = [rng.randrange(64) for _ in range(block + 1)]
            conn.execute("INSERT INTO llm_dataset (tokens, target) VALUES (%s, %s)", (seq[:-1], seq[1:]))


def wait_for(conn, sql: str, params=(), what: str = "", timeout: float = 120):
    """Poll until the query returns a row (a state of the server), or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(sql, params).fetchone()
        if row:
            return row
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


WAITING = ("SELECT pid FROM pg_stat_activity WHERE query ILIKE %s AND wait_event_type = 'Lock' "
           "AND wait_event = ANY(%s) AND pid <> pg_backend_pid()")


# ---- two trainings of one model -----------------------------------------------------------------

def test_second_pgllm_train_is_refused_and_sql_waits(conn, db):
    """While `pgllm train` runs, a second `pgllm train` of the model is refused at once (naming
    the first run's pid) and a plain SQL llm_train waits for the run to end, then continues the
    step counter: every step runs once, on the schedule of the call that ran it."""
    make_model(conn, "m")
    conn.execute("INSERT INTO llm_train_state (model) VALUES ('m')")
    # the first run is held inside its first chunk by a row lock of this test
    blocker = psycopg.connect(db)
    blocker.execute("SELECT 1 FROM llm_train_state WHERE model = 'm' FOR UPDATE")
    first = subprocess.Popen([str(PGLLM_BIN), "--dsn", db, "train", "--model", "m", "--steps", "3",
                              "--commit-every", "3", "--batch-size", "2", "--warmup", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sql_result: list = []
    sql_thread = None
    try:
        first_pid = wait_for(conn, WAITING, ("%llm_train%", ["transactionid", "tuple"]), "the first run to wait for the row")[0]
        second = run_pgllm("--dsn", db, "train", "--model", "m", "--steps", "2", "--warmup", "1")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.strip() == (f'Error: model "m" is being trained by another session (pid {first_pid}) '
                                         f'(Wait for that run to finish, or stop it with SELECT '
                                         f'pg_cancel_backend({first_pid}).)')

        def sql_train():
            with psycopg.connect(db, autocommit=True) as c:
                sql_result.append(c.execute("SELECT llm_train('m', 2, warmup => 1, batch_size => 2)").fetchone())

        sql_thread = threading.Thread(target=sql_train)
        sql_thread.start()
        wait_for(conn, WAITING, ("%llm_train('m', 2%", ["advisory"]), "the SQL call to wait for the run")
    finally:
        blocker.rollback()
        blocker.close()
        out, err = first.communicate(timeout=300)
        if sql_thread is not None:
            sql_thread.join(timeout=300)
    assert first.returncode == 0, err
    assert 'trained model "m": steps 1..3 of a 3-step schedule' in out
    assert len(sql_result) == 1
    assert conn.execute("SELECT step FROM llm_train_state WHERE model = 'm'").fetchone()[0] == 5
    assert [r[0] for r in conn.execute("SELECT step FROM llm_train_log WHERE model = 'm' ORDER BY step")] \
        == [1, 2, 3, 4, 5]
    # the run's lock went with its session: a new run starts
    assert run_pgllm("--dsn", db, "train", "--model", "m", "--steps", "1", "--batch-size", "2",
                     "--warmup", "1").returncode == 0


# ---- non-finite weights -----------------------------------------------------------------------

def test_update_to_non_finite_parameters_is_rolled_back(conn, db, cli):
    """The issue's `pgllm train --steps 1 --lr-max 1e30`: the one update makes the weights
    unusable, no later loss sees it; the call fails naming the step, and nothing is written."""
    make_model(conn, "m")
    before = conn.execute("SELECT md5(string_agg(data::text, '' ORDER BY name)) FROM llm_param "
                          "WHERE model = 'm'").fetchone()
    result = cli("--dsn", db, "train", "--model", "m", "--steps", "1", "--lr-max", "1e30", "--batch-size", "2")
    assert result.exit_code == 1
    assert 'the update of step 1 left parameters of model "m" that are not finite' in result.output
    assert "Lower lr_max (it is 1e+30)" in result.output
    after = conn.execute("SELECT md5(string_agg(data::text, '' ORDER BY name)) FROM llm_param "
                         "WHERE model = 'm'").fetchone()
    assert after == before
    assert conn.execute("SELECT count(*) FROM llm_train_log WHERE model = 'm'").fetchone()[0] == 0
    # generation still works from the stored weights
    assert len(conn.execute("SELECT llm_generate_tokens(ARRAY[1, 2], 3, temperature => 0, model => 'm')"
                            ).fetchone()[0]) == 3


@pytest.mark.parametrize("sql", [
    "SELECT llm_generate_tokens(ARRAY[1, 2], 3, temperature => 0, model => 'm')",
    "SELECT llm_generate_tokens(ARRAY[1, 2], 3, temperature => 0.8, seed => 1, model => 'm')",
    "SELECT llm_generate_tokens(ARRAY[1, 2], 3, topk => 0, topp => 1, seed => 1, model => 'm')",
    "SELECT * FROM llm_beam_search_tokens(ARRAY[1, 2], 2, 3, model => 'm')",
])
def test_generation_from_non_finite_logits_is_an_error(conn, sql):
    make_model(conn, "m")
    nan = struct.pack("<f", float("nan")) * 32
    conn.execute("UPDATE llm_param SET data = %s WHERE model = 'm' AND name = 'ln_f.bias'", (nan,))
    with pytest.raises(psycopg.errors.DataException, match=r"the model's logits are not finite \(logit 0 is NaN\)"):
        conn.execute(sql)


# ---- one behaviour across entry points ----------------------------------------------------------

def test_null_prompt_gives_no_rows_and_eos_minus_one_means_none(conn):
    make_model(conn, "m")
    write_gpt2_tokenizer(conn, "m")
    for sql in ("SELECT * FROM llm_beam_search(NULL, 2, 3, model => 'm')",
                "SELECT * FROM llm_beam_search_tokens(NULL, 2, 3, model => 'm')",
                "SELECT * FROM llm_generate_stream(NULL, 3, model => 'm')"):
        assert conn.execute(sql).fetchall() == [], sql
    assert conn.execute("SELECT llm_generate(NULL, 3, model => 'm')").fetchone() == (None,)
    # eos_token -1 (none) is the same as NULL in both token functions
    for sql in ("SELECT llm_generate_tokens(ARRAY[1, 2], 4, temperature => 0, model => 'm', eos_token => %s)",
                "SELECT array_agg(token_ids) FROM llm_beam_search_tokens(ARRAY[1, 2], 2, 4, model => 'm', "
                "eos_token => %s)"):
        assert conn.execute(sql, (-1,)).fetchone() == conn.execute(sql, (None,)).fetchone()
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match=r'eos_token -2 is out of range for model "m"'):
            conn.execute(sql, (-2,))


# ---- roles --------------------------------------------------------------------------------------

SERVING = [
    "SELECT llm_encode('Hello', 'm')",
    "SELECT llm_decode(ARRAY[15496], 'm')",
    "SELECT llm_logits(ARRAY[1, 2, 3], 'm')",
    "SELECT llm_generate('Hello', 2, temperature => 0, model => 'm')",
    "SELECT llm_generate_tokens(ARRAY[1, 2], 2, temperature => 0, model => 'm')",
    "SELECT count(*) FROM llm_generate_stream('Hello', 2, temperature => 0, model => 'm')",
    "SELECT count(*) FROM llm_beam_search('Hello', 2, 2, model => 'm')",
    "SELECT count(*) FROM llm_beam_search_tokens(ARRAY[1, 2], 2, 2, model => 'm')",
    "SELECT * FROM llm_tokenizer_info('m')",
    "SELECT step FROM llm_train_state WHERE model = 'm'",
    "SELECT count(*) FROM llm_models",
]
TRAINING = [
    "SELECT llm_train('m', 1, warmup => 1, batch_size => 2)",
    "SELECT llm_checkpoint_save('m', 'by a role')",
    "SELECT llm_checkpoint_load('m', (SELECT min(id) FROM llm_checkpoint WHERE model = 'm'))",
    "SELECT llm_init('m_{role}', 1, 2, 32, 32, 64)",
    "SELECT pg_llm_load_bpe_vocab_bytes(convert_to('{{\"a\": 0, \"b\": 1}}', 'UTF8'), 'm_{role}')",
    "INSERT INTO llm_dataset (dataset, tokens, target) VALUES ('by_{role}', ARRAY[1, 2], ARRAY[2, 3])",
    "DELETE FROM llm_train_log WHERE model = 'nothing'",
]
SERVER_FILES = [
    "SELECT pg_llm_import_npz('/nonexistent.npz', 'm_{role}')",
    "SELECT pg_llm_export_npz('/tmp/never.npz', 'm')",
    "SELECT pg_llm_load_bpe_vocab('/nonexistent/vocab.json', 'm_{role}')",
    "SELECT pg_llm_load_bpe_merges('/nonexistent/merges.txt', 'm_{role}')",
]


def attempt(db: str, role: str, sql: str) -> str | None:
    """Run sql as role in a session of its own (nothing cached from another role): None when it
    works, else the error's message and hint. The hint comes with pg_llm's library, which a session
    loads with its first call of a pg_llm function: plain SQL on the tables gets it after that."""
    with psycopg.connect(db, user=role, autocommit=True) as c:
        c.execute("SELECT pg_llm_version()")
        try:
            c.execute(sql.format(role=role))
            return None
        except psycopg.Error as e:
            return f"{e.diag.message_primary} | {e.diag.message_hint}"


def test_every_entry_point_per_role(conn, db, cli):
    """An ordinary role may do nothing (with a hint naming pgllm grant), a serving role may serve
    and not write, a training role may do all of it, and nobody gets the server-file functions."""
    make_model(conn, "m", vocab=50257)
    write_gpt2_tokenizer(conn, "m")
    conn.execute("SELECT llm_checkpoint_save('m', 'by the owner')")
    suffix = uuid.uuid4().hex[:8]
    roles = {kind: f"r_{kind}_{suffix}" for kind in ("none", "serve", "train")}
    for role in roles.values():
        conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        result = cli("--dsn", db, "grant", roles["serve"])
        assert result.exit_code == 0 and f"role {roles['serve']} may now serve" in result.output, result.output
        assert cli("--dsn", db, "grant", roles["train"], "--train").exit_code == 0

        for sql in SERVING + TRAINING:
            error = attempt(db, roles["none"], sql)
            assert error is not None and "permission denied for" in error and "pgllm grant ROLE" in error, (sql, error)
        for sql in SERVING:
            assert attempt(db, roles["serve"], sql) is None, sql
        for sql in TRAINING:
            error = attempt(db, roles["serve"], sql)
            assert error is not None and "permission denied for" in error and "pgllm grant ROLE --train" in error, \
                (sql, error)
        for sql in SERVING + TRAINING:
            assert attempt(db, roles["train"], sql) is None, sql
        for role in roles.values():
            for sql in SERVER_FILES:
                error = attempt(db, role, sql)
                assert error is not None and "permission denied for function pg_llm_" in error \
                    and "pgllm import and pgllm export" in error, (role, sql, error)

        # revoke takes it all back; granting is the owner's
        assert cli("--dsn", db, "revoke", roles["train"]).exit_code == 0
        assert "permission denied" in attempt(db, roles["train"], SERVING[0])
        error = attempt(db, roles["serve"], f"SELECT llm_grant('{roles['serve']}', train => true)")
        assert "permission denied for function llm_grant" in error
        result = cli("--dsn", db, "grant", "no_such_role_" + suffix)
        assert result.exit_code == 1 and f'role "no_such_role_{suffix}" does not exist' in result.output
    finally:
        for role in roles.values():
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


# ---- CLI rough edges ----------------------------------------------------------------------------

def test_cli_says_what_to_do(cli, conn, db, tmp_path):
    make_model(conn, "m")
    result = cli("--dsn", db, "init", "m")
    assert result.exit_code == 1 and 'model "m" already has weights' in result.output
    assert "pgllm init --replace" in result.output
    result = cli("--dsn", db, "import", str(tmp_path), "--model", "x")
    assert result.exit_code == 1 and f"Error: {tmp_path} is a directory, not a checkpoint file" in result.output
    result = cli("--dsn", db, "generate", "Hi", "--model", "m", "--beam-width", "2", "--top-k", "3", "--seed", "1")
    assert result.exit_code == 1
    assert "Error: --beam-width does not sample: --top-k, --seed would be ignored" in result.output


def test_convert_with_the_hub_out_of_reach_fails_at_once(tmp_path):
    """An unreachable Hub (HF_ENDPOINT on a closed local port) is one Error line, no retries."""
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    proc = run_pgllm("convert", "gpt2", "--output", str(tmp_path / "x.npz"),
                     env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "cache"),
                          "HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": "", "all_proxy": ""})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: cannot download 'gpt2': the Hugging Face Hub (127.0.0.1:{port}) is unreachable: Connection refused "
        "(a model id works offline only when it is in the Hugging Face cache; otherwise give a directory written by "
        "save_pretrained)"]


def test_thread_budget_file_is_skipped_by_base_backups(conn):
    """The sessions' thread budget lives under pgsql_tmp_pg_llm/ (pg_basebackup skips pgsql_tmp*),
    not in the data directory's root."""
    make_model(conn, "m")
    conn.execute("SELECT llm_generate_tokens(ARRAY[1, 2], 2, temperature => 0, model => 'm')")
    assert "threads" in [r[0] for r in conn.execute("SELECT pg_ls_dir('pgsql_tmp_pg_llm')")]
    assert "pg_llm_threads" not in [r[0] for r in conn.execute("SELECT pg_ls_dir('.')")]


def test_init_without_the_extension_and_empty_tokens(cluster, conn, cli):
    """pgllm init on a database without pg_llm says to run pgllm install; an empty token is
    refused by the server's loader, as pgllm tokenizer refuses it (one validator)."""
    name = f"t_noext_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        result = cli("--dsn", cluster.dsn(name), "init", "m", "--n-layer", "1", "--n-head", "2", "--d-model", "32",
                     "--n-positions", "32", "--vocab", "64")
        assert result.exit_code == 1
        assert f'the pg_llm extension is not installed in database "{name}" (run pgllm install)' in result.output
    finally:
        with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}"')
    with pytest.raises(psycopg.Error, match="empty token"):
        conn.execute("""SELECT pg_llm_load_bpe_vocab_bytes(convert_to('{"": 0, "a": 1}', 'UTF8'), 'v')""")


def test_tcp_clients_of_the_embedded_server_connect_as_the_seed_does(tmp_path):
    """`pgllm server start --port N` then `pgllm install`: postgresql://ROLE@localhost:N/postgres
    (the seed's snippet, on port N) connects without a prompt, from the .pgpass pgllm wrote, to a
    database `postgres` with pg_llm; without that password loopback TCP is refused."""
    import shutil
    import socket

    from pgllm.cluster import Cluster

    from .conftest import make_home

    home = make_home()
    env = {"PGLLM_HOME": str(home), "PGPASSFILE": str(tmp_path / "pgpass")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster(home)
    try:
        started = run_pgllm("server", "start", "--port", str(port), env=env)
        assert started.returncode == 0, started.stderr
        installed = run_pgllm("install", env=env)
        assert installed.returncode == 0, installed.stderr
        url = f"postgresql://{cluster.role}@localhost:{port}/postgres"
        with psycopg.connect(url, passfile=env["PGPASSFILE"]) as conn:
            assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_llm'").fetchone()
            assert conn.execute("SELECT pg_llm_version()").fetchone()[0]
        assert (tmp_path / "pgpass").stat().st_mode & 0o077 == 0
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(url, passfile=str(tmp_path / "empty"), connect_timeout=10)
        # a restart keeps the password (the .pgpass entry stays valid)
        assert run_pgllm("server", "stop", env=env).returncode == 0
        assert run_pgllm("server", "start", env=env).returncode == 0
        with psycopg.connect(url, passfile=env["PGPASSFILE"]) as conn:
            conn.execute("SELECT 1")
    finally:
        run_pgllm("server", "stop", env=env)
        shutil.rmtree(home, ignore_errors=True)


def test_server_start_port_takes_effect_or_fails_and_pgpass_stays_true(tmp_path):
    """`server start --port N` turns TCP on even where N is already the socket's port (as 5432 is
    on a fresh home); on a running server that does not listen there it fails in one line; and a
    new server in a new PGLLM_HOME on the same port makes the .pgpass line true again."""
    import shutil
    import socket

    from pgllm.cluster import Cluster

    from .conftest import make_home

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    homes = [make_home(), make_home()]
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:nobody:x\n")
    envs = [{"PGLLM_HOME": str(h), "PGPASSFILE": str(passfile)} for h in homes]
    role = Cluster(homes[0]).role
    url = f"postgresql://{role}@localhost:{port}/postgres"
    try:
        # socket only, on port N, then --port N: the same port, now over TCP too
        assert run_pgllm("server", "start", env=envs[0]).returncode == 0
        conf = homes[0] / "data" / "pgllm.conf"
        conf.write_text(conf.read_text().replace("port = 5432", f"port = {port}"))
        assert run_pgllm("server", "stop", env=envs[0]).returncode == 0
        assert run_pgllm("server", "start", env=envs[0]).returncode == 0
        running = run_pgllm("server", "start", "--port", str(port), env=envs[0])
        assert running.returncode == 1 and running.stderr.strip() == (
            f"Error: the server is running, listening on its socket only (port {port}); --port {port} takes a "
            "restart (run `pgllm server stop`, then `pgllm server start --port N`)")
        assert run_pgllm("server", "stop", env=envs[0]).returncode == 0
        started = run_pgllm("server", "start", "--port", str(port), env=envs[0])
        assert started.returncode == 0, started.stderr
        assert f"listening on localhost:{port} too: {url}" in started.stdout
        with psycopg.connect(url, passfile=str(passfile)) as conn:
            assert conn.execute("SHOW listen_addresses").fetchone()[0] == "localhost"
        # the same --port on the running server: nothing to change
        again = run_pgllm("server", "start", "--port", str(port), env=envs[0])
        assert again.returncode == 0 and again.stdout.startswith("already running")
        # another home, the same port: pgllm's line of the .pgpass is the new server's password
        assert run_pgllm("server", "stop", env=envs[0]).returncode == 0
        shutil.rmtree(homes[0], ignore_errors=True)
        started = run_pgllm("server", "start", "--port", str(port), env=envs[1])
        assert started.returncode == 0, started.stderr
        with psycopg.connect(url, passfile=str(passfile)) as conn:
            conn.execute("SELECT 1")
        lines = passfile.read_text().splitlines()
        assert [line.rsplit(":", 1)[0] for line in lines[:2]] == [f"localhost:{port}:*:{role}",
                                                                  f"127.0.0.1:{port}:*:{role}"]
        assert lines[2:] == ["*:*:*:nobody:x"]
        status = run_pgllm("server", "status", env=envs[0])
        assert "unknown (the server is not running)" in status.stdout
    finally:
        for env, home in zip(envs, homes):
            run_pgllm("server", "stop", env=env)
            shutil.rmtree(home, ignore_errors=True)
