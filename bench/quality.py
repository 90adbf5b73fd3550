"""Quality of each inference precision against float32 on trained models, in one run.

    .venv/bin/python -m bench.quality [--models demo,gpt2-small] [--precisions bfloat16,int8,int4]
                                      [--simd auto] [--sequences 16] [--dsn DSN]

Reduced precision is judged on trained models (random weights give near-uniform distributions that
hide errors). Two, each trained once and kept in build/quality/<name>/ (a Hugging Face directory
and the held-out token sequences, held.npy):
  demo        `make demo`'s model (scripts/demo.sh, run whole in a private embedded server: 4
              layers, d_model 128, a 2048-token BPE trained on Shakespeare's plays, 600 steps);
              held out: the first sequences of its validation set (every tenth speech).
  gpt2-small  GPT-2 small's shape (12 layers, 12 heads, d_model 768, vocabulary 50257), trained
              with torch until its next-token distributions are peaked: a Markov language over
              64 of the tokens, each with one likely successor (p 0.9), as tests/test_precision.py
              uses on a tiny model; held out: fresh sequences of the language.
Per model and precision, against float32 through pg_llm (llm_logits after every proper prefix of
--sequences held-out sequences of 64 tokens, greedy continuations of 32 tokens after 16 prompts):
mean KL(float32 || precision) in nats, perplexity / float32's, and the share of greedy tokens
equal to float32's. Issue 24's gate for int4: perplexity at most 5% above float32's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import psycopg
import torch

from bench.common import server
from bench.inference import write_weights

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "quality"
LENGTH = 64                      # tokens per held-out sequence
GREEDY_PROMPTS, GREEDY_TOKENS = 16, 32


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- the models ---------------------------------------------------------------------------------

def demo_model(into: Path) -> None:
    """Runs scripts/demo.sh in a private embedded server, then exports its model and validation rows."""
    home = Path(tempfile.mkdtemp(prefix="pgllm-quality-", dir="/tmp"))
    os.chmod(home, 0o755)
    env = dict(os.environ, PGLLM_HOME=str(home), DEMO_DIR=str(CACHE / "demo-work"))
    pgllm = [str(ROOT / ".venv" / "bin" / "pgllm")]
    try:
        subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], check=True, env=env)
        status = subprocess.run(pgllm + ["server", "status", "--json"], env=env, check=True,
                                capture_output=True, text=True).stdout
        dsn = json.loads(status)["dsn"]
        subprocess.run(pgllm + ["--dsn", dsn, "export", "shakespeare", "--format", "safetensors",
                                "--output", str(into)], check=True, env=env)
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT tokens FROM llm_dataset WHERE dataset = 'val' ORDER BY id").fetchall()
        np.save(into / "held.npy", np.array([r[0][:LENGTH] for r in rows if len(r[0]) >= LENGTH]))
    finally:
        subprocess.run(pgllm + ["server", "stop"], env=env)
        shutil.rmtree(home, ignore_errors=True)


def markov(n: int, length: int, seed: int, tokens: np.ndarray) -> np.ndarray:
    """n sequences over `tokens`: successor with p 0.9, second with 0.07, any of them with 0.03."""
    chain = np.random.default_rng(0)
    k = len(tokens)
    successor, second = chain.permutation(k), chain.permutation(k)
    rng = np.random.default_rng(seed)
    x = np.empty((n, length), dtype=np.int64)
    x[:, 0] = rng.integers(0, k, n)
    for t in range(1, length):
        u = rng.random(n)
        x[:, t] = np.where(u < 0.9, successor[x[:, t - 1]], np.where(u < 0.97, second[x[:, t - 1]], rng.integers(0, k, n)))
    return tokens[x]


def gpt2_small_model(into: Path, steps: int = 400) -> None:
    """GPT-2 small's shape trained with torch on the Markov language until peaked: until the mean
    loss of 10 steps is below 0.8 nats (the language's entropy is about 0.55)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokens = np.sort(np.random.default_rng(1).choice(50257, 64, replace=False))
    model = GPT2LMHeadModel(GPT2Config(n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 10)
        batch = torch.from_numpy(markov(8, LENGTH, seed=1000 + step, tokens=tokens))
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"gpt2-small step {step}: loss {np.mean(losses[-10:]):.3f}", flush=True)
        if len(losses) >= 10 and np.mean(losses[-10:]) < 0.8:
            break
    model.eval().save_pretrained(into)
    np.save(into / "held.npy", markov(64, LENGTH, seed=7, tokens=tokens))


MODELS = {"demo": demo_model, "gpt2-small": gpt2_small_model}


def ensure(name: str) -> Path:
    path = CACHE / name
    if not (path / "held.npy").is_file():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        print(f"training the {name} model once (kept in {path}) ...", flush=True)
        MODELS[name](path)
    return path


# ---- the measurement ----------------------------------------------------------------------------

def prefix_logits(conn, model: str, seqs: np.ndarray) -> np.ndarray:
    """(n, L - 1, V): the logits after every proper prefix of each sequence."""
    out = []
    for seq in seqs:
        rows = conn.execute("SELECT llm_logits((%s::int[])[1:n], %s) FROM generate_series(1, %s) n ORDER BY n",
                            (seq.tolist(), model, len(seq) - 1)).fetchall()
        out.append([r[0] for r in rows])
    return np.array(out, dtype=np.float32)


def greedy(conn, model: str, prompts: np.ndarray, n: int = GREEDY_TOKENS) -> np.ndarray:
    return np.array([conn.execute("SELECT llm_generate_tokens(%s, %s, 0, model => %s)",
                                  (p.tolist(), n, model)).fetchone()[0] for p in prompts])


def measure(conn, model: str, prec: str, seqs: np.ndarray, prompts: np.ndarray) -> dict:
    conn.execute("SELECT set_config('pg_llm.inference_precision', %s, false)", (prec,))
    lp = log_softmax(prefix_logits(conn, model, seqs))
    nll = -np.take_along_axis(lp, seqs[:, 1:, None], -1).mean()
    return {"lp": lp, "nll": nll, "greedy": greedy(conn, model, prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,gpt2-small")
    parser.add_argument("--precisions", default="bfloat16,int8,int4")
    parser.add_argument("--simd", default="auto", help="pg_llm.simd for the measurement")
    parser.add_argument("--sequences", type=int, default=16, help="held-out sequences of 64 tokens per model")
    parser.add_argument("--dsn", help="an existing server with pg_llm (default: a private temporary one)")
    args = parser.parse_args()

    from transformers import GPT2LMHeadModel

    paths = {name: ensure(name) for name in args.models.split(",")}
    precisions = args.precisions.split(",")
    results = {}
    with server(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT set_config('pg_llm.simd', %s, false)", (args.simd,))
        for name, path in paths.items():
            held = np.load(path / "held.npy")
            seqs = held[:args.sequences]
            prompts = held[-GREEDY_PROMPTS:, :16]
            write_weights(conn, GPT2LMHeadModel.from_pretrained(path).float(), name=f"quality-{name}")
            ref = measure(conn, f"quality-{name}", "float32", seqs, prompts)
            peak = np.exp(ref["lp"]).max(-1).mean()
            results[name] = [("float32", 0.0, 1.0, 1.0, peak, np.exp(ref["nll"]))]
            for prec in precisions:
                m = measure(conn, f"quality-{name}", prec, seqs, prompts)
                kl = (np.exp(ref["lp"]) * (ref["lp"] - m["lp"])).sum(-1).mean()
                results[name].append((prec, kl, np.exp(m["nll"] - ref["nll"]), (m["greedy"] == ref["greedy"]).mean(),
                                      np.exp(m["lp"]).max(-1).mean(), np.exp(m["nll"])))
            conn.execute("DELETE FROM llm_model_config WHERE model = %s", (f"quality-{name}",))
    print(f"\npg_llm.simd = {args.simd}; {args.sequences} held-out sequences of {LENGTH} tokens per model "
          f"({args.sequences * (LENGTH - 1)} positions), greedy: {GREEDY_PROMPTS} x {GREEDY_TOKENS} tokens\n")
    print(f"{'model':12}{'precision':11}{'perplexity':>11}{'/ float32':>11}{'mean KL':>10}{'greedy =':>10}{'mean max p':>12}")
    for name, rows in results.items():
        for prec, kl, ratio, agree, peak, ppl in rows:
            print(f"{name:12}{prec:11}{ppl:11.3f}{ratio:11.4f}{kl:10.5f}{agree:10.3f}{peak:12.3f}")


if __name__ == "__main__":
    main()
