"""One copy of the weights per server (pg_llm.shared_weights, pgsql_tmp_pg_llm/ in the data directory).

What a backend maps is read from /proc/PID/maps and its private memory from /proc/PID/status, so
these tests need the server on this machine (the suite's own). Builds that must be caught halfway
wait for a state the test controls: pg_llm.debug_build_pause_lock makes the builder wait, halfway
through its file, for a session advisory lock the test holds; the test then sees it waiting in
pg_locks before it cancels or kills it. Killing a backend restarts the server (crash recovery),
so those tests run on a server of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from pgllm.cluster import Cluster, is_root
from pgllm.extension import build_and_install, create_or_update

from .conftest import make_home

CACHE = "pgsql_tmp_pg_llm"
PAUSE_LOCK = 74_205  # the advisory lock a paused builder waits for
TINY = (2, 2, 64, 32, 1000)  # n_layer, n_head, d_model, n_positions, vocab: a 3 MB file
WIDE = (2, 4, 256, 64, 50257)  # 52 MB of weights: large beside a backend's own memory


def make_model(conn, shape=TINY, name=None) -> tuple[str, int]:
    """A model made with llm_init; returns its name and the bytes of its weights."""
    name = name or f"wc-{uuid.uuid4().hex[:8]}"
    params = conn.execute("SELECT llm_init(%s, %s, %s, %s, %s, %s)", (name, *shape)).fetchone()[0]
    return name, 4 * params


def logits(conn, model, tokens=(1, 2, 3)) -> np.ndarray:
    return np.array(conn.execute("SELECT llm_logits(%s, %s)", (list(tokens), model)).fetchone()[0], dtype=np.float32)


def private_logits(dsn, model, tokens=(1, 2, 3)) -> np.ndarray:
    """What a backend with a private copy loaded from the tables computes."""
    with psycopg.connect(dsn, autocommit=True, options="-c pg_llm.shared_weights=off") as c:
        return logits(c, model, tokens)


def copies(conn, model) -> list[tuple]:
    """(weights_version, path, backends) of the model's shared copies."""
    return conn.execute("SELECT weights_version, path, backends FROM pg_llm_weight_cache() "
                        "WHERE model = %s AND database = current_database() ORDER BY weights_version",
                        (model,)).fetchall()


def version(conn, model) -> int:
    return conn.execute("SELECT weights_version FROM llm_model_config WHERE model = %s", (model,)).fetchone()[0]


def mapped(pid: int) -> list[str]:
    """The copies a backend maps (a path relative to the data directory, ' (deleted)' if unlinked)."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if f"/{CACHE}/" in line:
            path = line.split(None, 5)[5]
            rel = CACHE + path.split(f"/{CACHE}", 1)[1]
            if is_copy(Path(rel.removesuffix(" (deleted)")).name) and rel not in out:
                out.append(rel)
    return out


def rss_anon(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def is_copy(name: str) -> bool:
    """A copy of weights, not a lock file or the sessions' thread budget (also kept there)."""
    return not name.endswith(".lock") and name != "threads"


def files(data_dir: Path) -> list[str]:
    """The copies in the cache directory."""
    d = data_dir / CACHE
    return sorted(p.name for p in d.iterdir() if is_copy(p.name)) if d.exists() else []


def wait_for(predicate, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def pid_of(conn) -> int:
    return conn.info.backend_pid


def close(conn):
    """Closes a connection and waits for its backend to exit (and so to release its copy)."""
    pid = pid_of(conn)
    conn.close()
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), f"backend {pid} to exit")


def watch_notices(conn) -> list[tuple[str, str, str]]:
    """(message, detail, hint) of every notice and warning the connection receives from now on."""
    notices = []
    conn.add_notice_handler(lambda d: notices.append((d.message_primary, d.message_detail or "", d.message_hint or "")))
    return notices


class Call(threading.Thread):
    """Runs one statement on its own connection; .error or .result when done."""

    def __init__(self, dsn: str, sql: str, args=(), options: str = ""):
        super().__init__(daemon=True)
        self.conn = psycopg.connect(dsn, autocommit=True, options=options)
        self.pid = self.conn.info.backend_pid
        self.sql, self.args, self.result, self.error = sql, args, None, None
        self.start()

    def run(self):
        try:
            self.result = self.conn.execute(self.sql, self.args).fetchone()[0]
        except psycopg.Error as e:
            self.error = e

    def close(self):
        self.join(60)
        self.conn.close()


def paused_builder(dsn, admin, model) -> Call:
    """A backend building the model's copy, stopped halfway (the caller holds PAUSE_LOCK)."""
    call = Call(dsn, "SELECT llm_logits('{1,2,3}', %s)", (model,), options=f"-c pg_llm.debug_build_pause_lock={PAUSE_LOCK}")
    wait_for(lambda: admin.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s "
                                   "AND pid = %s AND NOT granted", (PAUSE_LOCK, call.pid)).fetchone()[0] == 1,
             "the builder to pause")
    return call


# ---- on the suite's server -------------------------------------------------------------------

def test_backends_map_one_copy_and_a_private_copy_when_off(db, cluster):
    with psycopg.connect(db, autocommit=True) as a, psycopg.connect(db, autocommit=True) as b, \
            psycopg.connect(db, autocommit=True, options="-c pg_llm.shared_weights=off") as off:
        model, weights = make_model(a, WIDE)
        before_b, before_off = rss_anon(pid_of(b)), rss_anon(pid_of(off))
        la, lb, loff = logits(a, model), logits(b, model), logits(off, model)
        # the same numbers from the shared copy as from a private one
        assert np.array_equal(la, lb) and np.array_equal(la, loff)

        [(v, path, backends)] = copies(a, model)
        assert v == version(a, model) and backends == 2
        assert mapped(pid_of(a)) == mapped(pid_of(b)) == [path]
        assert files(cluster.data).count(Path(path).name) == 1
        # the second backend's private memory grew by far less than the weights; off, by all of them
        assert rss_anon(pid_of(b)) - before_b < weights / 4
        assert mapped(pid_of(off)) == []
        assert rss_anon(pid_of(off)) - before_off >= weights
        # changing the setting applies from the next call
        off.execute("SET pg_llm.shared_weights = on")
        assert np.array_equal(logits(off, model), la)
        assert mapped(pid_of(off)) == [path]


def test_a_new_version_replaces_the_copy_in_sessions_already_connected(db, cluster):
    dataset = ("INSERT INTO llm_dataset (tokens, target) SELECT array(SELECT (i * 7 + j) % 100 FROM generate_series(0, 15) j), "
               "array(SELECT (i * 7 + j + 1) % 100 FROM generate_series(0, 15) j) FROM generate_series(1, 4) i")
    with psycopg.connect(db, autocommit=True) as s, psycopg.connect(db, autocommit=True) as w:
        model, _ = make_model(w)
        w.execute(dataset)
        old = logits(s, model)
        [(_, first, _)] = copies(s, model)

        # an import (any write to llm_param) on another connection
        w.execute("UPDATE llm_param SET data = decode(repeat('0000003f', 64), 'hex') "
                  "WHERE model = %s AND name = 'ln_f.bias'", (model,))
        new = logits(s, model)
        assert not np.array_equal(new, old) and np.array_equal(new, private_logits(db, model))
        [(v, second, _)] = copies(s, model)
        assert v == version(s, model) and mapped(pid_of(s)) == [second]
        assert Path(first).name not in files(cluster.data)

        # training: the trainer had the shared copy mapped and writes into a private one
        assert np.array_equal(logits(w, model), new)
        w.execute("SELECT llm_train(%s, 2, batch_size => 2, lr_max => 0.01, warmup => 0)", (model,))
        assert mapped(pid_of(w)) == []
        trained = logits(w, model)
        assert np.array_equal(logits(s, model), trained)
        [(v, third, _)] = copies(s, model)
        assert v == version(s, model) and mapped(pid_of(s)) == [third]
        assert files(cluster.data).count(Path(second).name) == 0
        assert np.array_equal(trained, private_logits(db, model))


def test_weights_changed_in_the_transaction_are_never_shared(db):
    with psycopg.connect(db, autocommit=True) as conn:
        model, _ = make_model(conn)
        shared = logits(conn, model)
        [(v0, path, _)] = copies(conn, model)
        with conn.transaction(force_rollback=True):
            conn.execute("UPDATE llm_param SET data = decode(repeat('0000003f', 64), 'hex') "
                         "WHERE model = %s AND name = 'ln_f.bias'", (model,))
            changed = logits(conn, model)
            assert not np.array_equal(changed, shared)
            assert mapped(pid_of(conn)) == [] and [c[0] for c in copies(conn, model)] == [v0]
            assert np.array_equal(logits(conn, model), changed)
        assert np.array_equal(logits(conn, model), shared)
        assert copies(conn, model)[0][:2] == (v0, path) and mapped(pid_of(conn)) == [path]


def test_cancel_during_the_build_leaves_nothing_and_a_waiter_builds(db, cluster):
    with psycopg.connect(db, autocommit=True) as admin:
        model, _ = make_model(admin)
        expected = private_logits(db, model)
        admin.execute("SELECT pg_advisory_lock(%s)", (PAUSE_LOCK,))
        builder = paused_builder(db, admin, model)
        waiter = Call(db, "SELECT llm_logits('{1,2,3}', %s)", (model,))
        wait_for(lambda: admin.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                       (waiter.pid,)).fetchone()[0] == "Extension", "the waiter to wait for the builder")
        assert copies(admin, model) == []
        admin.execute("SELECT pg_cancel_backend(%s)", (builder.pid,))
        builder.join(60)
        assert isinstance(builder.error, psycopg.errors.QueryCanceled)
        waiter.join(60)
        admin.execute("SELECT pg_advisory_unlock(%s)", (PAUSE_LOCK,))
        assert waiter.error is None and np.array_equal(np.array(waiter.result, dtype=np.float32), expected)
        [(_, path, _)] = copies(admin, model)
        # the cancelled backend goes on, on the waiter's copy
        assert np.array_equal(logits(builder.conn, model), expected)
        assert mapped(builder.pid) == [path]
        builder.close()
        waiter.close()


@pytest.mark.parametrize("damage", ["header", "size"])
def test_a_damaged_copy_is_rebuilt(db, cluster, damage):
    with psycopg.connect(db, autocommit=True) as conn:
        model, _ = make_model(conn)
        expected = logits(conn, model)
        [(_, path, _)] = copies(conn, model)
        built = conn.execute("SELECT built_at FROM pg_llm_weight_cache() WHERE path = %s", (path,)).fetchone()
    target = cluster.data / path  # no backend maps it any more
    if damage == "header":
        with open(target, "r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 8)
    else:
        os.truncate(target, target.stat().st_size - 4096)
    with psycopg.connect(db, autocommit=True) as conn:
        assert np.array_equal(logits(conn, model), expected)
        [(_, again, _)] = copies(conn, model)
        assert again == path and mapped(pid_of(conn)) == [path]
        assert conn.execute("SELECT built_at FROM pg_llm_weight_cache() WHERE path = %s", (path,)).fetchone() > built


def test_server_status_shows_the_cache(db, cli):
    with psycopg.connect(db, autocommit=True) as conn:
        model, _ = make_model(conn)
        logits(conn, model)
        result = cli("server", "status", "--json")
        cache = json.loads(result.output)["weight_cache"]
        assert cache["shared_weights"] == "on" and cache["size_limit"]
        [copy] = [c for c in cache["copies"] if c["model"] == model]
        assert copy["format"] == "float32" and copy["backends"] == 1 and copy["bytes"] > 0
        assert copy["weights_version"] == version(conn, model)
        text = cli("server", "status").output
        assert "weight cache" in text and model in text


# ---- on a server of its own: crash recovery, settings, permissions, pg_basebackup ------------

@pytest.fixture(scope="module")
def own():
    home = make_home("pgllm-wc-")
    c = Cluster(home)
    try:
        c.start()
        build_and_install(c.pg_config)
        with psycopg.connect(c.dsn(), autocommit=True) as conn:
            create_or_update(conn)
        yield c
    finally:
        c.stop()
        shutil.rmtree(home, ignore_errors=True)


def wait_until_up(c: Cluster):
    def up():
        try:
            with psycopg.connect(c.dsn(), connect_timeout=5) as conn:
                return conn.execute("SELECT NOT pg_is_in_recovery()").fetchone()[0]
        except psycopg.OperationalError:
            return False

    wait_for(up, "the server to restart")


def test_a_builder_killed_halfway_leaves_no_usable_file_and_copies_survive_restarts(own):
    dsn = own.dsn()
    with psycopg.connect(dsn, autocommit=True) as admin:
        kept, _ = make_model(admin)
        logits(admin, kept)
        [(_, kept_path, _)] = copies(admin, kept)
        built_at = admin.execute("SELECT built_at FROM pg_llm_weight_cache() WHERE path = %s", (kept_path,)).fetchone()
        model, _ = make_model(admin)
        expected = private_logits(dsn, model)
        admin.execute("SELECT pg_advisory_lock(%s)", (PAUSE_LOCK,))
        builder = paused_builder(dsn, admin, model)
        before = files(own.data)
        os.kill(builder.pid, signal.SIGKILL)
    builder.close()
    wait_until_up(own)  # the postmaster reinitialised after the crash and ran its startup cleanup

    assert files(own.data) == before and kept_path.split("/")[1] in before
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert copies(conn, model) == []
        assert np.array_equal(logits(conn, model), expected)
        assert len(copies(conn, model)) == 1
        # the other copy was kept, not rebuilt
        assert conn.execute("SELECT built_at FROM pg_llm_weight_cache() WHERE path = %s", (kept_path,)).fetchone() == built_at
        logits(conn, kept)
        assert mapped(pid_of(conn)) == [kept_path]


def set_cache_size(conn, value: str):
    conn.execute(f"ALTER SYSTEM SET pg_llm.weight_cache_size = '{value}'")
    conn.execute("SELECT pg_reload_conf()")

    def applied():
        with psycopg.connect(conn.info.dsn, autocommit=True) as c:
            c.execute("SELECT pg_llm_version()")  # loads pg_llm: its settings are defined
            return c.execute("SHOW pg_llm.weight_cache_size").fetchone()[0] == value

    wait_for(applied, f"pg_llm.weight_cache_size = {value}")


def test_the_cache_is_bounded_least_recently_used_first_skipping_copies_in_use(own):
    dsn = own.dsn()
    with psycopg.connect(dsn, autocommit=True) as admin:
        a, b, c, d, e, z = (make_model(admin)[0] for _ in range(6))
        try:
            set_cache_size(admin, "0")
            logits(admin, z)  # evicts every copy no backend uses, and does not fit itself
            close(admin)
            assert files(own.data) == []
            admin = psycopg.connect(dsn, autocommit=True)
            set_cache_size(admin, "6MB")  # two 2.6 MB copies fit, not three
            holder = psycopg.connect(dsn, autocommit=True)
            logits(holder, a)  # a stays mapped: in use
            for m in (b, c):  # c finds no room: a is the least recently used but in use, so b goes
                conn = psycopg.connect(dsn, autocommit=True)
                logits(conn, m)
                close(conn)
            assert [len(copies(admin, m)) for m in (a, b, c)] == [1, 0, 1]
            close(holder)
            conn = psycopg.connect(dsn, autocommit=True)
            logits(conn, d)  # a, now unused and the least recently used, goes
            close(conn)
            assert [len(copies(admin, m)) for m in (a, b, c, d)] == [0, 0, 1, 1]

            set_cache_size(admin, "1MB")
            with psycopg.connect(dsn, autocommit=True) as conn:
                notices = watch_notices(conn)
                assert np.array_equal(logits(conn, e), private_logits(dsn, e))
                assert copies(conn, e) == [] and mapped(pid_of(conn)) == []
                assert any("private copy" in primary and "weight_cache_size" in hint for primary, _, hint in notices)
        finally:
            set_cache_size(admin, "16GB")
            admin.close()


@pytest.mark.skipif(not is_root(), reason="makes the server's directory read-only as root")
def test_an_unwritable_cache_directory_falls_back_to_a_private_copy(own):
    dsn = own.dsn()
    cache = own.data / CACHE
    with psycopg.connect(dsn, autocommit=True) as conn:
        model, _ = make_model(conn)
        logits(conn, make_model(conn)[0])  # the directory exists
        mode = cache.stat().st_mode
        os.chmod(cache, 0o500)
        try:
            notices = watch_notices(conn)
            assert np.array_equal(logits(conn, model), private_logits(dsn, model))
            assert copies(conn, model) == [] and mapped(pid_of(conn)) == []
            assert any("Permission denied" in detail for _, detail, _ in notices)
        finally:
            os.chmod(cache, mode)


def test_pg_basebackup_leaves_the_cache_out(own):
    with psycopg.connect(own.dsn(), autocommit=True) as conn:
        model, _ = make_model(conn)
        logits(conn, model)
        assert files(own.data)
    target = own.home / f"backup-{uuid.uuid4().hex[:6]}"
    target.mkdir(mode=0o700)
    if is_root():
        os.chown(target, own.server_user.pw_uid, own.server_user.pw_gid)
    proc = subprocess.run(own._as_server_user([str(own.bindir / "pg_basebackup"), "-D", str(target), "-X", "none",
                                                "-c", "fast", "-h", str(own.run_dir), "-p", str(own.port), "-U", own.role]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (target / "PG_VERSION").exists()
    assert not [p for p in target.rglob("*") if "pgsql_tmp" in p.name]
    shutil.rmtree(target, ignore_errors=True)
