"""Standalone C programs over the extension's kernels (no server): the kernel test and benchmark.

The kernel objects are compiled by the extension's own Makefile (PGXS, out of tree), so they
carry exactly the flags the extension is built with; they need nothing of PostgreSQL (the compute
layer never includes it), and the program links them as they are, setting its own thread count
(llm_compute_set_thread_source).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pgllm.cluster import find_system_pg_config
from pgllm.extension import source_dir

KERNEL_OBJECTS = ("src/compute/gemv.o", "src/compute/gemv_portable.o", "src/compute/gemv_avx2.o",
                  "src/compute/gemv_avx512.o", "src/compute/pool.o")


def build(main: Path, build_dir: Path, libs: tuple[str, ...] = ()) -> Path:
    """Compile `main` (a .c file including gemv.h), link it with the kernel objects (and `libs`); returns the binary."""
    ext = source_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["make", "-s", "-C", str(build_dir), "-f", str(ext / "Makefile"), f"VPATH={ext}",
                    f"PG_CONFIG={find_system_pg_config()}", *KERNEL_OBJECTS], check=True)
    binary = build_dir / main.stem
    subprocess.run(["gcc", "-O2", "-Wall", f"-I{ext / 'src'}", "-o", str(binary), str(main),
                    *(str(build_dir / o) for o in KERNEL_OBJECTS), *libs, "-lpthread", "-lm"], check=True)
    return binary
