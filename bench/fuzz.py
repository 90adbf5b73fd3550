"""Fuzzing pg_llm's SQL functions with SQLsmith (Debian's `sqlsmith`), as a role with training rights.

    .venv/bin/python -m bench.fuzz [--queries 50000] [--timeout-ms 1000] [--seed 1]

A private server with pg_llm built from this tree, a database with a model, its tokenizer, a
training and a validation dataset and a checkpoint; SQLsmith generates random queries that call
every function pg_llm exposes, nested in each other and in PostgreSQL's expressions, with random
arguments (NULLs, casts of odd values, other functions' results), and runs them as that role
under a statement timeout. Success is the server log without "terminated by signal": no query
may crash a backend. Not part of `make test` (it runs for many minutes); figures in
docs/development.md.

SQLsmith chooses among every routine of pg_proc, where pg_llm's few would hardly come up, and
reads the catalog by unqualified names: the role's search_path puts a schema first whose view
`pg_proc` holds pg_llm's functions and a few aggregates, so nearly every query calls pg_llm.
(SQLsmith leaves out set-returning functions, so the streams, beams, batches and lists are called
by the queries of `SRF_QUERIES` instead, with arguments from the same kind of random values.)
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROLE = "fuzzer"
AGGREGATES = ("min", "max", "count", "sum", "avg", "string_agg", "array_agg", "bool_or")

# Set-returning functions SQLsmith does not call, each with random arguments.
SRF_QUERIES = [
    "SELECT * FROM llm_generate_stream({text}, {int}, {float}, {int}, {float}, {model}, {bigint})",
    "SELECT * FROM llm_beam_search({text}, {int}, {int}, {model}, {float})",
    "SELECT * FROM llm_beam_search_tokens({ints}, {int}, {int}, {model}, {int}, {float})",
    "SELECT * FROM llm_generate_batch(ARRAY[{text}, {text}], {int}, {float}, {int}, {float}, {model}, {bigint})",
    "SELECT * FROM llm_eval({model}, {text}, {int}, {int})",
    "SELECT * FROM pg_llm_weight_cache()",
    "SELECT * FROM pg_llm_batch_runners()",
    "SELECT * FROM pg_llm_limits()",
    "SELECT pg_llm_version(), pg_llm_blas_info()",
    "SELECT * FROM pg_llm_weight_cache_build({model}, {text})",
    "SELECT * FROM llm_tokenizer_info({model})",
]


def random_value(rng: random.Random, kind: str) -> str:
    odd_ints = ["NULL", "0", "-1", "1", "2", "63", "64", "1023", "1024", "2147483647", "-2147483648", "50256", "50257"]
    odd_floats = ["NULL", "0", "-0.0", "1e-300", "1e300", "'NaN'", "'Infinity'", "'-Infinity'", "0.5", "1", "2", "1e-45"]
    texts = ["NULL", "''", "'Hello'", "'tiny'", "'val'", "'train'", "'gpt2-small'", "repeat('ab ', 3000)",
             "E'\\\\x01\\\\x02'", "'<|endoftext|>'", "chr(55357)", "'int8'", "'bfloat16'", "'float32'"]
    if kind == "int":
        return rng.choice(odd_ints) + "::int"
    if kind == "bigint":
        return rng.choice(odd_ints) + "::bigint"
    if kind == "float":
        return rng.choice(odd_floats) + "::float8"
    if kind == "text":
        return rng.choice(texts) + "::text"
    if kind == "model":
        return rng.choice(["'tiny'", "'tiny'", "'gpt2-small'", "NULL", "'nosuch'", "''", "repeat('m', 300)"]) + "::text"
    if kind == "ints":
        return rng.choice(["NULL::int[]", "'{}'::int[]", "'{1,2,3}'::int[]", "'{-1}'::int[]", "'{50257}'::int[]",
                           "array_fill(7, ARRAY[2000])", "'{{1,2},{3,4}}'::int[]", "ARRAY[NULL::int]"])
    raise ValueError(kind)


def srf_query(rng: random.Random) -> str:
    template = rng.choice(SRF_QUERIES)
    return re.sub(r"\{(\w+)\}", lambda m: random_value(rng, m.group(1)), template)


def prepare(conn: psycopg.Connection) -> None:
    """The model, tokenizer, datasets and checkpoint the queries find, the role, and the catalog view."""
    from bench.common import load_gpt2_tokenizer

    conn.execute("SELECT llm_init('tiny', 2, 2, 32, 64, 50257, seed => 1)")
    load_gpt2_tokenizer(conn, "tiny")
    conn.execute("SELECT llm_dataset_build($$SELECT 'The quick brown fox jumps over the lazy dog. ' || g "
                 "FROM generate_series(1, 40) g$$, 'train', 'tiny', block_size => 16)")
    conn.execute("SELECT llm_dataset_build($$SELECT 'A lazy dog sleeps. ' || g FROM generate_series(1, 10) g$$, "
                 "'val', 'tiny', block_size => 16)")
    conn.execute("SELECT llm_train('tiny', 2, batch_size => 2, warmup => 1)")
    conn.execute("SELECT llm_checkpoint_save('tiny', 'fuzz')")
    conn.execute(f"CREATE ROLE {ROLE} LOGIN")
    conn.execute(f"ALTER ROLE {ROLE} SET track_functions = 'all'")  # calls per function, for the report
    conn.execute("SELECT llm_grant(%s, train => true)", (ROLE,))
    conn.execute("CREATE SCHEMA fuzz_catalog")
    conn.execute("CREATE VIEW fuzz_catalog.pg_proc AS SELECT * FROM pg_catalog.pg_proc p "
                 "WHERE p.oid IN (SELECT objid FROM pg_catalog.pg_depend WHERE classid = 'pg_proc'::regclass "
                 "AND deptype = 'e' AND refobjid = (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'pg_llm')) "
                 "AND p.pronargs > 0 "  # pg_llm_version() and the like would fill every query
                 f"OR (p.pronamespace = 'pg_catalog'::regnamespace AND p.proname IN {AGGREGATES!r})")
    conn.execute(f"GRANT USAGE ON SCHEMA fuzz_catalog TO {ROLE}")
    conn.execute(f"GRANT SELECT ON fuzz_catalog.pg_proc TO {ROLE}")
    conn.commit()


def crashes(log: Path) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "terminated by signal" in line]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=50000, help="SQLsmith queries in all (default 50000)")
    p.add_argument("--srf-queries", type=int, default=5000, help="queries of the set-returning functions (default 5000)")
    p.add_argument("--timeout-ms", type=int, default=1000, help="statement_timeout of every query")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--chunk", type=int, default=5000, help="queries per SQLsmith run (each its own seed)")
    args = p.parse_args()
    if shutil.which("sqlsmith") is None:
        print("sqlsmith is not installed: apt-get install sqlsmith", file=sys.stderr)
        return 2

    from pgllm.cluster import Cluster
    from pgllm.extension import build_and_install, create_or_update

    home = Path(tempfile.mkdtemp(prefix="pgllm-fuzz-", dir="/tmp"))
    os.chmod(home, 0o755)
    os.environ["PGLLM_HOME"] = str(home)
    cluster = Cluster(home)
    started = time.monotonic()
    try:
        print("starting a private PostgreSQL server and building pg_llm ...", flush=True)
        cluster.start()
        build_and_install(cluster.pg_config)
        with psycopg.connect(cluster.dsn()) as conn:
            create_or_update(conn)
            prepare(conn)
        as_role = cluster.dsn().replace(f"postgresql://{cluster.role}@", f"postgresql://{ROLE}@")
        options = f"-c statement_timeout={args.timeout_ms} -c search_path=fuzz_catalog,pg_catalog,public"
        target = as_role + ("&" if "?" in as_role else "?") + "options=" + options.replace(" ", "%20").replace("=", "%3D")
        done = 0
        seed = args.seed
        while done < args.queries:
            n = min(args.chunk, args.queries - done)
            proc = subprocess.run(["sqlsmith", f"--target={target}", f"--max-queries={n}", f"--seed={seed}",
                                   "--exclude-catalog"], capture_output=True, text=True)
            done += n
            seed += 1
            found = crashes(cluster.log_file)
            print(f"sqlsmith: {done} queries, {len(found)} backend crashes so far "
                  f"({time.monotonic() - started:.0f} s; sqlsmith exit {proc.returncode})", flush=True)
            if proc.returncode not in (0, 1) and not found:
                print(proc.stderr[-2000:], file=sys.stderr)
        rng = random.Random(args.seed)
        errors = 0
        with psycopg.connect(as_role, autocommit=True) as conn:
            conn.execute(f"SET statement_timeout = {args.timeout_ms}")
            for i in range(args.srf_queries):
                try:
                    conn.execute(srf_query(rng)).fetchall()
                except psycopg.Error:
                    if conn.broken:  # the backend went away: the log says why
                        break
                    errors += 1
            conn.execute("SELECT pg_stat_force_next_flush()") if conn.info.server_version >= 150000 else None
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            calls = conn.execute("SELECT funcname, calls FROM pg_stat_user_functions WHERE funcname ~ '^(pg_)?llm_' "
                                 "ORDER BY calls DESC").fetchall()
        print(f"calls of pg_llm's functions ({len(calls)} functions): "
              + ", ".join(f"{name} {n}" for name, n in calls))
        found = crashes(cluster.log_file)
        print(f"set-returning functions: {args.srf_queries} queries ({errors} ended in an error, as random "
              f"arguments mostly do), {len(found)} backend crashes in all")
        for line in found:
            print("  " + line)
        print(f"total: {done + args.srf_queries} queries in {time.monotonic() - started:.0f} s, "
              f"{len(found)} backend crashes")
        return 1 if found else 0
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
