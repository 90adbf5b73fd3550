"""The C harnesses under AddressSanitizer and UndefinedBehaviorSanitizer.

The kernel test (tests/gemv_test.c), the pool's stress test (ext/test/pool_stress.c) and the kernel
benchmark (bench/kernels.c), each linked with the extension's own sources compiled with
-fsanitize=address,undefined by the extension's Makefile (COPT, out of tree): an out-of-bounds
read or write, a use after free, a leak, a misaligned access or an overflow of a signed integer
stops the program with a report (-fno-sanitize-recover: nothing is only printed). Small sizes: the
sanitizers judge every access whatever its count. (ThreadSanitizer runs the pool in test_pool.py.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.cprogram import KERNEL_OBJECTS as OBJECTS  # the objects the harnesses link with
from pgllm.cluster import find_system_pg_config
from pgllm.extension import source_dir

REPO = Path(__file__).resolve().parent.parent
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g")
ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=86",
       "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=87"}


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Path:
    """ext/src's kernel objects built with the sanitizers (the Makefile's own flags, plus COPT)."""
    build = tmp_path_factory.mktemp("asan")
    ext = source_dir()
    proc = subprocess.run(["make", "-s", "-C", str(build), "-f", str(ext / "Makefile"), f"VPATH={ext}",
                           f"PG_CONFIG={find_system_pg_config()}", f"COPT={' '.join(SANITIZE)}", *OBJECTS],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return build


def link(objects: Path, main: Path, *libs: str) -> Path:
    binary = objects / main.stem
    proc = subprocess.run(["gcc", "-O1", "-Wall", *SANITIZE, f"-I{source_dir() / 'src'}", "-o", str(binary),
                           str(main), *(str(objects / o) for o in OBJECTS), *libs, "-lpthread", "-lm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return binary


def run_clean(binary: Path, *args: str, leaks: bool = True, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PG_LLM_SIMD"} | ENV
    if not leaks:
        env["ASAN_OPTIONS"] += ":detect_leaks=0"
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout, env=env)
    report = proc.stderr[-6000:]
    assert proc.returncode == 0, f"exit {proc.returncode}\n{report}"
    assert "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, report
    return proc.stdout


def test_kernel_test_is_clean(objects):
    out = run_clean(link(objects, REPO / "tests" / "gemv_test.c"))
    assert out.splitlines()[-1] == "ok"


@pytest.mark.parametrize("mode", ["", "vary"])
def test_pool_stress_is_clean(objects, mode):
    out = run_clean(link(objects, REPO / "ext" / "test" / "pool_stress.c"), "8", "2000", *([mode] if mode else []))
    assert "0 jobs had a wrong count when the call returned, 0 at the end; 0 late runs" in out


def test_kernel_benchmark_is_clean(objects):
    """Every format and page kind on a small model, a few steps each. Its buffers live as long as
    the program (a benchmark): leaks are not looked for."""
    binary = link(objects, REPO / "bench" / "kernels.c", "-lopenblas")
    for pages in ("huge", "4k", "file"):
        out = run_clean(binary, "--threads", "2", "--formats", "f32,bf16,q8,sgemm", "--rows", "1,3",
                        "--pages", pages, "--seconds", "0.05", "--layers", "2", "--d-model", "64",
                        "--vocab", "300", leaks=False)
        assert out.count("result ") == 8, out
