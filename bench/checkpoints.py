"""Benchmark: convert, import and export of a GPT-2-small-shaped checkpoint (124M parameters).

    .venv/bin/python -m bench.checkpoints [--dsn DSN]

Without --dsn it starts a private embedded server (as the tests do). Prints our times beside
PyTorch/transformers doing the comparable job, and the server backend's peak memory (VmHWM,
which counts the shared buffers it touched too) during each import. Targets: import under 8 s,
peak memory under twice the model's size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import psycopg

from bench import common
from pgllm import npz
from pgllm.commands.import_ import import_via_client

CONFIG = npz.Config(12, 12, 768, 1024, 50257)
PGLLM = Path(sys.executable).parent / "pgllm"


def backend_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def backend_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (utime, stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def pgllm(*args: str, dsn: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([str(PGLLM), "--dsn", dsn, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"pgllm {' '.join(args)} failed: {proc.stderr.strip()}")
    return time.perf_counter() - start


def forget(dsn: str, model: str) -> None:
    """Drop the model, and write out what that dirtied, so that each import starts alike."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM llm_model_config WHERE model = %s", (model,))
        conn.execute("CHECKPOINT")


def import_in_fresh_backend(dsn: str, model: str, run) -> tuple[float, float, float]:
    """(seconds, the backend's CPU seconds, its peak RSS in MB) of one import in a backend of its own."""
    forget(dsn, model)
    with psycopg.connect(dsn) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.commit()
        cpu = backend_cpu_s(pid)
        seconds, _ = timed(lambda: (run(conn), conn.commit()))
        return seconds, backend_cpu_s(pid) - cpu, backend_peak_mb(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a server on this machine (default: a private embedded one)")
    parser.add_argument("--repeat", type=int, default=3, help="imports of each route (the best is shown)")
    args = parser.parse_args()

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    stack = ExitStack()
    dsn = stack.enter_context(common.server(args.dsn))
    work = Path(tempfile.mkdtemp(prefix="pgllm-bench-", dir="/tmp"))
    work.chmod(0o755)  # the server's OS user reads the converted file from here
    size_mb = 4 * CONFIG.num_params() / 1e6
    try:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        hf_dir = work / "hf"
        t_save, _ = timed(lambda: model.save_pretrained(hf_dir))
        t_load, _ = timed(lambda: transformers.GPT2LMHeadModel.from_pretrained(hf_dir))

        def durable_save():
            with open(work / "state.pt", "wb") as f:
                torch.save(model.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
        t_torch_save, _ = timed(durable_save)
        del model

        path = work / "gpt2-small.npz"
        t_convert = pgllm("convert", str(hf_dir), "--output", str(path), dsn=dsn)
        path.chmod(0o644)
        file_mb = path.stat().st_size / 1e6
        server, client = [], []
        for _ in range(args.repeat):
            server.append(import_in_fresh_backend(
                dsn, "bench", lambda c: c.execute("SELECT pg_llm_import_npz(%s, 'bench')", (str(path),))))
            client.append(import_in_fresh_backend(dsn, "bench", lambda c: import_via_client(c, path, "bench", False)))
        cli = []
        for _ in range(args.repeat):
            forget(dsn, "bench")
            cli.append(pgllm("import", str(path), "--model", "bench", dsn=dsn))
        t_cli = min(cli)
        t_export = pgllm("export", "bench", "--output", str(work / "out.npz"), dsn=dsn)
        t_export_st = pgllm("export", "bench", "--output", str(work / "out-hf"), "--format", "safetensors", dsn=dsn)
        (work / "server").mkdir()
        (work / "server").chmod(0o777)  # the server's OS user writes here
        with psycopg.connect(dsn, autocommit=True) as conn:
            t_export_c, _ = timed(lambda: conn.execute("SELECT pg_llm_export_npz(%s, 'bench')",
                                                       (str(work / "server" / "gpt2-small.npz"),)))
            conn.execute("DELETE FROM llm_model_config WHERE model = 'bench'")

        t_server, t_client = min(t for t, _, _ in server), min(t for t, _, _ in client)
        cpu_server, cpu_client = min(c for _, c, _ in server), min(c for _, c, _ in client)
        peak_server, peak_client = max(p for _, _, p in server), max(p for _, _, p in client)
        rows = [
            ("pgllm convert (HF dir -> npz)", t_convert, "save_pretrained", t_save),
            ("import, the server reads the file", t_server, "torch.save + fsync", t_torch_save),
            ("import, bytes over the connection", t_client, "torch.save + fsync", t_torch_save),
            ("pgllm import (whole command, auto)", t_cli, "torch.save + fsync", t_torch_save),
            ("pgllm export --format npz", t_export, "save_pretrained", t_save),
            ("pgllm export --format safetensors", t_export_st, "save_pretrained", t_save),
            ("pg_llm_export_npz (server file)", t_export_c, "save_pretrained", t_save),
        ]
        print(f"\nGPT-2-small shape: {CONFIG.num_params():,} parameters, {size_mb:.0f} MB float32; "
              f"file {file_mb:.0f} MB; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
              f"imports: best of {args.repeat}\n")
        print(f"{'ours':<38}{'s':>7}   {'PyTorch/transformers':<22}{'s':>7}  {'ratio':>6}")
        for what, ours, theirs_what, theirs in rows:
            print(f"{what:<38}{ours:7.2f}   {theirs_what:<22}{theirs:7.2f}  {ours / theirs:6.2f}")
        print(f"(an import writes the weights durably, WAL and fsync at commit, as torch.save + fsync does; "
              f"from_pretrained, which maps a safetensors file into memory, takes {t_load:.2f} s)")
        print(f"\nserver backend CPU time during import: {cpu_server:.2f} s (the server reads the file), "
              f"{cpu_client:.2f} s (bytes over the connection)")
        print(f"server backend peak memory (VmHWM, shared buffers included) during import: {peak_server:.0f} MB "
              f"(the server reads the file), {peak_client:.0f} MB (bytes over the connection); model {size_mb:.0f} MB")
        print(f"targets: import under 8 s: {'met' if t_server < 8 else 'MISSED'} ({t_server:.2f} s; "
              f"load average now {os.getloadavg()[0]:.1f}); "
              f"peak under 2x the model ({2 * size_mb:.0f} MB): "
              f"{'met' if max(peak_server, peak_client) < 2 * size_mb else 'MISSED'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        stack.close()


if __name__ == "__main__":
    main()
