#!/usr/bin/env python3
"""The engine's dependencies, read from a build: which file calls which, and the cycles.

    python3 ext/tools/deps.py [BUILD_DIR]      (default: a fresh build of ext/ in a temporary folder)

Every object file's undefined symbols are matched with the object that defines them (`nm`), so the
picture is what the linker sees, not what the headers say. Prints, per source file, the files it
calls into; then the same per folder (subsystem) of ext/src; then every cycle between files and
between folders (strongly connected components of more than one node), and whether the compute
layer (ext/src/compute) calls PostgreSQL. Exit status 1 when a folder cycle exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

EXT = Path(__file__).resolve().parent.parent
SRC = EXT / "src"


def build(pg_config: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix="pg_llm-deps-"))
    subprocess.run(["make", "-s", "-C", str(out), "-f", str(EXT / "Makefile"), f"VPATH={EXT}",
                    f"PG_CONFIG={pg_config}", f"-j{os.cpu_count() or 1}"], check=True, capture_output=True)
    return out


def symbols(obj: Path) -> tuple[set[str], set[str]]:
    """(defined, undefined) global symbols of an object file."""
    defined, undefined = set(), set()
    for line in subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "U":
            undefined.add(parts[1])
        elif len(parts) == 3 and parts[1] in "TDBRVWC" and parts[1].isupper():
            defined.add(parts[2])
    return defined, undefined


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    if len(sys.argv) > 1:
        build_dir = Path(sys.argv[1])
    else:
        build_dir = build(os.environ.get("PG_CONFIG", "pg_config"))
    objects = sorted(p for p in (build_dir / "src").rglob("*.o"))
    names = {o: str(o.relative_to(build_dir / "src").with_suffix(".c")) for o in objects}
    defined_by: dict[str, str] = {}
    undefined: dict[str, set[str]] = {}
    for o in objects:
        d, u = symbols(o)
        for s in d:
            defined_by[s] = names[o]
        undefined[names[o]] = u
    files: dict[str, set[str]] = defaultdict(set)
    postgres_calls: dict[str, set[str]] = defaultdict(set)
    for f, us in undefined.items():
        for s in us:
            if s in defined_by and defined_by[s] != f:
                files[f].add(defined_by[s])
            elif s not in defined_by and not s.startswith(("__", "_GLOBAL")):
                postgres_calls[f].add(s)
    folders: dict[str, set[str]] = defaultdict(set)
    for f, deps in files.items():
        for g in deps:
            a, b = (os.path.dirname(x) or "." for x in (f, g))
            if a != b:
                folders[a].add(b)

    print("== files: each calls into ==")
    for f in sorted(names.values()):
        print(f"{f}: {', '.join(sorted(files.get(f, ()))) or '-'}")
    print("\n== folders: each calls into ==")
    for a in sorted({os.path.dirname(f) or "." for f in names.values()}):
        print(f"{a}: {', '.join(sorted(folders.get(a, ()))) or '-'}")
    file_cycles, folder_cycles = components(files), components(folders)
    print(f"\n== cycles between files: {len(file_cycles)} ==")
    for c in file_cycles:
        print("  " + " <-> ".join(c))
    print(f"== cycles between folders: {len(folder_cycles)} ==")
    for c in folder_cycles:
        print("  " + " <-> ".join(c))
    compute = sorted(f for f in names.values() if f.startswith("compute/"))
    if compute:
        # the C library and the platform are fine; PostgreSQL's own functions are not
        libc = {"malloc", "free", "aligned_alloc", "memcpy", "memset", "memmove", "sqrtf", "expf", "tanhf",
                "logf", "exp", "log", "sqrt", "tanh", "pthread_create", "pthread_join", "pthread_mutex_lock",
                "pthread_mutex_unlock", "pthread_cond_wait", "pthread_cond_signal", "pthread_cond_broadcast",
                "pthread_sigmask", "sigfillset", "sched_yield", "dlopen", "dlsym", "dlerror", "dlclose"}
        pg = {f: sorted(s for s in postgres_calls[f] if s in defined_by or s[0].isupper() or "palloc" in s
                        or s in {"elog_start", "errstart", "errfinish", "pg_re_throw", "MemoryContextAlloc"})
              for f in compute}
        leaks = {f: s for f, s in pg.items() if s}
        print(f"== compute/ calls into PostgreSQL: {'no' if not leaks else leaks} ==")
    return 1 if folder_cycles else 0


if __name__ == "__main__":
    sys.exit(main())
