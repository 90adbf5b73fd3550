"""llama.cpp, the anchor for CPU inference: its decode and prompt speed on a GPT-2 model.

    .venv/bin/python -m bench.llamacpp [--model-dir DIR] [--threads 2] [--repeat 3]
                                       [--formats f32,F16,Q8_0,Q4_0] [--build native|avx2]

llama.cpp comes from the PyPI source distribution of llama-cpp-python (pinned below), which
carries it in vendor/llama.cpp together with its converter (convert_hf_to_gguf.py, and gguf-py,
the `gguf` package the converter imports). The first call builds its tools with CMake, as a user
would (Release, CPU only, no network features), into build/llamacpp/ (ignored by git; kept and
reused: it takes 10 minutes or more on two busy cores). Never part of `make test`. Two builds
(--build): `native` (GGML_NATIVE: every instruction set of the build machine, what a user building
it there gets) and `avx2` (GGML_NATIVE off: AVX2, FMA, F16C, BMI2 and no AVX-512 whatever the
machine, to compare with pg_llm.simd = avx2 on an AVX-512 machine; llama-bench only).

A Hugging Face GPT-2 directory (`save_pretrained`, or `pgllm export MODEL --format safetensors
--output DIR` for a model in our tables) is converted to GGUF f32, then quantised by
llama-quantize to F16, Q8_0 and Q4_0 (whose tied embedding, also the output head, llama-quantize
keeps in Q6_K); `llama-bench` times decode (tg64: 64 tokens, one at a time) and
prompt (pp128: one batch of 128) on --threads threads, best of --repeat runs. Without
--model-dir, a GPT-2-small-shaped model with random weights (torch.manual_seed(0), as
bench.inference uses) is measured. llama.cpp's threads synchronise at every operation by
spinning: on a busy machine its decode collapses (3 tok/s at a load average of 8), so compare on
a quiet one.

Other benchmarks call `speeds(model_dir, threads)` to print ours beside llama.cpp in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is build 0c1e570
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "llamacpp"
SOURCE = CACHE / "llama.cpp"          # vendor/llama.cpp of the sdist
BUILD = CACHE / "cmake"               # CMake build tree of the native build; binaries in BUILD/bin
TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize", "llama-server")
FORMATS = ("f32", "F16", "Q8_0", "Q4_0")  # as llama-quantize names them
BUILDS = {  # name: (build tree, CMake flags, tools)
    "native": (BUILD, ["-DGGML_NATIVE=ON"], TOOLS),
    "avx2": (CACHE / "cmake-avx2", ["-DGGML_NATIVE=OFF", "-DGGML_AVX512=OFF"], ("llama-bench",)),
}


def tool(name: str, build: str = "native") -> Path:
    """Path of a built llama.cpp binary (build first with ensure_built)."""
    return BUILDS[build][0] / "bin" / name


def _run(cmd: list, quiet: bool = False, **kw) -> None:
    """Run a command; a quiet one shows its output only when it fails."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    if not quiet:
        subprocess.run([str(c) for c in cmd], check=True, **kw)
        return
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def ensure_source() -> Path:
    """vendor/llama.cpp of the pinned llama-cpp-python sdist, downloaded and unpacked once."""
    if (SOURCE / "convert_hf_to_gguf.py").is_file():
        return SOURCE
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={VERSION}", "-d", CACHE])
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    _run(["tar", "xzf", sdist, "-C", tmp, f"llama_cpp_python-{VERSION}/vendor/llama.cpp"])
    (tmp / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp").rename(SOURCE)
    shutil.rmtree(tmp)
    return SOURCE


def ensure_built(build: str = "native") -> None:
    """Build the tools of a build (native: llama-bench, -perplexity, -quantize and -server) unless there."""
    tree, flags, tools = BUILDS[build]
    if all(tool(t, build).is_file() for t in tools):
        return
    src = ensure_source()
    print(f"building llama.cpp tools into {tree} (10+ minutes on two cores; done once) ...", flush=True)
    _run(["cmake", "-S", src, "-B", tree, "-DCMAKE_BUILD_TYPE=Release", *flags,
          "-DBUILD_SHARED_LIBS=OFF",                   # binaries that need no LD_LIBRARY_PATH
          "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"])   # no downloads at build time
    _run(["cmake", "--build", tree, "--config", "Release", "-j", str(os.cpu_count() or 2),
          "--target", *tools])


def _staged(model_dir: Path, into: Path) -> Path:
    """A copy of a HF GPT-2 directory as the converter wants it: n_ctx in config.json, tokenizer files."""
    from pgllm.bundled import gpt2_tokenizer_files

    into.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            os.symlink(f.resolve(), into / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    config.setdefault("n_ctx", config["n_positions"])
    (into / "config.json").write_text(json.dumps(config, indent=1))
    if not (into / "vocab.json").exists() and not (into / "tokenizer.json").exists():
        vocab, merges = gpt2_tokenizer_files()
        shutil.copy(vocab, into / "vocab.json")
        shutil.copy(merges, into / "merges.txt")
    return into


def convert(model_dir: Path, out_dir: Path, formats=FORMATS) -> dict[str, Path]:
    """GGUF files of a HF GPT-2 directory: {format: path}. f32 by the converter, the rest by llama-quantize."""
    src = ensure_source()
    ensure_built()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {fmt: out_dir / f"model-{fmt}.gguf" for fmt in formats}
    f32 = out_dir / "model-f32.gguf"
    with tempfile.TemporaryDirectory(prefix="pgllm-gguf-") as tmp:
        staged = _staged(Path(model_dir), Path(tmp) / "model")
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        _run([sys.executable, src / "convert_hf_to_gguf.py", staged, "--outtype", "f32", "--outfile", f32],
             quiet=True, env=env)
    for fmt, path in files.items():
        if fmt != "f32":
            _run([tool("llama-quantize"), f32, path, fmt], quiet=True)
    return files


def bench_gguf(path: Path, threads: int = 2, repeat: int = 3, build: str = "native",
               poll: int | None = None) -> dict[str, float]:
    """llama-bench on one file: {'tg64': tokens/s, 'pp128': tokens/s}, best of `repeat` runs. poll:
    llama-bench --poll (how much its threads spin waiting for work; None: its default, 50)."""
    ensure_built(build)
    out = subprocess.run([str(tool("llama-bench", build)), "-m", str(path), "-t", str(threads), "-p", "128",
                          "-n", "64", "-r", str(repeat), "-o", "json",
                          *(["--poll", str(poll)] if poll is not None else [])],
                         check=True, capture_output=True, text=True).stdout
    result = {}
    for row in json.loads(out):
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        result[key] = max(float(v) for v in row["samples_ts"])
    return result


def speeds(model_dir: Path, threads: int = 2, repeat: int = 3, formats=FORMATS,
           build: str = "native") -> dict[str, dict[str, float]]:
    """llama.cpp's speed on a HF GPT-2 directory: {format: {'tg64': tok/s, 'pp128': tok/s}}."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=CACHE) as out:  # on disk: up to 1 GB
        files = convert(Path(model_dir), Path(out), formats)
        return {fmt: bench_gguf(path, threads, repeat, build) for fmt, path in files.items()}


def random_gpt2_small(into: Path) -> Path:
    """A GPT-2-small-shaped model with random weights (seed 0), saved for from_pretrained."""
    from bench.inference import reference_model

    reference_model().save_pretrained(into)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a HF GPT-2 directory (default: random GPT-2 small)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--build", default="native", choices=list(BUILDS))
    args = parser.parse_args()

    formats = tuple(args.formats.split(","))
    with tempfile.TemporaryDirectory(prefix="pgllm-hf-") as tmp:
        model_dir = args.model_dir or random_gpt2_small(Path(tmp) / "gpt2-small")
        result = speeds(model_dir, args.threads, args.repeat, formats, args.build)
    print(f"\nllama.cpp {VERSION} (sdist, {args.build} build), {args.threads} threads, best of {args.repeat} runs, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print(f"{'format':8}{'tg64 tok/s':>12}{'pp128 tok/s':>13}")
    for fmt, r in result.items():
        print(f"{fmt:8}{r['tg64']:12.1f}{r['pp128']:13.1f}")


if __name__ == "__main__":
    main()
