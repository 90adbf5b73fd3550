"""Why the shared copy stays a file (docs/architecture.md): mapping a resident 500 MB weight copy
from the data directory's file system, as pg_llm does, against from /dev/shm, which is what a
named DSM segment of PostgreSQL 17+ (GetNamedDSMSegment) is: mapping and faulting every page in
(what a new backend pays), then one full read (what a decode step pays).

    python -m bench.shared_memory [DIR]    (DIR: a folder on the data directory's file system; default /tmp)
"""

from __future__ import annotations

import mmap
import os
import sys
import time

import numpy as np

SIZE = 500 << 20


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
    paths = {"file (data directory's fs)": os.path.join(folder, "pgllm-shm-bench"),
             "/dev/shm (a named DSM segment)": "/dev/shm/pgllm-shm-bench"}
    data = np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8).tobytes()
    for p in paths.values():
        with open(p, "wb") as f:
            f.write(data)
        with open(p, "rb") as f:  # resident in memory before the rounds
            f.read()
    times = {k: [] for k in paths}
    try:
        for _ in range(5):  # interleaved rounds
            for name, p in paths.items():
                start = time.perf_counter()
                fd = os.open(p, os.O_RDONLY)
                m = mmap.mmap(fd, SIZE, prot=mmap.PROT_READ)
                pages = np.frombuffer(m, dtype=np.uint8)
                int(pages[::4096].sum())  # one byte a page: every fault
                mapped = time.perf_counter()
                int(pages.sum(dtype=np.uint64))  # a full read
                read = time.perf_counter()
                del pages
                m.close()
                os.close(fd)
                times[name].append((mapped - start, read - mapped))
    finally:
        for p in paths.values():
            os.unlink(p)
    print(f"500 MB, median of 5 interleaved rounds, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for name, t in times.items():
        print(f"{name:32s} map + fault {np.median([x[0] for x in t]) * 1e3:7.1f} ms"
              f"   full read {np.median([x[1] for x in t]) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
