"""pgllm: train and serve GPT-2 models inside PostgreSQL."""

__version__ = "0.5.0"

# The name to pip install (pyproject.toml's [project] name): "pgllm" on PyPI is another project.
DISTRIBUTION = "pgllm-gpt2"
