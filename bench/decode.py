"""Decode and prompt speed per inference precision, beside llama.cpp (and PyTorch), in one run.

    .venv/bin/python -m bench.decode [--shape small|medium|large|xl] [--threads 2] [--repeat 3]
                                     [--dsn DSN] [--no-llamacpp] [--no-pytorch]

The same random GPT-2 weights (torch.manual_seed(0); --shape picks GPT-2 small, medium, large or
xl) go into pg_llm (a private temporary server unless --dsn) and, converted to GGUF, into
llama.cpp (bench.llamacpp: f32, then F16 and Q8_0 by llama-quantize). Ours, per
pg_llm.inference_precision (float32, bfloat16, int8), on --threads threads, best of --repeat:
  - decode tok/s: 64 greedy tokens after a 16-token prompt: llm_generate_tokens(prompt, 65)
    minus llm_generate_tokens(prompt, 1) (both run the same prompt pass), over 64;
  - prompt tok/s: llm_logits on 128 tokens (T = 128).
llama.cpp: llama-bench tg64 and pp128 on the same threads. Printed as ours / llama.cpp for the
matching format (float32 / f32, bfloat16 / F16, int8 / Q8_0), and int8 / our float32. PyTorch
(transformers, float32) is bench.inference's measurement on the same weights.

llama.cpp's threads wait for each other by spinning: on a loaded machine its figures collapse (the
load average is printed; compare runs taken when it is low).
"""

from __future__ import annotations

import argparse
import os
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
PRECISIONS = {"float32": "f32", "bfloat16": "F16", "int8": "Q8_0"}  # ours: llama.cpp's format
PROMPT = 128


def reference(shape: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_head, n_embd = SHAPES[shape]
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).float().eval()


def ours(conn, precision: str, repeat: int) -> dict[str, float]:
    conn.execute("SELECT set_config('pg_llm.inference_precision', %s, false)", (precision,))
    conn.execute("SELECT llm_logits('{1}', %s)", (MODEL,))  # its copy built and mapped: not timed
    prompt = list(range(1000, 1000 + PROMPT_DECODE))
    gen = "SELECT llm_generate_tokens(%s, %s, 0, model => %s)"
    t1 = best_of(repeat, lambda: conn.execute(gen, (prompt, 1, MODEL)).fetchone())
    t65 = best_of(repeat, lambda: conn.execute(gen, (prompt, NEW_TOKENS + 1, MODEL)).fetchone())
    ids = [(17 * i) % 50257 for i in range(PROMPT)]
    tp = best_of(repeat, lambda: conn.execute("SELECT llm_logits(%s, %s)", (ids, MODEL)).fetchone())
    return {"tg64": NEW_TOKENS / (t65 - t1), "pp128": PROMPT / tp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dsn", help="an existing server with pg_llm (default: a private temporary one)")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--no-pytorch", action="store_true")
    args = parser.parse_args()

    model = reference(args.shape)
    loads = [os.getloadavg()[0]]
    with server(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        write_weights(conn, model)
        conn.execute(f"SET pg_llm.threads = {args.threads}")
        # two rounds, precisions interleaved, best of both: the machine is shared
        rounds = [{p: ours(conn, p, args.repeat) for p in PRECISIONS} for _ in range(2)]
        sizes = dict(conn.execute("SELECT format, bytes FROM pg_llm_weight_cache() WHERE model = %s "
                                  "AND database = current_database()", (MODEL,)).fetchall())
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))
    loads.append(os.getloadavg()[0])
    us = {p: {k: max(r[p][k] for r in rounds) for k in ("tg64", "pp128")} for p in PRECISIONS}

    llama = {}
    if not args.no_llamacpp:
        from bench.llamacpp import speeds

        with tempfile.TemporaryDirectory(prefix="pgllm-hf-") as tmp:
            model.save_pretrained(Path(tmp) / "model")
            llama = speeds(Path(tmp) / "model", args.threads, args.repeat, tuple(PRECISIONS.values()))
        loads.append(os.getloadavg()[0])
    torch_fp32 = None
    if not args.no_pytorch:
        from bench.inference import pytorch

        torch.set_num_threads(args.threads)
        torch_fp32 = pytorch(model, args.repeat)
        loads.append(os.getloadavg()[0])

    print(f"\nGPT-2 {args.shape} shape ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), "
          f"{args.threads} threads, best of {args.repeat} (ours: of 2 x {args.repeat}); "
          f"load average {', '.join(f'{x:.2f}' for x in loads)} (start, after each engine)\n")
    print(f"{'precision':10}{'copy MB':>9}{'decode tok/s':>14}{'llama.cpp':>16}{'ratio':>8}"
          f"{'prompt tok/s':>14}{'llama.cpp':>16}{'ratio':>8}")
    for p, fmt in PRECISIONS.items():
        row = f"{p:10}{sizes.get(p, 0) / 2**20:9.0f}"
        for k in ("tg64", "pp128"):
            ref = llama.get(fmt, {}).get(k)
            row += f"{us[p][k]:14.1f}" + (f"{ref:11.1f} {fmt:>4}{us[p][k] / ref:7.2f}x" if ref else f"{'':16}{'':8}")
        print(row)
    print(f"\nint8 / our float32: decode {us['int8']['tg64'] / us['float32']['tg64']:.2f}x, "
          f"prompt {us['int8']['pp128'] / us['float32']['pp128']:.2f}x; "
          f"bfloat16 / our float32: decode {us['bfloat16']['tg64'] / us['float32']['tg64']:.2f}x, "
          f"prompt {us['bfloat16']['pp128'] / us['float32']['pp128']:.2f}x")
    if torch_fp32:
        print(f"PyTorch float32 (transformers): decode {torch_fp32['decode']:.1f} tok/s "
              f"(ours float32 {us['float32']['tg64'] / torch_fp32['decode']:.2f}x), prompt T=128 "
              f"{torch_fp32['prompt128']:.1f} (ours {us['float32']['pp128'] / torch_fp32['prompt128']:.2f}x)")


if __name__ == "__main__":
    main()
