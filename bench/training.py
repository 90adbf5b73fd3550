"""Training throughput and memory: llm_train inside PostgreSQL beside PyTorch, in one run.

    .venv/bin/python -m bench.training [--dsn DSN] [--steps 100] [--torch-steps 20] [--threads 2]

GPT-2 small (12 layers, 12 heads, 768 channels, vocabulary 50257: 124M parameters), batch 4 x 64
tokens, AdamW (nanoGPT's decay groups), gradient clipping at 1.0, both sides on --threads threads
and on the same random initialisation and data.
  - PyTorch: transformers.GPT2LMHeadModel + torch.optim.AdamW(fused=True), in a subprocess of its
    own, run once before and once after ours (the figure is the mean of the two, so that a change
    in the machine's load during the run does not favour either side); tokens/s over
    --torch-steps steps after 3 warm-up steps; peak memory = the process's maximum resident set.
  - pg_llm, steady: the median tokens/s that llm_train logs per step (forward, backward, clipping,
    AdamW, reading the batch, writing the log row).
  - pg_llm, end to end: one llm_train call of --steps steps in a new session, timed on the client:
    loading the weights and AdamW state from the tables, the steps, writing back the parameters,
    both moments and the step counter. Peak memory = the backend's maximum resident set (VmHWM,
    which counts the shared buffers it touched).
Without --dsn the benchmark starts a private PostgreSQL server in a temporary folder (as the tests
do), so it never touches a server in use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psycopg

from bench.common import server
from pgllm.commands.train import train_event

MODEL = "bench-gpt2"
SHAPE = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)


def gpt2_small(seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     activation_function="gelu_new", layer_norm_epsilon=1e-5)
    return GPT2LMHeadModel(cfg)


def data(rows: int, T: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, SHAPE["vocab_size"], size=(rows, T + 1))


# ---- PyTorch, in its own process ----------------------------------------------------------------

def torch_worker(args) -> None:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    model = gpt2_small()
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.999), eps=1e-8, fused=True)
    rows = torch.tensor(data(args.rows, args.block_size), dtype=torch.long)
    B, V = args.batch_size, SHAPE["vocab_size"]

    def step(i: int) -> float:
        batch = rows[[(i * B + b) % len(rows) for b in range(B)]]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(3):
        step(i)
    start = time.perf_counter()
    times = []
    for i in range(args.torch_steps):
        t = time.perf_counter()
        step(3 + i)
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    tokens = B * args.block_size
    print(json.dumps({
        "tokens_per_s": tokens * args.torch_steps / elapsed,
        "median_tokens_per_s": tokens / statistics.median(times),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "version": torch.__version__,
    }))


def run_torch(args) -> dict:
    cmd = [sys.executable, "-m", "bench.training", "--torch-worker", "--threads", str(args.threads),
           "--torch-steps", str(args.torch_steps), "--batch-size", str(args.batch_size),
           "--block-size", str(args.block_size), "--rows", str(args.rows)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise SystemExit(f"PyTorch worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- pg_llm -------------------------------------------------------------------------------------

def backend_peak_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None  # a remote server
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(m[1]) / 1024 if m else None


def run_ours(args, dsn: str) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_llm")
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))
        conn.execute("TRUNCATE llm_dataset RESTART IDENTITY")
        conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                     "VALUES (%s, %s, %s, %s, %s, %s)", (MODEL, *SHAPE.values()))
        model = gpt2_small()
        with conn.cursor() as cur:
            with cur.copy("COPY llm_param (model, name, shape, data) FROM STDIN") as copy:
                for name, t in model.transformer.state_dict().items():
                    name = name.removesuffix(".weight") if name in ("wte.weight", "wpe.weight") else name
                    a = t.detach().numpy().astype("<f4")
                    copy.write_row((MODEL, name, list(a.shape), a.tobytes()))
            with cur.copy("COPY llm_dataset (tokens, target) FROM STDIN") as copy:
                for r in data(args.rows, args.block_size):
                    copy.write_row((r[:-1].tolist(), r[1:].tolist()))
        del model
        conn.execute("CHECKPOINT")

    call = ("SELECT llm_train(%s, %s, lr_max => 1e-4, warmup => 10, batch_size => %s, total_steps => 1000, "
            "beta1 => 0.9, beta2 => 0.999, eps => 1e-8, wd => 0.01, grad_clip => 1.0)")
    # a first short call creates the AdamW state, so that the timed call loads and stores all of it
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT set_config('pg_llm.threads', %s, false)", (str(args.threads),))
        conn.execute(call, (MODEL, 2, args.batch_size))
        conn.execute("CHECKPOINT")

    phases = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT set_config('pg_llm.threads', %s, false)", (str(args.threads),))
        conn.execute("SET client_min_messages = debug1")
        conn.add_notice_handler(lambda d: phases.update(end=event)
                                if (event := train_event(d)) and event["event"] == "llm_train.end" else None)
        pid = conn.info.backend_pid
        start = time.perf_counter()
        conn.execute(call, (MODEL, args.steps, args.batch_size))
        elapsed = time.perf_counter() - start
        peak = backend_peak_mb(pid)
        rates = [r[0] for r in conn.execute("SELECT tokens_per_s FROM llm_train_log WHERE model = %s "
                                            "ORDER BY step DESC LIMIT %s", (MODEL, args.steps))]
    return {
        "steady_tokens_per_s": statistics.median(rates),
        "e2e_tokens_per_s": args.steps * args.batch_size * args.block_size / elapsed,
        "e2e_seconds": elapsed,
        "peak_mb": peak,
        "phases": phases.get("end"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="an existing server (default: a private temporary one)")
    p.add_argument("--steps", type=int, default=100, help="steps of the timed llm_train call")
    p.add_argument("--torch-steps", type=int, default=20, help="timed PyTorch steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--rows", type=int, default=512, help="rows of random tokens in the dataset")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_worker:
        torch_worker(args)
        return

    print(f"GPT-2 small (124M parameters), batch {args.batch_size} x {args.block_size} tokens, "
          f"{args.threads} threads, AdamW + clipping; {os.cpu_count()} CPUs here", flush=True)
    runs = [run_torch(args)] if not args.skip_torch else []
    with server(args.dsn) as dsn:
        ours = run_ours(args, dsn)
    runs += [run_torch(args)] if not args.skip_torch else []
    theirs = None
    if runs:
        theirs = {"version": runs[0]["version"], "peak_mb": max(r["peak_mb"] for r in runs),
                  "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs)}

    def row(label, tps, mb, ref_tps=None, ref_mb=None):
        ratio = f"{tps / ref_tps:5.2f}x" if ref_tps else ""
        mem = f"{mb:8.0f} MB" if mb is not None else "       n/a"
        mem_ratio = f"{mb / ref_mb:5.2f}x" if (ref_mb and mb is not None) else ""
        print(f"  {label:<46} {tps:8.1f} tok/s {ratio:>7}   {mem} {mem_ratio:>7}")

    print()
    ref_tps = theirs["tokens_per_s"] if theirs else None
    ref_mb = theirs["peak_mb"] if theirs else None
    if theirs:
        row(f"PyTorch {theirs['version']} (AdamW fused=True)", theirs["tokens_per_s"], theirs["peak_mb"])
        print("  " + " " * 46 + "   (runs before/after ours: "
              + ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs) + " tok/s)")
    row("pg_llm llm_train, steady (median step)", ours["steady_tokens_per_s"], ours["peak_mb"], ref_tps, ref_mb)
    row(f"pg_llm llm_train, end to end ({args.steps} steps + write-back)", ours["e2e_tokens_per_s"],
        ours["peak_mb"], ref_tps, ref_mb)
    if ours["phases"]:
        end = ours["phases"]
        print(f"\n  llm_train: {end['steps']} steps in {end['seconds']:.2f} s (loading {end['loading_s']:.2f} s, "
              f"training {end['training_s']:.2f} s, writing back {end['writing_s']:.2f} s)")


if __name__ == "__main__":
    main()
