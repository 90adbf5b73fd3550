"""Parallel query: a table of texts scored with and without parallel workers.

    .venv/bin/python -m bench.parallel [--dsn DSN] [--rows 96] [--repeat 3] [--workers 2]

A GPT-2-small-shaped model (12 layers, 12 heads, 768, 1024 positions, 50257 tokens) with random
weights from llm_init and the bundled GPT-2 tokenizer; a table of --rows texts of 20 to 60 tokens
spread over several pages (a parallel scan hands out pages). Each round scores the whole table
(SELECT id, llm_embed(body) FROM docs, then the same with llm_perplexity) in four ways, one after
the other, in one session whose shared copies exist already:
  - serial: no workers, the backend's own threads (pg_llm.threads = 0: one per core);
  - serial, 1 thread: no workers, pg_llm.threads = 1 (one core's rate);
  - workers: --workers parallel workers, the leader only gathering; each worker takes its share
    of the server's threads (pg_llm.server_threads), as sessions do;
  - workers + leader: the same, the leader scoring rows too.
Rows/s is rows / wall time, best of --repeat rounds; every way's rows are checked equal to the
serial ones. The ratios are against serial. Without --dsn a private server is started, as the
tests do; the figures and what they predict for more cores are in docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import os
import time

import psycopg

from bench.common import load_gpt2_tokenizer, server

MODEL = "bench-parallel"
SHAPE = (12, 12, 768, 1024, 50257)
WORDS = ("the database keeps every row of the table in pages on disk and in shared buffers while "
         "a model reads its weights once per token and writes nothing at all").split()


def setup(dsn: str, rows: int, workers: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))
        conn.execute("SELECT llm_init(%s, %s, %s, %s, %s, %s, seed => 1)", (MODEL, *SHAPE))
        load_gpt2_tokenizer(conn, MODEL)
        conn.execute("DROP TABLE IF EXISTS bench_docs")
        conn.execute(f"CREATE TABLE bench_docs (id int PRIMARY KEY, body text, pad text) "
                     f"WITH (parallel_workers = {workers})")
        conn.execute("ALTER TABLE bench_docs ALTER COLUMN pad SET STORAGE PLAIN")
        with conn.cursor().copy("COPY bench_docs (id, body, pad) FROM STDIN") as copy:
            for i in range(rows):
                n = 20 + (i * 7) % 41
                copy.write_row((i, " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)), "." * 2000))
        conn.execute("ANALYZE bench_docs")


WAYS = {
    "serial": ["SET max_parallel_workers_per_gather = 0", "SET pg_llm.threads = 0"],
    "serial, 1 thread": ["SET max_parallel_workers_per_gather = 0", "SET pg_llm.threads = 1"],
    "workers": ["SET max_parallel_workers_per_gather = {w}", "SET pg_llm.threads = 0",
                "SET parallel_leader_participation = off"],
    "workers + leader": ["SET max_parallel_workers_per_gather = {w}", "SET pg_llm.threads = 0",
                         "SET parallel_leader_participation = on"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="an existing server with pg_llm (default: a private temporary one)")
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    with server(args.dsn) as dsn:
        setup(dsn, args.rows, args.workers)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for setting in ("parallel_setup_cost = 0", "parallel_tuple_cost = 0", "min_parallel_table_scan_size = 0"):
                conn.execute(f"SET {setting}")
            print(f"CPU: {os.cpu_count()} cores; load average at start: {os.getloadavg()[0]:.2f}", flush=True)
            for fn in ("llm_embed", "llm_perplexity"):
                query = f"SELECT id, {fn}(body, '{MODEL}') FROM bench_docs"
                conn.execute(f"SELECT {fn}('warm up', '{MODEL}')")
                best = {}
                expected = None
                for _ in range(args.repeat):
                    for way, settings in WAYS.items():
                        conn.execute("RESET pg_llm.threads")
                        for s in settings:
                            conn.execute(s.format(w=args.workers))
                        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + query).fetchall())
                        assert ("Gather" in plan) == way.startswith("workers"), plan
                        start = time.perf_counter()
                        rows = sorted(conn.execute(query).fetchall())
                        elapsed = time.perf_counter() - start
                        expected = expected or rows
                        if rows != expected:
                            raise SystemExit(f"{way}: rows differ from the serial plan's")
                        best[way] = min(best.get(way, float("inf")), elapsed)
                base = args.rows / best["serial"]
                print(f"\n{fn} over {args.rows} rows (rows/s, best of {args.repeat}; load average now "
                      f"{os.getloadavg()[0]:.2f})")
                for way in WAYS:
                    rate = args.rows / best[way]
                    print(f"  {way:<18} {rate:8.2f}  {rate / base:5.2f}x serial")


if __name__ == "__main__":
    main()
