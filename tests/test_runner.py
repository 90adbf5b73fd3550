"""Continuous batching across sessions: the model's batch runner (ext/src/runner.c).

Sessions that generate with the same model at the same time hand their forward passes to one
background worker, which runs them in shared steps. Nothing a caller sees may change: every
session's text is compared for exact equality with what it computes alone
(pg_llm.batch_sessions = 0), greedy and seeded. The runner is paused with SIGSTOP (the suite runs
as root, the server as postgres) to hold sessions in a known state, waiting in the runner, rather
than racing a clock: a cancel there ends only that statement, and a runner that exits ends its
waiting sessions' statements with an error instead of leaving them hanging.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid

import psycopg
import pytest

from pgllm.cluster import is_root

from .test_batch import PROMPTS, SAMPLING, eot_biased_model
from .test_pool import BUDGET, session_threads
from .weights import store_hf_model, write_gpt2_tokenizer

GENERATE = "SELECT llm_generate(%s, %s, %s, %s, %s, %s, %s)"


@pytest.fixture(scope="module")
def model(pg):
    name = f"runner-{uuid.uuid4().hex[:8]}"
    store_hf_model(pg, name, eot_biased_model())
    write_gpt2_tokenizer(pg, name)
    yield name
    pg.execute("DELETE FROM llm_model_config WHERE model = %s", (name,))
    pg.execute("DELETE FROM llm_bpe_merges WHERE model = %s", (name,))
    pg.execute("DELETE FROM llm_bpe_vocab WHERE model = %s", (name,))


def args(prompt, name, max_tokens=20, seeded=False):
    if seeded:
        return (prompt, max_tokens, SAMPLING["temperature"], SAMPLING["topk"], SAMPLING["topp"], name, 77)
    return (prompt, max_tokens, 0.0, 50, 0.95, name, None)


def alone(pg, a):
    pg.execute("SET pg_llm.batch_sessions = 0")
    try:
        return pg.execute(GENERATE, a).fetchone()[0]
    finally:
        pg.execute("RESET pg_llm.batch_sessions")


def runner(pg, name):
    """(pid, sequences, steps, rows) of the model's runner, or None."""
    return pg.execute("SELECT pid, sequences, steps, rows FROM pg_llm_batch_runners() WHERE model = %s",
                      (name,)).fetchone()


@contextlib.contextmanager
def held_runner(dsn, name):
    """The model's runner, kept from exiting when idle by a stream left open in a cursor; its pid."""
    with psycopg.connect(dsn) as c:
        c.execute("DECLARE held CURSOR FOR SELECT (llm_generate_stream('Hello', 100, 0, model => %s)).token",
                  (name,))
        c.execute("FETCH 1 FROM held")
        yield c.execute("SELECT pid FROM pg_llm_batch_runners() WHERE model = %s", (name,)).fetchone()[0]


def wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def in_runner_wait(pg, pid):
    """The session is waiting for its runner (latch wait of an extension)."""
    return pg.execute("SELECT wait_event = 'Extension' AND state = 'active' FROM pg_stat_activity WHERE pid = %s",
                      (pid,)).fetchone()[0] is True


def run_together(dsn, calls):
    """Each (sql, params) in its own session, released at once; returns results (or exceptions)."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in calls]
    barrier = threading.Barrier(len(calls))
    out = [None] * len(calls)

    def go(i):
        sql, params = calls[i]
        barrier.wait()
        try:
            out[i] = conns[i].execute(sql, params).fetchone()[0]
        except Exception as e:  # noqa: BLE001 - returned to the test
            out[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    return out


def test_concurrent_sessions_get_exactly_their_solo_results(pg, dsn, model):
    calls = [(GENERATE, args(p, model, seeded=i % 2 == 1)) for i, p in enumerate(PROMPTS[:8])]
    expected = [alone(pg, a) for _, a in calls]
    assert len(set(expected)) > 4
    assert runner(pg, model) is None or True  # a runner may be left from another test
    # Sessions really share steps once they overlap: repeat until a step served two of them (on a
    # fast or a slow machine alike, the sessions overlap in some round).
    for _ in range(50):
        assert run_together(dsn, calls) == expected
        r = runner(pg, model)
        assert r is not None, "no batch runner served the sessions"
        if r[3] > r[2]:
            break
    else:
        pytest.fail(f"the runner never stepped two sequences at once: {r}")
    assert r[1] >= len(calls)


def test_a_stream_is_unchanged_and_gives_its_slot_back(pg, model):
    """The stream's rows concatenate to the solo text; the slot is given back when it ends."""
    a = args("Once upon a time there was", model, 16, seeded=True)
    solo = alone(pg, a)
    rows = pg.execute("SELECT token, text, is_complete FROM llm_generate_stream(%s, %s, %s, %s, %s, %s, %s)",
                      a).fetchall()
    assert "".join(r[0] for r in rows) == solo and rows[-1][1:] == (solo, True)
    wait_for(lambda: pg.execute("SELECT active FROM pg_llm_batch_runners() WHERE model = %s",
                                (model,)).fetchone() in (None, (0,)), "the stream's slot to be free")
    # a stream left early (a cursor closed after two rows) gives its slot back too
    with pg.transaction():
        # in the select list, rows come one per call (a function in FROM runs to its end first)
        pg.execute("DECLARE s CURSOR FOR SELECT (llm_generate_stream(%s, %s, %s, %s, %s, %s, %s)).token", a)
        assert len(pg.execute("FETCH 2 FROM s").fetchall()) == 2
        wait_for(lambda: pg.execute("SELECT active FROM pg_llm_batch_runners() WHERE model = %s",
                                    (model,)).fetchone() == (1,), "the open stream's slot in use")
        pg.execute("CLOSE s")
    wait_for(lambda: pg.execute("SELECT active FROM pg_llm_batch_runners() WHERE model = %s",
                                (model,)).fetchone() in (None, (0,)), "the cursor's slot to be free")


def test_an_open_stream_survives_the_session_switching_runners(pg, model):
    """A cursor's stream keeps its runner mapped while the session's other calls look elsewhere
    (here a call at another kernel level, which no runner of this level serves)."""
    a = args("Once upon a time there was", model, 16, seeded=True)
    solo = alone(pg, a)
    with pg.transaction():
        pg.execute("DECLARE s CURSOR FOR SELECT (llm_generate_stream(%s, %s, %s, %s, %s, %s, %s)).token", a)
        first = pg.execute("FETCH 2 FROM s").fetchall()
        pg.execute("SET pg_llm.simd = portable")
        pg.execute(GENERATE, args("Hello", model))
        pg.execute("RESET pg_llm.simd")
        rest = pg.execute("FETCH ALL FROM s").fetchall()
    assert "".join(r[0] for r in first + rest) == solo


def test_the_setting_turns_it_off(pg, dsn, model):
    a = args("Hello", model)
    with held_runner(dsn, model):
        text = pg.execute(GENERATE, a).fetchone()[0]
        before = runner(pg, model)
        pg.execute("SET pg_llm.batch_sessions = 0")
        try:
            assert pg.execute(GENERATE, a).fetchone()[0] == text
        finally:
            pg.execute("RESET pg_llm.batch_sessions")
        assert runner(pg, model)[1] == before[1]  # no sequence went to the runner
        assert pg.execute(GENERATE, a).fetchone()[0] == text
        assert runner(pg, model)[1] == before[1] + 1  # and back on


def test_a_runner_without_sequences_leaves_the_cores_to_sessions_computing_alone(pg, dsn, model):
    """The runner counts in the server's thread budget (threads.c) while it has sequences, and
    has no transaction whose end would say it stopped: before, it counted for 2 s after its last
    step, and a session computing alone just after a burst of generation got half its threads."""
    pg.execute(GENERATE, args("Hello", model)).fetchone()
    wait_for(lambda: pg.execute("SELECT coalesce(max(active), 0) FROM pg_llm_batch_runners()").fetchone()[0] == 0,
             "the runners to have no sequence")
    with psycopg.connect(dsn, autocommit=True) as b:
        b.execute(BUDGET)
        assert session_threads(b) == 8  # the session alone: all of the budget


def test_a_session_on_other_kernels_computes_alone(pg, dsn, model):
    """Results depend on the kernels' SIMD level: a runner serves the sessions of its own level."""
    a = args("The weather today", model)
    with held_runner(dsn, model) as pid:
        before = runner(pg, model)
        pg.execute("SET pg_llm.simd = portable")
        try:
            portable = pg.execute(GENERATE, a).fetchone()[0]
            with_runner_off = alone(pg, a)
        finally:
            pg.execute("RESET pg_llm.simd")
        assert portable == with_runner_off
        assert runner(pg, model) == before  # the runner (level auto) served nothing of it
        assert pid == before[0]


needs_root = pytest.mark.skipif(not is_root(), reason="signals the server's processes (runs as root only)")


@needs_root
def test_a_cancelled_session_leaves_the_others_running(pg, dsn, model):
    a, b = args("The quick brown fox jumps", model, 40), args("Tables and rows", model, 40, seeded=True)
    expected_b = alone(pg, b)
    with held_runner(dsn, model) as pid:
        cancel_while_waiting(pg, dsn, model, pid, a, b, expected_b)


def cancel_while_waiting(pg, dsn, model, pid, a, b, expected_b):
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(2)]
    pids = [c.info.backend_pid for c in conns]
    out = [None, None]

    def go(i, params):
        try:
            out[i] = conns[i].execute(GENERATE, params).fetchone()[0]
        except Exception as e:  # noqa: BLE001
            out[i] = e

    os.kill(pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=go, args=(0, a)), threading.Thread(target=go, args=(1, b))]
        for t in threads:
            t.start()
        wait_for(lambda: all(in_runner_wait(pg, p) for p in pids), "both sessions to wait for the runner")
        pg.execute("SELECT pg_cancel_backend(%s)", (pids[0],))
        threads[0].join(timeout=60)
        assert not threads[0].is_alive(), "the cancelled session did not return"
        assert isinstance(out[0], psycopg.errors.QueryCanceled)
    finally:
        os.kill(pid, signal.SIGCONT)
    threads[1].join()
    assert out[1] == expected_b
    assert conns[0].execute(GENERATE, a).fetchone()[0] == alone(pg, a)  # the cancelled session serves again
    for c in conns:
        c.close()


@needs_root
def test_a_runner_that_exits_ends_its_sessions_statements_and_a_new_one_starts(pg, dsn, model):
    a = args("Why?", model, 40)
    expected = alone(pg, a)
    conn = psycopg.connect(dsn, autocommit=True)
    out = []
    with held_runner(dsn, model) as pid:
        stop_runner_while_waiting(pg, conn, a, pid, out)
    assert isinstance(out[0], psycopg.errors.ObjectNotInPrerequisiteState)
    assert "batch runner" in str(out[0]) and "stopped" in str(out[0])
    # the next call starts a new runner and gets the solo result
    assert conn.execute(GENERATE, a).fetchone()[0] == expected
    with held_runner(dsn, model) as new_pid:
        assert new_pid != pid
    conn.close()


def stop_runner_while_waiting(pg, conn, a, pid, out):
    os.kill(pid, signal.SIGSTOP)
    try:
        t = threading.Thread(target=lambda: out.append(_try(conn, a)))
        t.start()
        wait_for(lambda: in_runner_wait(pg, conn.info.backend_pid), "the session to wait for the runner")
        os.kill(pid, signal.SIGTERM)
    finally:
        os.kill(pid, signal.SIGCONT)
    t.join(timeout=120)
    assert not t.is_alive(), "the session hangs after its runner exited"


def _try(conn, a):
    try:
        return conn.execute(GENERATE, a).fetchone()[0]
    except Exception as e:  # noqa: BLE001
        return e


def test_sessions_with_different_adapters_share_steps_and_get_their_solo_results(pg, dsn, model):
    """LoRA adapters in the runner: sessions with adapters a, b and none share its steps, and each gets
    exactly what it computes alone with its adapter; an adapter changed between calls is the new one."""
    import numpy as np

    rng = np.random.default_rng(4)
    for name in ("run-a", "run-b"):
        pg.execute("SELECT llm_adapter_drop(%s)", (name,))
        pg.execute("SELECT llm_adapter_create(%s, %s, rank => 4, targets => ARRAY['attn.c_attn', 'mlp.c_fc'])",
                   (name, model))
        for (tensor, shape) in pg.execute("SELECT name, shape FROM llm_adapter_param WHERE adapter = %s "
                                          "AND name LIKE '%%lora_B'", (name,)).fetchall():
            pg.execute("UPDATE llm_adapter_param SET data = %s WHERE adapter = %s AND name = %s",
                       ((0.5 * rng.standard_normal(shape)).astype("<f4").tobytes(), name, tensor))
    with_adapter = GENERATE.replace("%s)", "%s, adapter => %s)")
    adapters = ["run-a", "run-b", None, "run-a", "run-b", None]
    calls = [(with_adapter, (*args(p, model, seeded=i % 2 == 1), a)) for i, (p, a) in enumerate(zip(PROMPTS, adapters))]

    def solo(params):
        pg.execute("SET pg_llm.batch_sessions = 0")
        try:
            return pg.execute(with_adapter, params).fetchone()[0]
        finally:
            pg.execute("RESET pg_llm.batch_sessions")

    expected = [solo(p) for _, p in calls]
    assert expected[0] != expected[2] != expected[1], "the adapters change the texts"
    before = runner(pg, model)
    for _ in range(50):
        assert run_together(dsn, calls) == expected
        r = runner(pg, model)
        assert r is not None, "no batch runner served the sessions"
        if before is None or r[0] != before[0]:
            before = (r[0], 0, 0, 0)
        if r[3] - before[3] > r[2] - before[2]:
            break
    else:
        pytest.fail(f"the runner never stepped two sequences at once: {r}")
    # a changed adapter is another file: the runner computes with the new values
    pg.execute("UPDATE llm_adapter_param SET data = (SELECT data FROM llm_adapter_param WHERE adapter = 'run-b' "
               "AND name = 'h.0.attn.c_attn.lora_B') WHERE adapter = 'run-a' AND name = 'h.0.attn.c_attn.lora_B'")
    assert run_together(dsn, calls[:1]) == [solo(calls[0][1])]
    for name in ("run-a", "run-b"):
        pg.execute("SELECT llm_adapter_drop(%s)", (name,))
