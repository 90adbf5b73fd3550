"""Optional dependencies: what needs them says which, and the extra that installs them.

pgllm itself needs only its small runtime dependencies; reading Hugging Face checkpoints and
tokenizers and drawing PNGs take the extras declared in pyproject.toml.
"""

from __future__ import annotations

import importlib.util

from . import DISTRIBUTION
from .errors import PgllmError

# module -> the extra that installs it (pyproject.toml: [project.optional-dependencies])
EXTRA = {"transformers": "convert", "torch": "convert", "safetensors": "convert", "tokenizers": "tokenizer",
         "matplotlib": "plot"}


def need(what: str, *modules: str, alternative: str | None = None) -> None:
    """Raise one clear error when any of `modules` is not installed, e.g.
    `pgllm convert gpt2 needs transformers and torch: pip install 'pgllm-gpt2[convert]'`."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = ",".join(sorted({EXTRA[m] for m in missing}))
        raise PgllmError(f"{what} needs {' and '.join(missing)}: pip install '{DISTRIBUTION}[{extras}]'",
                         hint=alternative)
