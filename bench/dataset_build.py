"""Building a dataset: from a table, tokenized in the server, beside the same text as files.

    .venv/bin/python -m bench.dataset_build [--dsn DSN] [--mb 10] [--block-size 1024] [--repeat 2]

Both sides run `pgllm dataset` (in-process, after an untimed warm-up that loads transformers) on
the same documents in the same run, and must write the same rows:
  - ours: `pgllm dataset --query 'SELECT t FROM bench_docs ORDER BY i'` (llm_dataset_build: the
    documents never leave the server, its tokenizer encodes them);
  - anchor: `pgllm dataset --tokenizer gpt2 --input FILE --split-on SEP` (the client reads the
    file, Hugging Face's tokenizer encodes it, COPY sends the rows).
The corpus: English prose (Debian's fortunes), Python's standard library, multilingual text,
about --mb MB of UTF-8 in all. Without --dsn a private temporary server is started. The best of
--repeat timed runs counts; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import psycopg
from typer.testing import CliRunner

from bench.common import server
from bench.tokenizer import code, multilingual, prose
from pgllm.cli import app
from pgllm.commands.dataset import read_documents

MODEL = "bench-data"
SEP = "<<<pgllm-bench-document>>>"


def corpus(limit: int) -> list[str]:
    """About limit bytes: half prose, then code, then multilingual text to make up the rest."""
    docs = prose(limit // 2)
    size = sum(len(d.encode()) for d in docs)
    docs += code((limit - size) * 2 // 3)
    size = sum(len(d.encode()) for d in docs)
    return docs + multilingual(limit - size)


def pgllm(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="server with pg_llm installed (default: a private temporary server)")
    parser.add_argument("--mb", type=float, default=10.0, help="MB of text (default 10)")
    parser.add_argument("--block-size", type=int, default=1024, help="tokens per row (default 1024)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per side (default 2)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, server(args.dsn) as dsn:
        # the file the client reads, and exactly the documents it finds in it for the table
        path = Path(tmp) / "corpus.txt"
        path.write_text("".join(d.rstrip("\n") + f"\n{SEP}\n" for d in corpus(int(args.mb * 1e6))), encoding="utf-8")
        docs = read_documents(path, SEP)
        mb = path.stat().st_size / 1e6
        small = Path(tmp) / "warmup.txt"
        small.write_text("warm up " * 3000)

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                         "VALUES (%s, 1, 1, 8, %s, 50257) ON CONFLICT (model) DO NOTHING",
                         (MODEL, max(1024, args.block_size)))
            pgllm("--dsn", dsn, "tokenizer", "--model", MODEL, "--truncate")
            conn.execute("DROP TABLE IF EXISTS bench_docs")
            conn.execute("CREATE TABLE bench_docs (i int, t text)")
            with conn.cursor().copy("COPY bench_docs (i, t) FROM STDIN") as copy:
                for i, d in enumerate(docs):
                    copy.write_row((i, d))
            conn.execute("VACUUM ANALYZE bench_docs")
            try:
                common = ("--dsn", dsn, "dataset", "--model", MODEL, "--block-size", str(args.block_size), "--truncate")
                # warm-ups (imports, the tokenizers' caches of both sides), untimed
                pgllm(*common, "--dataset", "client", "--tokenizer", "gpt2", "--input", str(small))
                pgllm(*common, "--dataset", "server", "--query", f"SELECT {str(small.read_text())!r}")

                t_server = best(lambda: pgllm(*common, "--dataset", "server", "--query",
                                              "SELECT t FROM bench_docs ORDER BY i"), args.repeat)
                t_client = best(lambda: pgllm(*common, "--dataset", "client", "--tokenizer", "gpt2", "--input",
                                              str(path), "--split-on", SEP), args.repeat)
                rows = conn.execute("SELECT count(*) FROM llm_dataset WHERE dataset = 'server'").fetchone()[0]
                differ = conn.execute(
                    "SELECT count(*) FROM (SELECT row_number() OVER (ORDER BY id) n, tokens, target FROM llm_dataset "
                    "WHERE dataset = 'server') s FULL JOIN (SELECT row_number() OVER (ORDER BY id) n, tokens, target "
                    "FROM llm_dataset WHERE dataset = 'client') c USING (n) "
                    "WHERE s.tokens IS DISTINCT FROM c.tokens OR s.target IS DISTINCT FROM c.target").fetchone()[0]
            finally:
                conn.execute("DELETE FROM llm_dataset WHERE dataset IN ('server', 'client')")
                conn.execute("DROP TABLE IF EXISTS bench_docs")
                conn.execute("DELETE FROM llm_bpe_merges WHERE model = %s", (MODEL,))
                conn.execute("DELETE FROM llm_bpe_vocab WHERE model = %s", (MODEL,))
                conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))

    load = os.getloadavg()
    print()
    print(f"{mb:.1f} MB of text, {len(docs)} documents -> {rows} rows of {args.block_size} tokens; "
          f"same rows on both sides: {'yes' if differ == 0 else f'NO ({differ} differ)'}")
    print(f"{'pgllm dataset':<44} {'seconds':>8} {'MB/s':>7}")
    print(f"{'--query (llm_dataset_build, in the server)':<44} {t_server:8.2f} {mb / t_server:7.2f}")
    print(f"{'--input FILE (transformers on the client)':<44} {t_client:8.2f} {mb / t_client:7.2f}")
    print(f"ratio: {t_client / t_server:.1f}x   (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"best of {args.repeat})")
    if differ:
        raise SystemExit("the two datasets differ")


if __name__ == "__main__":
    main()
