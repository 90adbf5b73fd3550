"""Decode kernels (ext/src/compute/gemv.c) on one GPT-2-small step, beside llama.cpp and our engine, one run.

    .venv/bin/python -m bench.kernels [--threads 2] [--rows 1,4,8,16] [--pages huge|4k|file]
                                      [--seconds 2] [--no-llamacpp] [--no-engine] [--dsn DSN]

A step is every weight of GPT-2 small once: 12 layers x (768x2304, 768x768, 768x3072, 3072x768)
plus the tied head 50257x768, for R rows (sequences decoded together), run by bench/kernels.c
(see its header; random weights packed into one arena per format). Printed per format, SIMD level
and R: ms per step (the best of the steps run in --seconds: the machine is shared), the packed
bytes over that time (GB/s), and the tokens/s it implies
(R / step time: an upper bound for decode, which also runs attention, LayerNorm and GELU), beside
the matching llama.cpp format's tg64 (f32 / F16 / Q8_0, llama-bench on a random GPT-2 small,
bench.llamacpp) and our engine's fp32 decode today (bench.inference: llm_generate_tokens in a
private server). The two dot-product variants are measured against the weight-conversion ones
(level avx512dot vs avx512) where the CPU has them. The last rows run a prompt's worth of rows
(--prompt 128) through the same kernels and through OpenBLAS sgemm on the float32 weights (the
engine's prompt path today), beside llama.cpp's pp128: tokens/s there count the linear layers
only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

from bench.cprogram import build

HERE = Path(__file__).resolve().parent
LLAMA_FORMAT = {"f32": "f32", "bf16": "F16", "q8": "Q8_0"}


def run_kernels(binary: Path, threads: int, rows: str, pages: str, seconds: float, formats: str,
                level: str | None = None) -> tuple[list[dict], list[dict]]:
    """(results, reads): one dict per 'result'/'read' line of the C program."""
    cmd = [str(binary), "--threads", str(threads), "--rows", rows, "--pages", pages,
           "--seconds", str(seconds), "--formats", formats]
    if level:
        cmd += ["--level", level]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    results, reads = [], []
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        fields = dict(re.findall(r"(\w+)=(\S+)", rest))
        (results if kind == "result" else reads).append(fields)
    return results, reads


def engine_decode(dsn: str | None, threads: int, repeat: int = 3) -> float:
    """Our engine's fp32 decode tokens/s today (bench.inference's measurement)."""
    import psycopg

    from bench.common import server
    from bench.inference import MODEL, ours, reference_model, write_weights

    with server(dsn) as url, psycopg.connect(url, autocommit=True) as conn:
        write_weights(conn, reference_model())
        conn.execute(f"SET pg_llm.threads = {threads}")
        conn.execute("SELECT llm_logits('{1}', %s)", (MODEL,))
        decode = ours(conn, repeat)["decode"]
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))
    return decode


def llamacpp_decode(threads: int) -> dict[str, dict[str, float]]:
    from bench.llamacpp import random_gpt2_small, speeds

    with tempfile.TemporaryDirectory(prefix="pgllm-hf-") as tmp:
        return speeds(random_gpt2_small(Path(tmp) / "gpt2-small"), threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--prompt", type=int, default=128, help="rows of the prompt comparison (0: none)")
    parser.add_argument("--pages", default="huge", choices=("huge", "4k", "file"))
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--no-engine", action="store_true")
    parser.add_argument("--dsn", help="server for the engine's decode (default: a private temporary one)")
    args = parser.parse_args()

    def kernels(formats: str, rows: str, level: str | None = None) -> tuple[list[dict], list[dict]]:
        return run_kernels(binary, args.threads, rows, args.pages, args.seconds, formats, level)

    with tempfile.TemporaryDirectory(prefix="pgllm-kernels-") as tmp:
        binary = build(HERE / "kernels.c", Path(tmp), libs=("-lopenblas",))
        results, reads = kernels("f32,bf16,q8", args.rows)
        if results[0]["level"] == "avx512dot":
            results += kernels("bf16,q8", args.rows, "avx512")[0]
        if args.prompt:
            results += kernels("f32,bf16,q8,sgemm", str(args.prompt))[0]
    llama = {} if args.no_llamacpp else llamacpp_decode(args.threads)
    engine = None if args.no_engine else engine_decode(args.dsn, args.threads)

    print(f"\nGPT-2 small step (weights only), {args.threads} threads, pages={args.pages}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for r in reads:
        print(f"plain read of the f32 arena ({int(r['bytes']) / 1e6:.0f} MB): {float(r['GBps']):.1f} GB/s")
    print(f"\n{'format':7}{'level':>10}{'R':>5}{'MB':>6}{'ms/step':>9}{'GB/s':>7}{'tok/s':>8}"
          f"{'llama.cpp':>18}{'ratio':>8}")
    order = list(LLAMA_FORMAT) + ["sgemm"]
    for r in sorted(results, key=lambda r: (int(r["R"]) == args.prompt, order.index(r["fmt"]),
                                            r["level"] != "avx512dot", int(r["R"]))):
        R, ms, mb = int(r["R"]), float(r["min"]), int(r["bytes"]) / 1e6
        tps = R * 1000 / ms
        what = "pp128" if R == args.prompt == 128 else "tg64"
        ref = llama.get(LLAMA_FORMAT.get(r["fmt"], "f32"), {}).get(what) if R == 1 or what == "pp128" else None
        cmp = f"{ref:8.1f} {LLAMA_FORMAT.get(r['fmt'], 'f32'):>4} {what}{tps / ref:7.2f}x" if ref else ""
        print(f"{r['fmt']:7}{r['level']:>10}{R:5}{mb:6.0f}{ms:9.2f}{mb / ms:7.1f}{tps:8.1f}  {cmp}")
    if llama:
        print("\nllama.cpp (llama-bench, same shape, best of 3): " +
              ", ".join(f"{f} tg64 {v['tg64']:.1f} pp128 {v['pp128']:.1f}" for f, v in llama.items()))
    if engine:
        f32 = llama.get("f32", {}).get("tg64")
        print(f"our engine today, fp32 decode (llm_generate_tokens, 16+64): {engine:.1f} tok/s"
              + (f" = {engine / f32:.2f}x llama.cpp f32" if f32 else ""))


if __name__ == "__main__":
    main()
