"""What each way to several servers costs: direct, through pgpool-II, through PL/Proxy.

    .venv/bin/python -m bench.scaleout [--shape 4,4,256,256] [--calls 30] [--tokens 32] [--prompts 16]
                                       [--repeat 3]

Starts, as the tests do (tests/topology.py), a primary and two hot standbys, pgpool-II in front of
them (docs/scale-out.md's settings: reads balanced statement by statement over the standbys) and
PL/Proxy on the primary with the two standbys as partitions (ext/sql/contrib/pg_llm_plproxy.sql).
A model of --shape (n_layer, n_head, d_model, n_positions; 50257 tokens; small, so that a path's
own cost is not lost in the model's) with random weights and the bundled GPT-2 tokenizer. Every
server computes with all its threads; all of them share this machine's cores.

Rounds, each way in turn (--repeat rounds; medians over --calls calls of a round, best round):
  - per call: SELECT pg_llm_version() (nothing computed) and llm_generate(prompt, 1) greedy,
    direct to standby1, through pgpool, and through PL/Proxy (RUN ON ANY from the primary);
  - per token: (llm_generate(prompt, --tokens) - llm_generate(prompt, 1)) / (--tokens - 1), the
    same three ways, and a stream (the rows of llm_generate_stream read as they come) direct and
    through pgpool (PL/Proxy returns a part's rows when it has ended: no stream);
  - a batch: --prompts prompts in one llm_generate_batch direct on standby1, half of them there
    (one node's share), and all through llm_generate_batch_spread (half on each standby).
How the calls spread: pgpool's SELECTs per node (SHOW POOL_NODES) over the whole run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import psycopg

from bench.common import load_gpt2_tokenizer
from tests.topology import Topology

MODEL = "bench-scaleout"
PROMPT = "The servers of a cluster share the work of one batch"
PLPROXY_SQL = os.path.join(os.path.dirname(__file__), "..", "ext", "sql", "contrib", "pg_llm_plproxy.sql")


def pgpool_read_only_list() -> str:
    """docs/scale-out.md's read_only_function_list, as written there."""
    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "scale-out.md")).read()
    return re.search(r"^read_only_function_list = (.*)$", page, re.M).group(1)


def start(shape: tuple[int, ...]) -> tuple[Topology, dict]:
    t = Topology()
    p = t.start_primary()
    standbys = [t.add_standby("standby1"), t.add_standby("standby2")]
    with p.connect() as conn:
        conn.execute("SELECT llm_init(%s, %s, %s, %s, %s, 50257, seed => 1)", (MODEL, *shape))
        load_gpt2_tokenizer(conn, MODEL)
        conn.execute("CREATE EXTENSION plproxy")
        nodes = [s.libpq(options="-c client_connection_check_interval=1s").replace("'", "''") for s in standbys]
        conn.execute(f"CREATE SERVER pg_llm_nodes FOREIGN DATA WRAPPER plproxy OPTIONS (p0 '{nodes[0]}', "
                     f"p1 '{nodes[1]}')")
        conn.execute("CREATE USER MAPPING FOR PUBLIC SERVER pg_llm_nodes")
        conn.execute(open(PLPROXY_SQL).read())
        # nothing computed on the node: the path alone
        conn.execute("CREATE FUNCTION bench_version() RETURNS text LANGUAGE plproxy AS $$ "
                     "CLUSTER 'pg_llm_nodes'; RUN ON ANY; SELECT pg_llm_version(); $$")
    t.wait_for_replay(*standbys)
    pool = t.start_pgpool([p, *standbys], [0, 1, 1], {"read_only_function_list": pgpool_read_only_list()})
    dsns = {"direct": standbys[0].dsn(), "pgpool": pool.dsn(), "PL/Proxy": p.dsn()}
    return t, dsns


def median_ms(conn, query: str, params, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        conn.execute(query, params, prepare=False).fetchall()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def stream_ms_per_row(conn, tokens: int, calls: int) -> float:
    times = []
    for _ in range(calls):
        with conn.cursor() as cur:
            start = time.perf_counter()
            rows = sum(1 for _ in cur.stream("SELECT (llm_generate_stream(%s, %s, 0, model => %s)).token",
                                             (PROMPT, tokens, MODEL)))
            times.append((time.perf_counter() - start) / rows)
    return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="4,4,256,256", help="n_layer,n_head,d_model,n_positions")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))

    print("starting a primary, two standbys, pgpool-II and PL/Proxy ...", flush=True)
    topo, dsns = start(shape)
    try:
        generate = {"direct": "SELECT llm_generate(%s, %s, 0, model => %s)",
                    "pgpool": "SELECT llm_generate(%s, %s, 0, model => %s)",
                    "PL/Proxy": "SELECT llm_generate_any(%s, %s, 0, model => %s)"}
        version = {"direct": "SELECT pg_llm_version()", "pgpool": "SELECT pg_llm_version()",
                   "PL/Proxy": "SELECT bench_version()"}
        prompts = [f"{PROMPT}, part {i}" for i in range(args.prompts)]
        best: dict[str, float] = {}

        def keep(key, value):
            best[key] = min(best.get(key, float("inf")), value)

        conns = {way: psycopg.connect(dsn, autocommit=True) for way, dsn in dsns.items()}
        try:
            for way, conn in conns.items():  # every node maps its copy and starts its runner first
                conn.execute(generate[way], (PROMPT, 2, MODEL))
            conns["PL/Proxy"].execute("SELECT * FROM llm_generate_batch_spread(%s, 2, 0, model => %s)",
                                      (prompts, MODEL)).fetchall()
            load = os.getloadavg()[0]
            for _ in range(args.repeat):
                for way, conn in conns.items():
                    keep(("call", way), median_ms(conn, version[way], None, args.calls))
                    one = median_ms(conn, generate[way], (PROMPT, 1, MODEL), args.calls)
                    many = median_ms(conn, generate[way], (PROMPT, args.tokens, MODEL), max(3, args.calls // 5))
                    keep(("generate 1", way), one)
                    keep(("token", way), (many - one) / (args.tokens - 1))
                for way in ("direct", "pgpool"):
                    keep(("stream row", way), stream_ms_per_row(conns[way], args.tokens, max(3, args.calls // 5)))
                batch = "SELECT text FROM llm_generate_batch(%s, %s, 0, model => %s) ORDER BY ord"
                keep(("batch", "direct, all"), median_ms(conns["direct"], batch, (prompts, args.tokens, MODEL), 1))
                keep(("batch", "direct, one node's half"),
                     median_ms(conns["direct"], batch, (prompts[::2], args.tokens, MODEL), 1))
                spread = "SELECT text FROM llm_generate_batch_spread(%s, %s, 0, model => %s)"
                keep(("batch", "PL/Proxy, both nodes"),
                     median_ms(conns["PL/Proxy"], spread, (prompts, args.tokens, MODEL), 1))
                if conns["PL/Proxy"].execute(spread, (prompts, args.tokens, MODEL)).fetchall() != \
                        conns["direct"].execute(batch, (prompts, args.tokens, MODEL)).fetchall():
                    raise SystemExit("the spread batch differs from one server's")
            with psycopg.connect(dsns["pgpool"], autocommit=True) as admin:
                nodes = sorted(admin.execute("SHOW POOL_NODES", prepare=False).fetchall(), key=lambda r: int(r[0]))
        finally:
            for conn in conns.values():
                conn.close()
    finally:
        topo.stop()

    print(f"\nmodel {shape} (n_layer, n_head, d_model, n_positions), {os.cpu_count()} cores, load average "
          f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; medians, best of {args.repeat} rounds")
    print(f"{'':34}{'direct':>10}{'pgpool':>10}{'PL/Proxy':>10}")
    for label, key in (("call, nothing computed (ms)", "call"), ("llm_generate, 1 token (ms)", "generate 1"),
                       (f"per token, {args.tokens} tokens (ms)", "token"), ("stream, per row (ms)", "stream row")):
        cells = "".join(f"{best[(key, way)]:10.3f}" if (key, way) in best else f"{'-':>10}"
                        for way in ("direct", "pgpool", "PL/Proxy"))
        print(f"{label:34}{cells}")
    direct_call = best[("call", "direct")]
    print("path's own cost per call over direct (ms): " + ", ".join(
        f"{way} {best[('call', way)] - direct_call:+.3f}" for way in ("pgpool", "PL/Proxy")))
    print(f"\n{args.prompts} prompts x {args.tokens} tokens (ms):")
    for way in ("direct, all", "direct, one node's half", "PL/Proxy, both nodes"):
        print(f"  {way:28}{best[('batch', way)]:10.1f}")
    print("\npgpool's SELECTs per node over the run: " + ", ".join(f"node {r[0]} ({r[6]}) {r[8]}" for r in nodes))


if __name__ == "__main__":
    main()
