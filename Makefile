# The two commands for a fresh machine: `make demo` and `make test`.
# Everything they need is installed by `setup` (system packages when run as root, the venv, the extension).

# The system interpreter when there is one: a venv built on it works for every OS user
# (the suite also runs pgllm as an unprivileged user; an interpreter under /root would not).
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
PG_MAJOR ?= 15
APT_PACKAGES := python3-venv postgresql-$(PG_MAJOR) postgresql-server-dev-$(PG_MAJOR) libopenblas-dev gcc make fortunes pgbouncer \
                pgpool2 postgresql-$(PG_MAJOR)-plproxy
STAMP := $(VENV)/.installed

.PHONY: setup system-packages venv ext test demo bench clean

setup: system-packages venv

# apt-get only when something is missing and we are root; otherwise `pgllm install` says what to install.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "Missing system packages (install them as root):$$missing"; exit 1; fi; \
	fi

venv: $(STAMP)

# pgllm/__init__.py holds the version that the editable install records.
$(STAMP): pyproject.toml pgllm/__init__.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Build the extension in place (pgllm install does build + install + CREATE EXTENSION).
ext:
	$(MAKE) -C ext

test: setup
	$(BIN)/python -m pytest -q

# From a table of text to a model that measurably learned it, on the embedded server (scripts/demo.sh).
demo: setup
	bash scripts/demo.sh

# Ours beside PyTorch / Hugging Face, one benchmark per engine part (figures in docs/performance.md).
bench: setup
	for b in tokenizer checkpoints inference training; do $(BIN)/python -m bench.$$b || exit 1; done

clean:
	$(MAKE) -C ext clean
	rm -rf $(VENV)
