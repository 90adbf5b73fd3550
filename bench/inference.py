"""Inference speed: pg_llm inside PostgreSQL beside PyTorch (transformers), same weights, same run.

    .venv/bin/python -m bench.inference [--dsn DSN] [--repeat 5] [--threads 2]

Both sides run a GPT-2-small-shaped model (12 layers, 12 heads, 768, 1024 positions, 50257 tokens)
with the same random weights (torch.manual_seed(0)), float32, on --threads threads
(torch.set_num_threads; SET pg_llm.threads). Without --dsn a private PostgreSQL server is started
in a temporary folder, as the tests do. Measured, best of --repeat runs, the two sides interleaved:
  - decode tokens/s: 64 greedy steps with the key/value cache after a 16-token prompt. Ours: the
    time of llm_generate_tokens(prompt, 65) minus that of llm_generate_tokens(prompt, 1) (both
    run the same prompt pass), over 64. PyTorch: 64 calls of model(next_token, cache) + argmax.
  - prompt tokens/s at T = 128 and 512: ours llm_logits(T tokens), timed on the client; PyTorch
    model(ids, use_cache=True, logits_to_keep=1), as generate's prefill.
  - backend memory: the server process's private resident memory (RssAnon: its caches and
    buffers; not the shared buffers it reads the tables through, nor the weights, which are the
    server's one shared copy, mapped from a file: see bench.serving), at its peak while it builds
    that copy and runs everything above (sampled every 5 ms), and at the end, beside the size of
    the weights. Read from /proc, so only when the server runs on this machine.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import psycopg
import torch

from bench.common import server


MODEL = "bench-gpt2-small"
PROMPT_DECODE = 16
NEW_TOKENS = 64
PROMPT_LENGTHS = (128, 512)


def reference_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).float().eval()


def write_weights(conn, model, name: str = MODEL) -> None:
    """The weights of a transformers GPT2LMHeadModel as model `name` (replacing any)."""
    cfg = model.config
    conn.execute("DELETE FROM llm_model_config WHERE model = %s", (name,))
    conn.execute("INSERT INTO llm_model_config (model, n_layer, n_head, d_model, n_positions, vocab) "
                 "VALUES (%s, %s, %s, %s, %s, %s)",
                 (name, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.vocab_size))
    with conn.cursor().copy("COPY llm_param (model, name, shape, data) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["text", "text", "int4[]", "bytea"])
        for key, t in model.transformer.state_dict().items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            param = key.removesuffix(".weight") if key in ("wte.weight", "wpe.weight") else key
            copy.write_row((name, param, list(t.shape), t.detach().numpy().astype("<f4").tobytes()))


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ours(conn, repeat: int) -> dict[str, float]:
    prompt = list(range(1000, 1000 + PROMPT_DECODE))
    gen = "SELECT llm_generate_tokens(%s, %s, 0, model => %s)"
    t1 = best_of(repeat, lambda: conn.execute(gen, (prompt, 1, MODEL)).fetchone())
    t65 = best_of(repeat, lambda: conn.execute(gen, (prompt, NEW_TOKENS + 1, MODEL)).fetchone())
    out = {"decode": NEW_TOKENS / (t65 - t1)}
    for T in PROMPT_LENGTHS:
        ids = [(17 * i) % 50257 for i in range(T)]
        out[f"prompt{T}"] = T / best_of(repeat, lambda: conn.execute("SELECT llm_logits(%s, %s)", (ids, MODEL)).fetchone())
    return out


def pytorch(model, repeat: int) -> dict[str, float]:
    from transformers import DynamicCache

    prompt = torch.arange(1000, 1000 + PROMPT_DECODE)[None]

    def decode():
        cache = DynamicCache(config=model.config)
        out = model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(NEW_TOKENS):
            out = model(nxt, cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start

    with torch.no_grad():
        out = {"decode": NEW_TOKENS / min(decode() for _ in range(repeat))}
        for T in PROMPT_LENGTHS:
            ids = torch.tensor([[(17 * i) % 50257 for i in range(T)]])
            out[f"prompt{T}"] = T / best_of(repeat, lambda: model(ids, cache=DynamicCache(config=model.config),
                                                                   use_cache=True, logits_to_keep=1))
    return out


def private_memory(pid: int) -> int | None:
    """RssAnon of a process, in bytes (None when it is not on this machine)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory(threading.Thread):
    """Samples a process's private memory until stopped; .peak is the largest value seen."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, private_memory(self.pid) or 0)
            time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="an existing server with pg_llm (default: a private temporary one)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = reference_model()
    weights = sum(p.numel() for p in model.transformer.parameters()) * 4
    with server(args.dsn) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            print(f"writing {weights / 2**20:.0f} MB of weights as model {MODEL!r} ...", flush=True)
            write_weights(conn, model)
        # a fresh backend: its memory is the engine's alone
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"SET pg_llm.threads = {args.threads}")
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            sampler = PeakMemory(pid)
            sampler.start()
            conn.execute("SELECT llm_logits('{1}', %s)", (MODEL,))  # load the weights
            rounds = [(ours(conn, args.repeat), pytorch(model, args.repeat)) for _ in range(2)]
            sampler.done.set()
            sampler.join()
            memory = (sampler.peak, private_memory(pid)) if sampler.peak else None
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))

    a = {k: max(r[0][k] for r in rounds) for k in rounds[0][0]}
    b = {k: max(r[1][k] for r in rounds) for k in rounds[0][1]}
    print(f"\nGPT-2 small shape, float32, {args.threads} threads, best of {2 * args.repeat} runs\n")
    print(f"{'':28}{'pg_llm':>12}{'PyTorch':>12}{'ratio':>9}")
    names = {"decode": f"decode tok/s ({PROMPT_DECODE}+{NEW_TOKENS})"} | {f"prompt{T}": f"prompt tok/s (T={T})" for T in PROMPT_LENGTHS}
    for k, label in names.items():
        print(f"{label:28}{a[k]:12.1f}{b[k]:12.1f}{a[k] / b[k]:8.2f}x")
    if memory:
        peak, end = memory
        print(f"\nbackend private memory (RssAnon; the weights are the server's shared copy): peak {peak / 2**20:.0f} MB = {peak / weights:.2f}x the weights "
              f"({weights / 2**20:.0f} MB), at the end {end / 2**20:.0f} MB = {end / weights:.2f}x")

if __name__ == "__main__":
    main()
