"""Reliability: crashes, concurrency, hostile input and privileges never cost data or the server."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from pgllm.cluster import Cluster
from pgllm.extension import build_and_install, create_or_update

from .conftest import PGLLM_BIN, make_home, run_pgllm

TINY = dict(n_layer=2, n_head=2, d_model=32, n_positions=32, vocab=64)


def make_tiny_model(conn, model: str = "tiny", rows: int = 40, block: int = 16) -> None:
    """A small random GPT-2 with a dataset of random blocks (ids below its vocabulary)."""
    conn.execute("SELECT llm_init(%s, %s, %s, %s, %s, %s, seed => 1)",
                 (model, TINY["n_layer"], TINY["n_head"], TINY["d_model"], TINY["n_positions"], TINY["vocab"]))
    rng = random.Random(0)
    with conn.cursor().copy("COPY llm_dataset (tokens, target) FROM STDIN") as copy:
        for _ in range(rows):
            seq = [rng.randrange(TINY["vocab"]) for _ in range(block + 1)]
            copy.write_row(("{" + ",".join(map(str, seq[:-1])) + "}", "{" + ",".join(map(str, seq[1:])) + "}"))


@pytest.fixture
def own_cluster():
    """A server of this test's own: killing a backend restarts every session of its cluster."""
    c = Cluster(make_home())
    c.start()
    build_and_install(c.pg_config)
    with psycopg.connect(c.dsn()) as conn:
        create_or_update(conn)
    yield c
    c.stop()
    shutil.rmtree(c.home, ignore_errors=True)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except psycopg.OperationalError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _logged_steps(dsn: str, model: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT step FROM llm_train_log WHERE model = %s ORDER BY step", (model,))]


@pytest.mark.slow
def test_kill_9_during_training_keeps_committed_chunks(own_cluster):
    """Two chunks commit, the third is stopped by a state (not a clock) and its backend killed.

    The test holds an uncommitted llm_train_log row for step 11: the third chunk's log insert of
    that step waits for the test's transaction, however fast the machine trains. Once the training
    backend is seen waiting on that lock, it is killed with SIGKILL."""
    dsn = own_cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        make_tiny_model(conn)
    blocker = psycopg.connect(dsn)
    blocker.execute("INSERT INTO llm_train_log (model, step, lr, loss) VALUES ('tiny', 11, 0, 0)")
    train = subprocess.Popen([str(PGLLM_BIN), "--dsn", dsn, "train", "--model", "tiny",
                              "--steps", "2000", "--commit-every", "5", "--batch-size", "2", "--warmup", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            pid = _wait_for(lambda: conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE query ILIKE '%llm_train%' AND wait_event_type = 'Lock' "
                "AND pid <> pg_backend_pid()").fetchone(), 120, "the third chunk to wait for step 11's row")[0]
        os.kill(pid, signal.SIGKILL)
        _, err = train.communicate(timeout=60)
    finally:
        if train.poll() is None:
            train.kill()
        try:
            blocker.close()  # the crash restart has ended its session already
        except psycopg.Error:
            pass
    assert train.returncode != 0
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("Error: ")

    # The server recovers by itself; committed chunks and their log rows are intact.
    steps = _wait_for(lambda: _logged_steps(dsn, "tiny"), 600, "the server to recover")
    assert steps == list(range(1, 11))
    with psycopg.connect(dsn) as conn:
        state = conn.execute("SELECT step FROM llm_train_state WHERE model = 'tiny'").fetchone()[0]
    assert state == len(steps)

    # Training continues from there.
    proc = run_pgllm("--dsn", dsn, "train", "--model", "tiny", "--steps", "5", "--commit-every", "5",
                     "--batch-size", "2", "--warmup", "2")
    assert proc.returncode == 0, proc.stderr
    after = _logged_steps(dsn, "tiny")
    assert after == list(range(steps[0], steps[0] + len(steps) + 5))


@pytest.mark.slow
def test_generation_during_training_sees_whole_commits(db):
    """Eight readers generate while a ninth session trains and commits: every generation runs on
    one committed set of weights (same weights_version -> same greedy output), never a mix."""
    with psycopg.connect(db, autocommit=True) as conn:
        make_tiny_model(conn)
    prompt = [1, 2, 3, 4]
    stop = threading.Event()
    results: list[tuple[int, list[int]]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def reader():
        try:
            with psycopg.connect(db) as conn:
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                while not stop.is_set():
                    with conn.transaction():
                        version = conn.execute("SELECT weights_version FROM llm_model_config WHERE model = 'tiny'"
                                               ).fetchone()[0]
                        out = conn.execute("SELECT llm_generate_tokens(%s, 8, temperature => 0, model => 'tiny')",
                                           (prompt,)).fetchone()[0]
                    with lock:
                        results.append((version, out))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(8)]
    for t in readers:
        t.start()
    try:
        with psycopg.connect(db, autocommit=True) as trainer:
            for _ in range(6):
                trainer.execute("SELECT llm_train('tiny', 2, lr_max => 0.05, warmup => 1, batch_size => 2)")
                time.sleep(0.2)
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=60)
    assert not errors, errors
    by_version: dict[int, set[tuple[int, ...]]] = {}
    for version, out in results:
        by_version.setdefault(version, set()).add(tuple(out))
    assert len(by_version) >= 2, "readers saw only one version of the weights"
    assert all(len(outs) == 1 for outs in by_version.values()), by_version
    with psycopg.connect(db) as conn:
        final_version = conn.execute("SELECT weights_version FROM llm_model_config WHERE model = 'tiny'").fetchone()[0]
        final = conn.execute("SELECT llm_generate_tokens(%s, 8, temperature => 0, model => 'tiny')",
                             (prompt,)).fetchone()[0]
    if final_version in by_version:
        assert by_version[final_version] == {tuple(final)}


def _random_text(rng: random.Random) -> str:
    kind = rng.randrange(3)
    n = rng.randrange(0, 60)
    if kind == 0:
        return "".join(chr(rng.randrange(0x20, 0x7f)) for _ in range(n))
    if kind == 1:
        return "".join(chr(c) for c in (rng.randrange(1, 0x110000) for _ in range(n)) if not 0xD800 <= c < 0xE000)
    return rng.choice(["", "'", "\"; DROP TABLE llm_param; --", "gpt2-small", "tiny", "<|endoftext|>" * 3])


def _random_ints(rng: random.Random) -> list[int]:
    pool = [0, 1, -1, 63, 64, 2**31 - 1, -2**31, 50256, 50257]
    return [rng.choice(pool) if rng.random() < 0.3 else rng.randrange(-100, 100) for _ in range(rng.randrange(0, 40))]


def test_random_input_never_crashes_the_server(conn):
    """A few thousand calls with random text, bytes and arrays into every entry point."""
    make_tiny_model(conn)
    conn.execute("SELECT llm_init('tiny2', 1, 1, 8, 8, 16, seed => 2)")
    started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    rng = random.Random(1234)
    calls = [
        ("SELECT llm_encode(%s, %s)", lambda: (_random_text(rng), rng.choice(["tiny", _random_text(rng)]))),
        ("SELECT llm_decode(%s::int[], %s)", lambda: (_random_ints(rng), rng.choice(["tiny", _random_text(rng)]))),
        ("SELECT llm_logits(%s::int[], %s)", lambda: (_random_ints(rng), rng.choice(["tiny", "tiny2", _random_text(rng)]))),
        ("SELECT llm_generate_tokens(%s::int[], %s, %s, %s, %s, %s)",
         lambda: (_random_ints(rng), rng.randrange(-5, 40), rng.choice([0, 0.5, 1, -1, 1e30, float("nan")]),
                  rng.randrange(-2, 70), rng.choice([0.0, 0.5, 1.0, 1.5, -1]), rng.choice(["tiny", "tiny2", "x"]))),
        ("SELECT llm_generate(%s, %s, model => %s)",
         lambda: (_random_text(rng), rng.randrange(-5, 10), rng.choice(["tiny", _random_text(rng)]))),
        ("SELECT * FROM llm_beam_search(%s, %s, %s, model => %s)",
         lambda: (_random_text(rng), rng.randrange(-1, 4), rng.randrange(-1, 6), rng.choice(["tiny", "tiny2"]))),
        ("SELECT pg_llm_import_npz_bytes(%s, %s)",
         lambda: (rng.randbytes(rng.randrange(0, 200)) if rng.random() < 0.5 else b"\x1f\x8b" + rng.randbytes(50),
                  _random_text(rng) or "m")),
        ("SELECT llm_checkpoint_save(%s, %s)", lambda: (rng.choice(["tiny", _random_text(rng)]), _random_text(rng))),
        ("SELECT llm_init(%s, %s, %s, %s, %s, %s)",
         lambda: (_random_text(rng), *(rng.choice([-1, 0, 1, 3, 7, 2**31 - 1]) for _ in range(5)))),
    ]
    crashes = 0
    for i in range(3000):
        sql, args = calls[i % len(calls)]
        try:
            with conn.transaction():
                conn.execute(sql, args())
                raise psycopg.Rollback()  # leave nothing behind
        except psycopg.OperationalError:
            crashes += 1
            break
        except psycopg.Error:
            pass
    assert crashes == 0
    assert conn.execute("SELECT pg_postmaster_start_time(), pg_backend_pid()").fetchone() == (started, backend)


def test_unprivileged_roles_cannot_read_files_or_change_models(cluster, conn, db):
    make_tiny_model(conn)
    conn.execute("DROP ROLE IF EXISTS llm_reader")
    conn.execute("CREATE ROLE llm_reader LOGIN")
    conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO llm_reader")
    reader_dsn = db.replace(f"{cluster.role}@", "llm_reader@", 1)
    denied = [
        "SELECT pg_llm_import_npz('/etc/passwd', 'stolen')",
        "SELECT pg_llm_export_npz('/tmp/pgllm-stolen.npz', 'tiny')",
        "SELECT pg_llm_load_bpe_vocab('/etc/passwd', 'stolen')",
        "SELECT pg_llm_load_bpe_merges('/etc/passwd', 'stolen')",
        "SELECT llm_train('tiny', 1, warmup => 1, batch_size => 2)",
        "SELECT llm_init('tiny', seed => 5, replace => true)",
        "SELECT llm_checkpoint_save('tiny', 'mine')",
        "UPDATE llm_param SET data = '\\x00' WHERE model = 'tiny'",
        "DELETE FROM llm_model_config WHERE model = 'tiny'",
    ]
    with psycopg.connect(reader_dsn, autocommit=True) as reader:
        for sql in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute(sql)
        # Reading still works for it.
        assert len(reader.execute("SELECT llm_logits('{1,2}', 'tiny')").fetchone()[0]) == TINY["vocab"]
    assert not os.path.exists("/tmp/pgllm-stolen.npz")
    conn.execute("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM llm_reader")
    conn.execute("DROP ROLE llm_reader")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="kills a process of the server's OS user (runs as root only)")
def test_a_batch_runner_killed_with_sigkill_leaves_no_session_hanging(own_cluster):
    """A session waits in the model's batch runner (paused with SIGSTOP, so it is a state, not a
    moment); SIGKILL on the runner makes the postmaster restart the server, as for any crashed
    backend: the session's statement ends with an error, and generation works again after."""
    dsn = own_cluster.dsn()
    generate = "SELECT llm_generate_tokens('{1,2,3}', 20, 0, model => 'tiny')"
    with psycopg.connect(dsn, autocommit=True) as conn:
        make_tiny_model(conn, rows=1)
        expected = conn.execute(generate).fetchone()[0]
    victim = psycopg.connect(dsn, autocommit=True)
    out = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        runner = _paused_runner(conn, generate)
        try:
            t = threading.Thread(target=lambda: out.append(_attempt(victim, generate)))
            t.start()
            _wait_for(lambda: conn.execute("SELECT wait_event = 'Extension' FROM pg_stat_activity WHERE pid = %s",
                                           (victim.info.backend_pid,)).fetchone()[0], 60,
                      "the session to wait for its runner")
        finally:
            os.kill(runner, signal.SIGKILL)
    t.join(timeout=120)
    assert not t.is_alive(), "a session hangs after its batch runner was killed"
    assert isinstance(out[0], psycopg.OperationalError)  # the crash restart ended its session
    try:
        victim.close()
    except psycopg.Error:
        pass
    again = _wait_for(lambda: _generate(dsn, generate), 600, "the server to recover")
    assert again == expected


def _paused_runner(conn, generate) -> int:
    """The pid of the model's batch runner, stopped (SIGSTOP): started by a generation if there is
    none, and looked up again once stopped, in case it had just exited when idle."""
    for _ in range(100):
        row = conn.execute("SELECT pid FROM pg_llm_batch_runners() WHERE model = 'tiny'").fetchone()
        if row is None:
            conn.execute(generate)
            continue
        os.kill(row[0], signal.SIGSTOP)
        if conn.execute("SELECT pid FROM pg_llm_batch_runners() WHERE model = 'tiny'").fetchone() == row:
            return row[0]
    raise AssertionError("no batch runner stayed up")


def _attempt(conn, sql):
    try:
        return conn.execute(sql).fetchone()[0]
    except psycopg.Error as e:
        return e


def _generate(dsn, sql):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]
