"""LoRA adapters: training speed beside our full fine-tune and PEFT, memory on GPT-2 xl's shape, and
serving with adapters beside the base model, in one run.

    .venv/bin/python -m bench.lora [--dsn DSN] [--threads 2] [--steps 20]
    .venv/bin/python -m bench.lora --xl [--dsn DSN] [--threads 2]

GPT-2 small's shape (124M parameters, random weights: speed does not depend on their values),
batch 4 x 64 tokens, AdamW + clipping, --threads threads on every side:
  - training, tokens/s (the median step): our full fine-tune (llm_train), our LoRA (llm_train
    with adapter => ..., rank 8 on all four products, the base frozen), and PEFT 0.21's LoRA of
    the same rank and targets on transformers + torch (AdamW fused over the adapter's tensors), in
    a process of its own run before and after ours (the mean of the two).
  - decode: llm_generate_tokens of 64 tokens greedy after an 8-token prompt, ms per token, base
    model vs the same call with an adapter (rank 8, all four products), best of 5, interleaved.
  - batch: 8 prompts with 8 different adapters in one llm_generate_batch vs 8 single calls with
    their adapters (32 tokens each), best of 5, interleaved.
  - --xl (alone): an adapter (rank 8, all products) trained on GPT-2 xl's shape (1.56B parameters, batch 1
    x 64 tokens): seconds per step and the backend's peak memory (VmHWM). A full fine-tune needs the
    weights, their gradients and two AdamW moments in float32: 4 x 6.2 GB = 25 GB, more than this
    machine's 24 GB, so it is not run.
Without --dsn the benchmark starts a private PostgreSQL server in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from bench.common import load_gpt2_tokenizer, server
from bench.training import backend_peak_mb, data, gpt2_small

SMALL = ("lora-bench-small", 12, 12, 768, 1024, 50257)
XL = ("lora-bench-xl", 48, 25, 1600, 1024, 50257)
TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
RANK = 8
ROUNDS = 5          # serving: the best of this many interleaved rounds of each
PROMPTS = ["The quick brown fox", "SELECT * FROM", "Once upon a time", "In the database",
           "def main():", "The weather today is", "PostgreSQL is a", "My favourite number is"]


# ---- PEFT + torch, in its own process -------------------------------------------------------------

def peft_worker(args) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    model = get_peft_model(gpt2_small(), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                                    lora_dropout=0.0, fan_in_fan_out=True, bias="none"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01, fused=True)
    rows = torch.tensor(data(512, args.block_size), dtype=torch.long)
    B, V = args.batch_size, SMALL[5]
    times = []
    for i in range(3 + args.steps):
        t = time.perf_counter()
        batch = rows[[(i * B + b) % len(rows) for b in range(B)]]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - t)
    import peft
    print(json.dumps({"tokens_per_s": B * args.block_size / statistics.median(times),
                      "version": f"peft {peft.__version__}, torch {torch.__version__}"}))


def run_peft(args) -> dict:
    cmd = [sys.executable, "-m", "bench.lora", "--peft-worker", "--threads", str(args.threads),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--block-size", str(args.block_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise SystemExit(f"PEFT worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- pg_llm -------------------------------------------------------------------------------------

def connect(dsn: str, threads: int) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("SELECT set_config('pg_llm.threads', %s, false)", (str(threads),))
    return conn


def setup(conn, shape, rows: int, block_size: int) -> None:
    name = shape[0]
    conn.execute("DELETE FROM llm_model_config WHERE model = %s", (name,))
    conn.execute("SELECT llm_init(%s, %s, %s, %s, %s, %s, seed => 1)", shape)
    conn.execute("TRUNCATE llm_dataset RESTART IDENTITY")
    with conn.cursor() as cur:
        with cur.copy("COPY llm_dataset (tokens, target) FROM STDIN") as copy:
            for r in data(rows, block_size):
                copy.write_row((r[:-1].tolist(), r[1:].tolist()))
    conn.execute("CHECKPOINT")


def median_rate(conn, table: str, key: str, name: str, steps: int) -> float:
    return statistics.median(r[0] for r in conn.execute(
        f"SELECT tokens_per_s FROM {table} WHERE {key} = %s ORDER BY step DESC LIMIT %s", (name, steps)))


def train_ours(args, dsn: str) -> dict:
    model = SMALL[0]
    call = ("SELECT llm_train(%s, %s, lr_max => 1e-4, warmup => 10, batch_size => %s, total_steps => 1000, "
            "adapter => %s)")
    with connect(dsn, args.threads) as conn:
        setup(conn, SMALL, 512, args.block_size)
        load_gpt2_tokenizer(conn, model)
        conn.execute("SELECT llm_adapter_create('bench-lora', %s, rank => %s, alpha => %s, targets => %s)",
                     (model, RANK, 2 * RANK, TARGETS))
        for adapter in (None, "bench-lora"):     # a first call loads the weights (and makes AdamW state)
            conn.execute(call, (model, 2, args.batch_size, adapter))
        conn.execute(call, (model, args.steps, args.batch_size, None))
        full = median_rate(conn, "llm_train_log", "model", model, args.steps)
        conn.execute(call, (model, args.steps, args.batch_size, "bench-lora"))
        lora = median_rate(conn, "llm_adapter_train_log", "adapter", "bench-lora", args.steps)
    return {"full": full, "lora": lora}


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def serve_ours(args, dsn: str) -> dict:
    model = SMALL[0]
    with connect(dsn, args.threads) as conn:
        adapters = [f"bench-serve-{i}" for i in range(8)]
        for a in adapters:
            conn.execute("SELECT llm_adapter_drop(%s)", (a,))
            conn.execute("SELECT llm_adapter_create(%s, %s, rank => %s, targets => %s, seed => %s)",
                         (a, model, RANK, TARGETS, len(a)))
        prompt = conn.execute("SELECT llm_encode(%s, %s)", (PROMPTS[0], model)).fetchone()[0]
        decode = "SELECT llm_generate_tokens(%s, 64, 0.0, model => %s, adapter => %s)"
        conn.execute(decode, (prompt, model, None))                 # the shared copy, built once
        base = with_adapter = float("inf")
        for _ in range(ROUNDS):
            base = min(base, seconds(lambda: conn.execute(decode, (prompt, model, None))))
            with_adapter = min(with_adapter, seconds(lambda: conn.execute(decode, (prompt, model, adapters[0]))))
        single = "SELECT llm_generate(%s, 32, 0.0, model => %s, adapter => %s)"
        batch = "SELECT count(*) FROM llm_generate_batch(%s, 32, 0.0, model => %s, adapters => %s)"
        singles = batched = float("inf")
        for _ in range(ROUNDS):
            singles = min(singles, seconds(lambda: [conn.execute(single, (p, model, a))
                                                       for p, a in zip(PROMPTS, adapters)]))
            batched = min(batched, seconds(lambda: conn.execute(batch, (PROMPTS, model, adapters))))
    return {"decode_base_ms": base / 64 * 1000, "decode_adapter_ms": with_adapter / 64 * 1000,
            "singles_s": singles, "batch_s": batched}


def train_xl(args, dsn: str) -> dict:
    model = XL[0]
    with connect(dsn, args.threads) as conn:
        print("creating GPT-2 xl's shape (6.2 GB of float32 weights) ...", flush=True)
        setup(conn, XL, 16, args.block_size)
        conn.execute("SELECT llm_adapter_create('bench-xl', %s, rank => %s, targets => %s)", (model, RANK, TARGETS))
    with connect(dsn, args.threads) as conn:
        pid = conn.info.backend_pid
        t = time.perf_counter()
        conn.execute("SELECT llm_train(%s, 3, lr_max => 1e-4, warmup => 1, batch_size => 1, adapter => 'bench-xl')",
                     (model,))
        seconds = time.perf_counter() - t
        rate = median_rate(conn, "llm_adapter_train_log", "adapter", "bench-xl", 3)
        peak = backend_peak_mb(pid)
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (model,))
    return {"seconds": seconds, "step_s": args.block_size / rate, "peak_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="an existing server (default: a private temporary one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed training steps on each side")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--xl", action="store_true", help="only train an adapter of GPT-2 xl's shape (memory)")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--peft-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peft_worker:
        peft_worker(args)
        return

    if args.xl:
        with server(args.dsn) as dsn:
            xl = train_xl(args, dsn)
        print(f"\nGPT-2 xl's shape, LoRA rank {RANK} on all four products, {args.threads} threads: "
              f"{xl['step_s']:.1f} s per step (batch 1 x {args.block_size}), 3 steps in {xl['seconds']:.0f} s "
              f"with loading; backend peak memory {xl['peak_mb'] / 1024:.1f} GB")
        return
    print(f"LoRA rank {RANK} on {', '.join(TARGETS)}; GPT-2 small's shape, batch {args.batch_size} x "
          f"{args.block_size}, {args.threads} threads; {os.cpu_count()} CPUs here", flush=True)
    runs = [] if args.skip_peft else [run_peft(args)]
    with server(args.dsn) as dsn:
        train = train_ours(args, dsn)
        serve = serve_ours(args, dsn)
    runs += [] if args.skip_peft else [run_peft(args)]

    print("\ntraining, tokens/s (median step):")
    print(f"  pg_llm full fine-tune       {train['full']:8.1f}")
    print(f"  pg_llm LoRA                 {train['lora']:8.1f}   {train['lora'] / train['full']:5.2f}x our full fine-tune")
    if runs:
        peft = statistics.mean(r["tokens_per_s"] for r in runs)
        print(f"  {runs[0]['version']:<27} {peft:8.1f}   (runs before/after ours: "
              + ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs) + f")\n  pg_llm LoRA / PEFT: {train['lora'] / peft:.2f}x")
    print("\nserving (float32):")
    print(f"  decode, base model          {serve['decode_base_ms']:7.2f} ms/token")
    print(f"  decode, with an adapter     {serve['decode_adapter_ms']:7.2f} ms/token   "
          f"{serve['decode_adapter_ms'] / serve['decode_base_ms']:5.3f}x the base's time")
    print(f"  8 prompts, 8 adapters: 8 single calls {serve['singles_s']:.2f} s, one llm_generate_batch "
          f"{serve['batch_s']:.2f} s: {serve['singles_s'] / serve['batch_s']:.2f}x")


if __name__ == "__main__":
    main()
