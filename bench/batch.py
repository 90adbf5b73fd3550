"""Batched generation: N prompts in one llm_generate_batch call beside N single llm_generate calls.

    .venv/bin/python -m bench.batch [--dsn DSN] [--prompts 1,2,4,8] [--tokens 64] [--repeat 2]
                                    [--batch-sessions N]

A GPT-2-small-shaped model (12 layers, 12 heads, 768, 1024 positions, 50257 tokens) with random
weights from llm_init and the bundled GPT-2 tokenizer, float32, greedy, default settings (one
thread per core, pg_llm.batch_rows = 8). Without --dsn a private PostgreSQL server is started in a
temporary folder, as the tests do. For each N, in one session whose weights are loaded already,
the two ways alternate --repeat times (best of each kept):
  - singles: N llm_generate(prompt_i, --tokens) calls, one after the other;
  - batch: one llm_generate_batch(ARRAY[prompt_1 .. prompt_N], --tokens) call.
The prompts have 3 to 14 tokens. Aggregate tokens/s = N x --tokens / wall time (the random model
never draws <|endoftext|> in practice; the texts of both ways are checked equal, so both did the
same work). The ratio is batch / singles, measured in the same run. A single call decodes in the
model's batch runner (pg_llm.batch_sessions, on by default); --batch-sessions 0 makes it compute
alone in its backend, as the batch call does.
"""

from __future__ import annotations

import argparse
import os
import time

import psycopg

from bench.common import load_gpt2_tokenizer, server

MODEL = "bench-batch"
SHAPE = (12, 12, 768, 1024, 50257)
PROMPTS = ["The database", "Once upon a time, in a small village by the sea, there lived",
           "SELECT * FROM", "Batched decoding reads every weight once for all sequences",
           "Hello", "PostgreSQL is", "In 1969 the first message was sent between two computers",
           "Tables, rows and", "A model inside the server", "Why is the sky blue?",
           "def main():", "The quick brown fox jumps over the lazy dog and",
           "Rain", "Numbers: 1, 2, 3,", "Dear reader,", "Continuous batching"]


def setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))
        conn.execute("SELECT llm_init(%s, %s, %s, %s, %s, %s, seed => 1)", (MODEL, *SHAPE))
        load_gpt2_tokenizer(conn, MODEL)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(conn, n: int, tokens: int, repeat: int) -> tuple[float, float]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    single_sql = "SELECT llm_generate(%s, %s, 0, model => %s)"
    batch_sql = "SELECT text FROM llm_generate_batch(%s, %s, 0, model => %s) ORDER BY ord"
    best_single = best_batch = float("inf")
    for _ in range(repeat):
        t, singles = timed(lambda: [conn.execute(single_sql, (p, tokens, MODEL)).fetchone()[0] for p in prompts])
        best_single = min(best_single, t)
        t, rows = timed(lambda: [r[0] for r in conn.execute(batch_sql, (prompts, tokens, MODEL)).fetchall()])
        best_batch = min(best_batch, t)
        if rows != singles:
            raise SystemExit(f"batch rows differ from single calls at N={n}")
    return n * tokens / best_single, n * tokens / best_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="an existing server with pg_llm (default: a private temporary one)")
    p.add_argument("--prompts", default="1,2,4,8", help="numbers of prompts N, comma-separated")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--batch-sessions", type=int, help="SET pg_llm.batch_sessions (0: single calls compute alone)")
    args = p.parse_args()
    sizes = [int(x) for x in args.prompts.split(",")]

    with server(args.dsn) as dsn:
        setup(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            if args.batch_sessions is not None:
                conn.execute(f"SET pg_llm.batch_sessions = {int(args.batch_sessions)}")
            conn.execute("SELECT llm_logits('{1}', %s)", (MODEL,))  # load the weights: not timed
            batch_rows = conn.execute("SHOW pg_llm.batch_rows").fetchone()[0]
            batch_sessions = conn.execute("SHOW pg_llm.batch_sessions").fetchone()[0]
            print(f"\nGPT-2 small shape, float32, greedy, {args.tokens} new tokens per prompt, "
                  f"pg_llm.batch_rows = {batch_rows}, pg_llm.batch_sessions = {batch_sessions}, {os.cpu_count()} cores, "
                  f"load average {os.getloadavg()[0]:.1f}\n", flush=True)
            print(f"{'prompts':>8}{'singles tok/s':>15}{'batch tok/s':>13}{'ratio':>8}", flush=True)
            for n in sizes:
                single, batch = measure(conn, n, args.tokens, args.repeat)
                print(f"{n:8d}{single:15.1f}{batch:13.1f}{batch / single:7.2f}x", flush=True)
            conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
