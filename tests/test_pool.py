"""The worker pool (ext/src/parallel.c) under stress, outside PostgreSQL; the threads that
sessions computing at once share (ext/src/threads.c), in the test server.

ext/test/pool_stress.c is built here from the pool's source and run with far more threads than
cores, on jobs of alternating sizes, every element counted: each must run exactly once, and none
after its call has returned. The outcome does not depend on the machine's speed: a correct pool
passes however the threads are scheduled. The pool before its fix (a worker could claim a share
of the next job with the old job's fields) failed about 4 runs in 5 of 200,000 jobs on the 2-core
development machine, with a run-to-run spread (from none to hundreds of bad jobs) that several
short processes cover better than one long one: 10 runs take a few seconds. Runs with `vary`
change the threads a call may use every 4 calls, so that workers park and come back.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest


REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "ext" / "src"
THREADS = 16
JOBS = 200_000
RUNS = 10


def build(out: Path, *flags: str) -> subprocess.CompletedProcess:
    """pool_stress.c with the pool as the extension has it: the compute layer builds alone (no
    PostgreSQL headers, no definitions), and the program sets its own thread count."""
    return subprocess.run(["gcc", *flags, "-pthread", "-Wall", "-Werror", f"-I{SRC}",
                           str(REPO / "ext" / "test" / "pool_stress.c"),
                           str(SRC / "compute" / "pool.c"), "-o", str(out)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def stress(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("pool") / "pool_stress"
    cc = build(exe, "-O2")
    assert cc.returncode == 0, cc.stderr
    return exe


def two_cpus() -> None:
    """Keep the run on two cores, so that the pool is oversubscribed on any machine."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])


@pytest.mark.parametrize("mode, runs", [("", RUNS), ("vary", 3)])
def test_every_share_runs_once_before_the_call_returns(stress, mode, runs):
    for i in range(runs):
        run = subprocess.run([str(stress), str(THREADS), str(JOBS), *([mode] if mode else [])],
                             capture_output=True, text=True, preexec_fn=two_cpus)
        assert run.returncode == 0, f"run {i + 1} of {runs}: " + run.stdout + run.stderr
        assert ": 0 jobs had a wrong count when the call returned, 0 at the end; 0 late runs" in run.stdout


def test_no_data_race_under_thread_sanitizer(tmp_path):
    """ThreadSanitizer judges the memory ordering itself, not the luck of one schedule: it reported
    the old pool's unordered reads of a job's fields on every run of 2,000 jobs."""
    exe = tmp_path / "pool_stress_tsan"
    cc = build(exe, "-O1", "-g", "-fsanitize=thread")
    if cc.returncode != 0:
        pytest.skip(f"no ThreadSanitizer with this gcc: {cc.stderr.strip()[-200:]}")
    for mode in ([], ["vary"]):
        run = subprocess.run([str(exe), str(THREADS), "5000", *mode], capture_output=True, text=True,
                             preexec_fn=two_cpus)
        if "unexpected memory mapping" in run.stderr:
            pytest.skip("ThreadSanitizer cannot run with this kernel's address-space layout")
        assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stdout + run.stderr[-4000:]


# ---- the server's threads, shared by the sessions computing at once -------------------------------

def session_threads(conn) -> int:
    """The threads this session would use now, as pg_llm_blas_info reports them ('lib..., N threads')."""
    return int(conn.execute("SELECT pg_llm_blas_info()").fetchone()[0].rsplit(", ", 1)[1].split()[0])


def wait_for_threads(conn, want: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (got := session_threads(conn)) != want:
        assert time.monotonic() < deadline, f"still {got} threads, not {want}, after {timeout} s"
        time.sleep(0.05)


# Any machine: the budget and the cap are set, not the cores (both sessions are superusers).
BUDGET = "SET pg_llm.threads = 8; SET pg_llm.server_threads = 8"


def test_sessions_computing_at_once_share_the_servers_threads(db):
    with psycopg.connect(db, autocommit=True) as a, psycopg.connect(db, autocommit=True) as b:
        a.execute("SELECT llm_init('budget', 2, 2, 32, 64, 256, seed => 1)")
        for c in (a, b):
            c.execute(BUDGET)
        assert session_threads(a) == 8  # alone

        # b computes without end; a's share halves while it does
        failure = []

        def compute():
            try:
                b.execute("DO $$ BEGIN LOOP PERFORM llm_logits(ARRAY[1, 2, 3], 'budget'); END LOOP; END $$")
            except psycopg.errors.QueryCanceled:
                pass
            except Exception as e:  # noqa: BLE001 - reported below
                failure.append(e)

        worker = threading.Thread(target=compute)
        worker.start()
        try:
            wait_for_threads(a, 4)
        finally:
            a.execute("SELECT pg_cancel_backend(%s)", (b.info.backend_pid,))
            worker.join()
        assert not failure
        # b's transaction ended: it no longer counts
        wait_for_threads(a, 8)

        # a session idle in its transaction after computing stops counting by itself
        b.execute("BEGIN")
        b.execute("SELECT llm_logits(ARRAY[1, 2, 3], 'budget')")
        wait_for_threads(a, 8)
        b.execute("ROLLBACK")
