"""Encode throughput: llm_encode inside PostgreSQL beside Hugging Face's tokenizer (Rust, one thread).

    .venv/bin/python -m bench.tokenizer [--dsn DSN] [--mb 2] [--repeat 3]

Both sides encode the same documents in the same run and must produce the same ids. Without
--dsn the benchmark starts a private PostgreSQL server in a temporary folder (as the tests do),
so it never touches a server in use. Figures are MB of UTF-8 per second:
  - ours: `SELECT sum(cardinality(llm_encode(t, model))) FROM docs` over a temporary table,
    timed on the client (includes reading the rows, detoasting, building the int[] results);
  - Hugging Face: `Tokenizer.encode_batch` (and `encode_batch_fast` where it exists; the faster
    of the two counts) of tokenizers with RAYON_NUM_THREADS=1, the GPT-2 tokenizer loaded by
    transformers' `from_pretrained` from the same vocab.json/merges.txt.
Each side runs once untimed (both have word caches), then --repeat times; the best run counts.
"""

from __future__ import annotations

import os

# One thread for Hugging Face: set before tokenizers is imported (rayon reads it once).
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psycopg  # noqa: E402

from bench.common import server  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pgllm.bundled import gpt2_hf_tokenizer  # noqa: E402
from pgllm.cli import app  # noqa: E402

MODEL = "bench-gpt2"


def prose(limit: int) -> list[str]:
    """English prose: the fortune cookie files (a Debian package pgllm installs), one per fortune."""
    docs, size = [], 0
    folder = Path("/usr/share/games/fortunes")
    for f in sorted(folder.glob("*")) if folder.is_dir() else []:
        if f.suffix or not f.is_file():
            continue
        for doc in f.read_bytes().decode("utf-8", errors="replace").split("\n%\n"):
            if doc.strip():
                docs.append(doc)
                size += len(doc.encode())
                if size >= limit:
                    return docs
    return docs


def code(limit: int) -> list[str]:
    """Source code: the Python standard library's modules, one per file."""
    docs, size = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = f.read_bytes().decode("utf-8", errors="replace")
        docs.append(text)
        size += len(text.encode())
        if size >= limit:
            break
    return docs


def multilingual(limit: int) -> list[str]:
    """Non-English scripts and emoji, to weigh multi-byte text too (generated, fixed)."""
    lines = [
        "漢字仮名交じり文。東京都渋谷区、中文测试：你好，世界！한국어 텍스트입니다.",
        "مرحبا بالعالم! هذا اختبار للنص العربي ١٢٣٤ مع أرقام.",
        "नमस्ते दुनिया, यह एक परीक्षण है। १२३ संख्याएँ और मात्राएँ।",
        "Ελληνικά: Γειά σου Κόσμε! Русский: Привет, мир! עברית: שלום עולם.",
        "👩‍👩‍👧‍👦 family, 👍🏽 thumbs up, 🏳️‍🌈 flag, ❤️‍🔥 🇫🇷🇯🇵 👨🏿‍💻 1️⃣",
    ]
    docs, size, i = [], 0, 0
    while size < limit:
        doc = "\n".join(lines[(i + k) % len(lines)] + f" {i * 7 + k}" for k in range(20))
        docs.append(doc)
        size += len(doc.encode())
        i += 1
    return docs


def hf_tokenizer():
    import transformers

    transformers.logging.set_verbosity_error()
    tok = gpt2_hf_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    return tok._tokenizer  # the Rust tokenizer itself: no Python work per document


def best(fn, repeat: int) -> tuple[float, float]:
    """(seconds of the first run, best seconds of `repeat` further runs)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="server with pg_llm installed (default: a private temporary server)")
    parser.add_argument("--mb", type=float, default=2.0, help="MB of text per corpus (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side (default 3)")
    args = parser.parse_args()
    limit = int(args.mb * 1e6)

    corpora = {"English prose": prose(limit), "Python code": code(limit), "multilingual": multilingual(limit)}
    corpora = {name: docs for name, docs in corpora.items() if docs}
    hf = hf_tokenizer()
    hf_fns = [hf.encode_batch] + ([hf.encode_batch_fast] if hasattr(hf, "encode_batch_fast") else [])

    with server(args.dsn) as dsn:
        result = CliRunner().invoke(app, ["--dsn", dsn, "tokenizer", "--model", MODEL, "--truncate"])
        assert result.exit_code == 0, result.output
        rows = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                for name, docs in corpora.items():
                    mb = sum(len(d.encode()) for d in docs) / 1e6
                    conn.execute("DROP TABLE IF EXISTS pg_temp.bench_docs")
                    conn.execute("CREATE TEMP TABLE bench_docs (i int, t text)")
                    # Uncompressed, so that the timing is the tokenizer's and not pglz's.
                    conn.execute("ALTER TABLE bench_docs ALTER t SET STORAGE EXTERNAL")
                    with conn.cursor().copy("COPY bench_docs (i, t) FROM STDIN") as copy:
                        for i, d in enumerate(docs):
                            copy.write_row((i, d))
                    conn.execute("ANALYZE bench_docs")

                    ours_ids = [r[0] for r in conn.execute(
                        "SELECT llm_encode(t, %s) FROM bench_docs ORDER BY i", (MODEL,)).fetchall()]
                    hf_ids = [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)]
                    same = ours_ids == hf_ids

                    def ours() -> None:
                        conn.execute("SELECT sum(cardinality(llm_encode(t, %s))) FROM bench_docs", (MODEL,)).fetchone()

                    o_first, o_best = best(ours, args.repeat)
                    h_first, h_best = min((best(lambda f=f: f(docs, add_special_tokens=False), args.repeat)
                                           for f in hf_fns), key=lambda t: t[1])
                    n_tokens = sum(len(x) for x in hf_ids)
                    rows.append((name, mb, len(docs), n_tokens, same, mb / o_best, mb / h_best,
                                 mb / o_first, mb / h_first))
            finally:
                conn.execute("DELETE FROM llm_bpe_merges WHERE model = %s", (MODEL,))
                conn.execute("DELETE FROM llm_bpe_vocab WHERE model = %s", (MODEL,))

    print()
    print(f"{'corpus':<14} {'MB':>5} {'docs':>6} {'tokens':>8} {'same ids':>8} {'pg_llm MB/s':>11} "
          f"{'HF MB/s':>8} {'ratio':>6}   {'first pass: pg_llm / HF MB/s':>28}")
    for name, mb, n_docs, n_tokens, same, ours_mbs, hf_mbs, ours_first, hf_first in rows:
        print(f"{name:<14} {mb:5.2f} {n_docs:6d} {n_tokens:8d} {'yes' if same else 'NO':>8} {ours_mbs:11.2f} "
              f"{hf_mbs:8.2f} {ours_mbs / hf_mbs:5.1f}x   {ours_first:13.2f} / {hf_first:.2f}")
    total_mb = sum(r[1] for r in rows)
    ours_s = sum(r[1] / r[5] for r in rows)
    hf_s = sum(r[1] / r[6] for r in rows)
    print(f"{'all':<14} {total_mb:5.2f} {'':>6} {'':>8} {'':>8} {total_mb / ours_s:11.2f} {total_mb / hf_s:8.2f} "
          f"{hf_s / ours_s:5.1f}x")
    if not all(r[4] for r in rows):
        raise SystemExit("ids differ from Hugging Face")


if __name__ == "__main__":
    main()
