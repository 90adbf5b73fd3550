"""Concurrent sessions: aggregate generation speed with 1, 2, 4 and 8 sessions, and training beside
generation, on one server, in one run.

    .venv/bin/python -m bench.sessions [--dsn DSN] [--sessions 1,2,4,8] [--tokens 32] [--calls 2]

A GPT-2-small-shaped model (12 layers, 12 heads, 768, 1024 positions, 50257 tokens) with random
weights from llm_init, float32, every session on the default settings (pg_llm.threads = 0: one
thread per core in each backend). Without --dsn a private PostgreSQL server is started in a
temporary folder, as the tests do.
  - generating: N sessions load the weights (a first call, not timed), wait for each other, then
    each runs --calls greedy llm_generate_tokens calls of --tokens new tokens after a 16-token
    prompt. Aggregate tokens/s = all new tokens / the time from the start to the last session's
    end; the slowest and fastest session's own rate show how evenly the cores were shared. CPU
    ms/token is the CPU time the backends used (all their threads, from /proc) per new token: it
    does not depend on what else the machine runs, and it grows when threads spin or wait for
    each other instead of computing.
  - training beside generating: one session runs llm_train (batch 4 x 64) while another generates
    as above until the training ends; each beside its rate alone (training: median of the steps'
    logged tokens/s).
Every case runs twice in turn: with the default, where the sessions computing at once share the
server's threads (pg_llm.server_threads = 0: one per core in all), and "unshared", where each
session takes every core whatever the others do (pg_llm.server_threads = 4096), as before the
budget existed. --only-default skips the second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np
import psycopg

from bench.common import server

MODEL = "bench-sessions"
SHAPE = (12, 12, 768, 1024, 50257)
PROMPT = list(range(1000, 1016))
TRAIN_T = 64


def setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))
        conn.execute("SELECT llm_init(%s, %s, %s, %s, %s, %s, seed => 1)", (MODEL, *SHAPE))
        conn.execute("TRUNCATE llm_dataset RESTART IDENTITY")
        rows = np.random.default_rng(0).integers(0, SHAPE[4], size=(256, TRAIN_T + 1))
        with conn.cursor().copy("COPY llm_dataset (tokens, target) FROM STDIN") as copy:
            for r in rows:
                copy.write_row((r[:-1].tolist(), r[1:].tolist()))
        conn.execute("CHECKPOINT")


def connect(dsn: str, settings: dict[str, str]) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    for name, value in settings.items():
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    return conn


def generate(conn, tokens: int) -> None:
    conn.execute("SELECT llm_generate_tokens(%s, %s, 0, model => %s)", (PROMPT, tokens, MODEL)).fetchone()


def cpu_seconds(pids: list[int]) -> float | None:
    """CPU time (user + system, every thread) of server processes; None when not on this machine."""
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def generating(dsn: str, n: int, args, settings: dict[str, str]) -> dict:
    """n sessions generating at once: aggregate tokens/s and the slowest/fastest session's rate."""
    conns = [connect(dsn, settings) for _ in range(n)]
    for c in conns:
        generate(c, 1)  # loads the weights
    start_line = threading.Barrier(n + 1)
    ends = [0.0] * n

    def session(i: int) -> None:
        start_line.wait()
        for _ in range(args.calls):
            generate(conns[i], args.tokens)
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    pids = [c.info.backend_pid for c in conns]
    cpu = cpu_seconds(pids)
    start_line.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    cpu = cpu_seconds(pids) - cpu if cpu is not None else None
    for c in conns:
        c.close()
    per_session = args.calls * args.tokens
    return {"total": n * per_session / (max(ends) - start),
            "slowest": per_session / (max(ends) - start), "fastest": per_session / (min(ends) - start),
            "cpu_ms": 1000 * cpu / (n * per_session) if cpu is not None else float("nan")}


def train(conn, steps: int) -> float:
    """Median tokens/s of the steps of one llm_train call."""
    conn.execute("SELECT llm_train(%s, %s, lr_max => 1e-5, warmup => 1, batch_size => 4, total_steps => 100000)",
                 (MODEL, steps))
    rates = conn.execute("SELECT tokens_per_s FROM llm_train_log WHERE model = %s ORDER BY step DESC LIMIT %s",
                         (MODEL, steps)).fetchall()
    return statistics.median(r[0] for r in rates)


def training_beside_generating(dsn: str, args, settings: dict[str, str]) -> dict:
    trainer, generator = connect(dsn, settings), connect(dsn, settings)
    train(trainer, 1)  # loads the weights, creates the AdamW state
    generate(generator, 1)
    alone = train(trainer, args.train_steps)
    done = threading.Event()
    rate = {}

    def run_training():
        rate["train"] = train(trainer, args.train_steps)
        done.set()

    t = threading.Thread(target=run_training)
    t.start()
    time.sleep(1.0)  # let the training call load and start stepping
    start, made = time.perf_counter(), 0
    while not done.is_set():
        generate(generator, args.tokens)
        made += args.tokens
    rate["generate"] = made / (time.perf_counter() - start)
    t.join()
    trainer.close()
    generator.close()
    return {"train_alone": alone, **rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="an existing server with pg_llm (default: a private temporary one)")
    p.add_argument("--sessions", default="1,2,4,8")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per call")
    p.add_argument("--calls", type=int, default=2, help="timed calls per session")
    p.add_argument("--train-steps", type=int, default=8, help="steps of each timed llm_train call")
    p.add_argument("--only-default", action="store_true", help="skip the unshared runs")
    args = p.parse_args()
    counts = [int(n) for n in args.sessions.split(",")]
    variants = {"shared (default)": {}}
    if not args.only_default:
        variants["unshared"] = {"pg_llm.server_threads": "4096"}

    print(f"GPT-2-small shape, random weights; {os.cpu_count()} CPUs here, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    with server(args.dsn) as dsn:
        setup(dsn)
        print(f"\ngenerating: {args.calls} x {args.tokens} greedy tokens per session")
        print(f"  {'settings':<24} {'sessions':>8} {'total tok/s':>12} {'slowest':>8} {'fastest':>8} "
              f"{'CPU ms/token':>13}")
        for n in counts:
            for name, settings in variants.items():
                r = generating(dsn, n, args, settings)
                print(f"  {name:<24} {n:>8} {r['total']:12.1f} {r['slowest']:8.1f} {r['fastest']:8.1f} "
                      f"{r['cpu_ms']:13.1f}", flush=True)
        for name, settings in variants.items():
            r = training_beside_generating(dsn, args, settings)
            print(f"\n[{name}]  training (batch 4 x {TRAIN_T}) beside one session generating:\n"
                  f"  training {r['train']:.1f} tok/s (alone {r['train_alone']:.1f}), "
                  f"generating {r['generate']:.1f} tok/s", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
