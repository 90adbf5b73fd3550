"""Decode and prompt speed per inference precision and SIMD level, beside llama.cpp, in one run.

    .venv/bin/python -m bench.decode [--shape small|medium|large|xl] [--threads 2] [--repeat 3]
                                     [--rounds 2] [--levels auto] [--builds native,avx2] [--poll 0]
                                     [--dsn DSN] [--no-llamacpp] [--no-pytorch]

The same random GPT-2 weights (torch.manual_seed(0); --shape picks GPT-2 small, medium, large or
xl) go into pg_llm (a private temporary server unless --dsn) and, converted to GGUF, into
llama.cpp (bench.llamacpp: f32, then F16, Q8_0 and Q4_0 by llama-quantize). Ours, per
pg_llm.inference_precision (float32, bfloat16, int8, int4) and per pg_llm.simd level (--levels:
`auto` is every level of this CPU but portable: avx2, and avx512, avx512dot where it has them), on
--threads threads, best of --repeat:
  - decode tok/s: 64 greedy tokens after a 16-token prompt: llm_generate_tokens(prompt, 65)
    minus llm_generate_tokens(prompt, 1) (both run the same prompt pass), over 64;
  - prompt tok/s: llm_logits on 128 tokens (T = 128).
llama.cpp: llama-bench tg64 and pp128 on the same threads, for each build of --builds (native:
GGML_NATIVE, every instruction set of this machine; avx2: AVX2/FMA/F16C, no AVX-512: the level to
set beside pg_llm.simd = avx2 on an AVX-512 machine; on a CPU without AVX-512 both are the same
instructions). The rounds interleave ours and llama.cpp's (--rounds, best of all): the machine
may be shared. Printed as ours / llama.cpp for the matching format (float32 / f32, bfloat16 / F16,
int8 / Q8_0, int4 / Q4_0), and each precision / our float32 at the same level. PyTorch
(transformers, float32) is bench.inference's measurement on the same weights.

llama.cpp's threads wait for each other by spinning (llama-bench --poll, 50 by default): on a
loaded machine its figures collapse, so this benchmark passes --poll 0 unless told otherwise, as
bench.concurrent does (the load average is printed; compare runs taken when it is low).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import psycopg
import torch

from bench.common import server
from bench.inference import MODEL, NEW_TOKENS, PROMPT_DECODE, best_of, write_weights

SHAPES = {  # n_layer, n_head, n_embd
    "small": (12, 12, 768),
    "medium": (24, 16, 1024),
    "large": (36, 20, 1280),
    "xl": (48, 25, 1600),
}
PRECISIONS = {"float32": "f32", "bfloat16": "F16", "int8": "Q8_0", "int4": "Q4_0"}  # ours: llama.cpp's format
LEVELS = ("portable", "avx2", "avx512", "avx512dot")
PROMPT = 128


def reference(shape: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_head, n_embd = SHAPES[shape]
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).float().eval()


def ours(conn, precision: str, level: str, repeat: int) -> dict[str, float]:
    conn.execute("SELECT set_config('pg_llm.inference_precision', %s, false)", (precision,))
    conn.execute("SELECT set_config('pg_llm.simd', %s, false)", (level,))
    conn.execute("SELECT llm_logits('{1}', %s)", (MODEL,))  # its copy built and mapped: not timed
    prompt = list(range(1000, 1000 + PROMPT_DECODE))
    gen = "SELECT llm_generate_tokens(%s, %s, 0, model => %s)"
    t1 = best_of(repeat, lambda: conn.execute(gen, (prompt, 1, MODEL)).fetchone())
    t65 = best_of(repeat, lambda: conn.execute(gen, (prompt, NEW_TOKENS + 1, MODEL)).fetchone())
    ids = [(17 * i) % 50257 for i in range(PROMPT)]
    tp = best_of(repeat, lambda: conn.execute("SELECT llm_logits(%s, %s)", (ids, MODEL)).fetchone())
    return {"tg64": NEW_TOKENS / (t65 - t1), "pp128": PROMPT / tp}


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and flags (/proc/cpuinfo)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_levels() -> list[str]:
    """The pg_llm.simd levels this CPU runs, as gemv.c's llm_simd_detect decides them."""
    flags = cpu_info()[1]
    levels = ["portable"]
    if {"avx2", "fma", "f16c", "bmi2", "movbe"} <= flags:
        levels.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
            levels.append("avx512")
            if flags & {"avx512_vnni", "avx512_bf16"}:
                levels.append("avx512dot")
    return levels


def cpu_description() -> str:
    """The CPU's model name and its SIMD flags that matter here."""
    model, flags = cpu_info()
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni")
    return f"{model} ({os.cpu_count()} CPUs; {' '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def best(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: max(a[k], b[k]) for k in b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--levels", default="auto", help="pg_llm.simd levels, comma-separated (auto: all but portable)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--builds", default="native,avx2", help="llama.cpp builds (bench.llamacpp --build)")
    parser.add_argument("--poll", type=int, default=0, help="llama-bench --poll (its own default is 50)")
    parser.add_argument("--dsn", help="an existing server with pg_llm (default: a private temporary one)")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--no-pytorch", action="store_true")
    args = parser.parse_args()

    precisions = args.precisions.split(",")
    builds = [] if args.no_llamacpp else args.builds.split(",")
    model = reference(args.shape)
    loads = [os.getloadavg()[0]]
    us: dict[tuple[str, str], dict] = {}
    llama: dict[tuple[str, str], dict] = {}
    with server(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn, \
            tempfile.TemporaryDirectory(prefix="pgllm-hf-") as tmp:
        write_weights(conn, model)
        conn.execute(f"SET pg_llm.threads = {args.threads}")
        levels = args.levels.split(",") if args.levels != "auto" else cpu_levels()[1:]
        gguf = {}
        if builds:
            from bench.llamacpp import bench_gguf, convert, ensure_built

            model.save_pretrained(Path(tmp) / "model")
            gguf = convert(Path(tmp) / "model", Path(tmp) / "gguf", tuple(PRECISIONS[p] for p in precisions))
            for b in builds:
                ensure_built(b)
        for _ in range(args.rounds):  # ours and llama.cpp interleaved, best of the rounds
            for level in levels:
                for p in precisions:
                    us[level, p] = best(us.get((level, p)), ours(conn, p, level, args.repeat))
            for b in builds:
                for p in precisions:
                    llama[b, p] = best(llama.get((b, p)),
                                       bench_gguf(gguf[PRECISIONS[p]], args.threads, args.repeat, b, args.poll))
            loads.append(os.getloadavg()[0])
        sizes = dict(conn.execute("SELECT format, bytes FROM pg_llm_weight_cache() WHERE model = %s "
                                  "AND database = current_database()", (MODEL,)).fetchall())
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))
    torch_fp32 = None
    if not args.no_pytorch:
        from bench.inference import pytorch

        torch.set_num_threads(args.threads)
        torch_fp32 = pytorch(model, args.repeat)
        loads.append(os.getloadavg()[0])

    print(f"\nGPT-2 {args.shape} shape ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), "
          f"{args.threads} threads, best of {args.rounds} rounds x {args.repeat}, llama-bench --poll {args.poll}; "
          f"{cpu_description()}; "
          f"load average {', '.join(f'{x:.2f}' for x in loads)} (start, after each round)\n")
    head = f"{'level':10}{'precision':10}{'copy MB':>8}{'decode':>9}{'prompt':>9}{'/ fp32':>14}"
    for b in builds:
        head += f"{'llama.cpp ' + b:>20}{'decode':>9}{'prompt':>9}"
    print(head)
    for level in levels:
        for p in precisions:
            r = us[level, p]
            f32 = us.get((level, "float32"))
            row = f"{level:10}{p:10}{sizes.get(p, 0) / 2**20:8.0f}{r['tg64']:9.1f}{r['pp128']:9.1f}"
            row += f"{r['tg64'] / f32['tg64']:7.2f}x{r['pp128'] / f32['pp128']:6.2f}x" if f32 else f"{'':14}"
            for b in builds:
                ref = llama[b, p]
                row += (f"{PRECISIONS[p]:>5}{ref['tg64']:7.1f}{ref['pp128']:8.1f}"
                        f"{r['tg64'] / ref['tg64']:8.2f}x{r['pp128'] / ref['pp128']:8.2f}x")
            print(row)
    print("\ncolumns: tokens/s (decode: 64 greedy tokens after 16; prompt: T = 128); '/ fp32': decode and prompt "
          "over our float32 at the same level; llama.cpp: its tg64 and pp128, then ours / its")
    if torch_fp32 and (levels[-1], "float32") in us:
        f32 = us[levels[-1], "float32"]
        print(f"PyTorch float32 (transformers): decode {torch_fp32['decode']:.1f} tok/s "
              f"(ours float32 at {levels[-1]} {f32['tg64'] / torch_fp32['decode']:.2f}x), prompt T=128 "
              f"{torch_fp32['prompt128']:.1f} (ours {f32['pp128'] / torch_fp32['prompt128']:.2f}x)")


if __name__ == "__main__":
    main()
