"""Embedding a table: llm_embed_batch against llm_embed one row at a time and transformers on the client.

    python -m bench.embeddings [--dsn DSN] [--rows 256] [--layers 6 --d-model 384] [--rounds 3]

A random GPT-2 (speed does not depend on the weights; GPT-2's tokenizer, bundled) embeds a table of
`--rows` sentences of 8 to 40 words (about 10 to 50 tokens), three ways, interleaved in rounds (the
best of each kept):
  - batch:   SELECT ... FROM llm_embed_batch(array_agg(body)) (shared forward passes in the server);
  - single:  SELECT llm_embed(body) FROM docs (one forward pass per row);
  - client:  transformers' GPT2Model on the client (the rows fetched, tokenized with the same
             tokenizer, 32 a batch padded with an attention mask, mean over each row's tokens), on
             torch's threads (as many as the server's pg_llm.threads, one per core).
Prints rows/s for each and the ratios, with the machine's cores and load (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import psycopg

from .common import load_gpt2_tokenizer, server

MODEL = "bench-embed"
WORDS = ("the of and to in is was for on that with as by at from it this an be are or his her which "
         "river table model server query index vector memory language weight token layer network data "
         "system engine value result test field record column page block cache write read").split()


def setup(conn, layers: int, d_model: int, rows: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.weights import store_hf_model  # writes llm_param as pgllm import does

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=max(1, d_model // 64), n_embd=d_model,
                                    n_positions=128)).float().eval()
    store_hf_model(conn, MODEL, hf)
    load_gpt2_tokenizer(conn, MODEL)
    rng = np.random.default_rng(0)
    conn.execute("DROP TABLE IF EXISTS bench_docs")
    conn.execute("CREATE TABLE bench_docs (id int PRIMARY KEY, body text)")
    with conn.cursor().copy("COPY bench_docs FROM STDIN") as copy:
        for i in range(rows):
            copy.write_row((i, " ".join(rng.choice(WORDS, int(rng.integers(8, 41))))))
    return hf.transformer


def client_embed(conn, model, tokenizer) -> int:
    import torch

    bodies = [r[0] for r in conn.execute("SELECT body FROM bench_docs ORDER BY id")]
    out = []
    with torch.no_grad():
        for i in range(0, len(bodies), 32):
            enc = tokenizer(bodies[i:i + 32], return_tensors="pt", padding=True)
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1)
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return sum(len(o) for o in out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="an existing server with pg_llm (default: a private temporary one)")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import torch

    from pgllm.bundled import gpt2_hf_tokenizer

    tokenizer = gpt2_hf_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    with server(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        model = setup(conn, args.layers, args.d_model, args.rows)
        threads = int(conn.execute("SELECT split_part(pg_llm_blas_info(), ', ', 2)::text").fetchone()[0].split()[0])
        torch.set_num_threads(threads)
        tokens = conn.execute("SELECT sum(cardinality(llm_encode(body, %s))) FROM bench_docs", (MODEL,)).fetchone()[0]
        conn.execute("SELECT llm_embed('warm up', %s)", (MODEL,))  # the weights loaded: not timed
        ways = {
            "batch": lambda: conn.execute(
                "SELECT count(embedding) FROM (SELECT array_agg(body ORDER BY id) b FROM bench_docs) d, "
                "llm_embed_batch(d.b, %s)", (MODEL,)).fetchone()[0],
            "single": lambda: conn.execute("SELECT count(llm_embed(body, %s)) FROM bench_docs", (MODEL,)).fetchone()[0],
            "client": lambda: client_embed(conn, model, tokenizer),
        }
        best = {k: float("inf") for k in ways}
        for _ in range(args.rounds):
            for name, run in ways.items():
                start = time.perf_counter()
                assert run() == args.rows
                best[name] = min(best[name], time.perf_counter() - start)
        print(f"\n{args.rows} rows ({tokens} tokens), GPT-2 {args.layers} layers x {args.d_model}, vocab 50257, "
              f"float32, {threads} threads each, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
              f"best of {args.rounds} interleaved rounds\n")
        print(f"{'way':<40}{'seconds':>9}{'rows/s':>9}{'batch is':>11}")
        labels = {"batch": "llm_embed_batch (server)", "single": "llm_embed, one row at a time (server)",
                  "client": "transformers GPT2Model (client)"}
        for name in ways:
            ratio = best[name] / best["batch"]
            print(f"{labels[name]:<40}{best[name]:9.2f}{args.rows / best[name]:9.1f}"
                  f"{'' if name == 'batch' else f'{ratio:10.2f}x'}")
        conn.execute("DROP TABLE bench_docs")
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (MODEL,))


if __name__ == "__main__":
    main()
