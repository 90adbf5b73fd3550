"""Standalone C programs over the extension's kernels (no server): the kernel test and benchmark.

The kernel objects are compiled by the extension's own Makefile (PGXS, out of tree, against the
server headers of `pg_config --includedir-server`), so they carry exactly the flags the extension
is built with; the program's main() supplies what the rest of the extension would
(llm_num_threads) and is linked with them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from pgllm.cluster import find_system_pg_config
from pgllm.extension import source_dir

KERNEL_OBJECTS = ("src/gemv.o", "src/gemv_portable.o", "src/gemv_avx2.o", "src/gemv_avx512.o", "src/parallel.o")


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
