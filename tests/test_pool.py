"""The worker pool (ext/src/parallel.c) under stress, outside PostgreSQL.

ext/test/pool_stress.c is built here from the pool's source and run with far more threads than
cores, on jobs of alternating sizes, every element counted: each must run exactly once, and none
after its call has returned. The outcome does not depend on the machine's speed: a correct pool
passes however the threads are scheduled. The pool before its fix (a worker could claim a share
of the next job with the old job's fields) failed about 4 runs in 5 of 200,000 jobs on the 2-core
development machine, with a run-to-run spread (from none to hundreds of bad jobs) that several
short processes cover better than one long one: 10 runs take a few seconds.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pgllm.cluster import find_system_pg_config, pg_config_values

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "ext" / "src"
THREADS = 16
JOBS = 200_000
RUNS = 10


@pytest.fixture(scope="module")
def stress(tmp_path_factory) -> Path:
    include = pg_config_values(find_system_pg_config())["includedir-server"]
    exe = tmp_path_factory.mktemp("pool") / "pool_stress"
    subprocess.run(["gcc", "-O2", "-pthread", "-Wall", "-Werror", f"-I{SRC}", f"-I{include}",
                    '-DPG_LLM_VERSION="test"', str(REPO / "ext" / "test" / "pool_stress.c"),
                    str(SRC / "parallel.c"), "-o", str(exe)], check=True)
    return exe


def two_cpus() -> None:
    """Keep the run on two cores, so that the pool is oversubscribed on any machine."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])


def test_every_share_runs_once_before_the_call_returns(stress):
    for i in range(RUNS):
        run = subprocess.run([str(stress), str(THREADS), str(JOBS)], capture_output=True,
                             text=True, preexec_fn=two_cpus)
        assert run.returncode == 0, f"run {i + 1} of {RUNS}: " + run.stdout + run.stderr
        assert f"{JOBS} jobs on {THREADS} threads: 0 jobs had a wrong count" in run.stdout
