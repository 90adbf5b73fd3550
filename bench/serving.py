"""Serving many connections: one shared copy of the weights beside per-backend private copies.

    .venv/bin/python -m bench.serving [--dsn DSN] [--connections 8] [--threads 2] [--repeat 3]
                                      [--shape small|medium|large|xl] [--modes shared,private]

A GPT-2 model of --shape (small: 12 layers, 12 heads, 768, 1024 positions, 50257 tokens, 124M
parameters; medium, large, xl as bench.decode's SHAPES) made with llm_init. Without --dsn a private PostgreSQL server is started in a temporary folder, as the
tests do. In one run, for each mode (pg_llm.shared_weights on: every backend maps the server's one
copy; off: each backend loads its own from llm_param, as before the shared copy existed):
  - build: the first llm_logits of a new backend when the server holds no copy yet;
  - first call: the time of the first llm_logits (one token) in each of --connections new backends,
    once the copy exists (the connection itself not counted), median and worst, beside the
    second call in the same backends (the compute alone), and the time the backend itself spent
    getting the weights (mapping the copy, or loading its own; from its DEBUG1 message);
  - memory: the sum over those backends, each after its one llm_logits, of their proportional
    resident memory (Pss in /proc/PID/smaps_rollup: pages shared by k processes count 1/k in
    each), beside the size of the weights; and of their private memory (RssAnon);
  - decode tokens/s: 64 greedy tokens with the key/value cache after a 16-token prompt, as
    bench.inference measures it, best of --repeat, the modes interleaved.
--modes shared alone measures a model whose per-backend copies would not fit in memory (four xl
backends with private copies need 4 x 6.2 GB).
Memory is read from /proc, so only when the server runs on this machine.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import psycopg

from bench.common import server
from bench.decode import SHAPES

N_POSITIONS, VOCAB = 1024, 50257
PROMPT = list(range(1000, 1016))
NEW_TOKENS = 64
MODES = {"shared": "on", "private": "off"}
MODEL = "bench-serving-gpt2-small"  # main() names it after --shape
LOADED = re.compile(r'^pg_llm: model ".*" \(weights_version \d+(?:, [^)]*)?\) from .* in ([0-9.]+) ms$')


def proc_kb(pid: int, path: str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def connect(dsn: str, shared: str, threads: int) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True, options=f"-c pg_llm.shared_weights={shared} "
                           f"-c pg_llm.threads={threads} -c client_min_messages=debug1")
    conn.load_ms = []  # the backend's own time to get the weights (its DEBUG1 message)
    conn.add_notice_handler(lambda d: conn.load_ms.append(float(LOADED.search(d.message_primary or "")[1]))
                            if LOADED.search(d.message_primary or "") else None)
    return conn


def logits(conn: psycopg.Connection) -> float:
    """The time of llm_logits on one token (one step's worth of compute)."""
    start = time.perf_counter()
    conn.execute("SELECT llm_logits('{1}', %s)", (MODEL,)).fetchone()
    return time.perf_counter() - start


def decode(conn: psycopg.Connection) -> float:
    gen = "SELECT llm_generate_tokens(%s, %s, 0, model => %s)"

    def timed(n):
        start = time.perf_counter()
        conn.execute(gen, (PROMPT, n, MODEL)).fetchone()
        return time.perf_counter() - start

    return NEW_TOKENS / (timed(NEW_TOKENS + 1) - timed(1))


def connections(dsn: str, shared: str, args) -> dict:
    conns = [connect(dsn, shared, args.threads) for _ in range(args.connections)]
    try:
        times = [logits(c) for c in conns]
        warm = [logits(c) for c in conns]
        load = [ms for c in conns for ms in c.load_ms]
        pids = [c.info.backend_pid for c in conns]
        pss = [proc_kb(pid, "smaps_rollup", "Pss") for pid in pids]
        anon = [proc_kb(pid, "status", "RssAnon") for pid in pids]
    finally:
        for c in conns:
            c.close()
    return {"first": times, "warm": warm, "load": load, "pss": None if None in pss else sum(pss), "anon": None if None in anon else sum(anon)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="an existing server with pg_llm (default: a private temporary one)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--modes", default=",".join(MODES), help="shared, private or both")
    args = parser.parse_args()
    global MODEL
    MODEL = f"bench-serving-gpt2-{args.shape}"
    modes = {m: MODES[m] for m in args.modes.split(",")}

    with server(args.dsn) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))
            print(f"making {MODEL} with llm_init ...", flush=True)
            params = conn.execute("SELECT llm_init(%s, %s, %s, %s, %s, %s)",
                                  (MODEL, *SHAPES[args.shape], N_POSITIONS, VOCAB)).fetchone()[0]
        weights = params * 4
        try:
            results = {}
            for mode, shared in modes.items():
                with connect(dsn, shared, args.threads) as conn:
                    build = logits(conn)
                results[mode] = connections(dsn, shared, args) | {"build": build}
            rates = {mode: [] for mode in modes}
            conns = {mode: connect(dsn, shared, args.threads) for mode, shared in modes.items()}
            try:
                for mode, c in conns.items():
                    logits(c)
                for _ in range(args.repeat):
                    for mode, c in conns.items():
                        rates[mode].append(decode(c))
            finally:
                for c in conns.values():
                    c.close()
            with psycopg.connect(dsn, autocommit=True) as conn:
                cache = conn.execute("SELECT bytes FROM pg_llm_weight_cache() WHERE model = %s", (MODEL,)).fetchall()
        finally:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))

    n = args.connections
    print(f"\nGPT-2 {args.shape} ({params / 1e6:.0f}M parameters, {weights / 2**20:.0f} MB of weights), "
          f"{n} connections that each ran one llm_logits, {args.threads} threads")
    print(f"shared copy: {cache[0][0] / 2**20:.0f} MB in the data directory\n" if cache else "")
    print(f"{'':34}" + "".join(f"{m:>12}" for m in modes))
    row = lambda label, f: print(f"{label:34}" + "".join(f"{f(results[m]):>12}" for m in modes))
    row("first call, no copy yet (s)", lambda r: f"{r['build']:.3f}")
    row(f"first call, median of {n} (ms)", lambda r: f"{1000 * statistics.median(r['first']):.0f}")
    row(f"first call, worst of {n} (ms)", lambda r: f"{1000 * max(r['first']):.0f}")
    row(f"second call, median of {n} (ms)", lambda r: f"{1000 * statistics.median(r['warm']):.0f}")
    row("  first minus second, median (ms)",
        lambda r: f"{1000 * statistics.median(a - b for a, b in zip(r['first'], r['warm'])):.0f}")
    row("  getting the weights, median (ms)", lambda r: f"{statistics.median(r['load']):.1f}")
    if all(r["pss"] is not None for r in results.values()):
        row(f"sum of Pss over {n} (MB)", lambda r: f"{r['pss'] / 2**20:.0f}")
        row("  / the weights", lambda r: f"{r['pss'] / weights:.2f}x")
        row(f"sum of RssAnon over {n} (MB)", lambda r: f"{r['anon'] / 2**20:.0f}")
    else:
        print("(memory not shown: the server is not on this machine)")
    print(f"{'decode tok/s (16+64), best of ' + str(args.repeat):34}"
          + "".join(f"{max(rates[m]):>12.1f}" for m in modes))


if __name__ == "__main__":
    main()
