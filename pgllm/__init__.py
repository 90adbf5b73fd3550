"""pgllm: train and serve GPT-2 models inside PostgreSQL."""

__version__ = "0.3.0"
