"""The decode kernels (ext/src/gemv.c) against plain references, at every SIMD level this CPU runs.

tests/gemv_test.c does the checking (shapes, formats, tolerances: see its header); it is linked
with the extension's own gemv*.o and parallel.o, compiled by the extension's Makefile.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.cprogram import build

HERE = Path(__file__).resolve().parent
LEVELS = ("portable", "avx2", "avx512", "avx512dot")


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    return build(HERE / "gemv_test.c", tmp_path_factory.mktemp("gemv"))


def run(program: Path, **env) -> list[str]:
    proc = subprocess.run([str(program)], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PG_LLM_SIMD"} | env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout.splitlines()


def test_every_level(program):
    lines = run(program)
    best = lines[0].removeprefix("detected ")
    assert best in LEVELS
    ran = LEVELS[:LEVELS.index(best) + 1]
    assert lines[1:] == [f"level {level} ok" for level in ran] + ["ok"]


def test_forced_portable(program):
    """PG_LLM_SIMD caps the level: the plain-C path is what a CPU without AVX runs."""
    assert run(program, PG_LLM_SIMD="portable") == ["detected portable", "level portable ok", "ok"]
