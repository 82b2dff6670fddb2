# Two commands do all the set-up on a fresh machine with Python 3.11+ and make:
#   make run    install, start a local Redis if none answers, load the sample lists, serve
#   make test   install and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= config.yaml
STAMP  := $(VENV)/.installed

.PHONY: install run redis sync test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

redis: $(STAMP)
	$(PY) -m devtools.redis_server ensure \
	  "$$($(PY) -c 'from core.config import load_config; print(load_config("$(CONFIG)").redis.url)')" \
	  .run/redis

sync: redis
	$(PY) -m loader --config $(CONFIG) sync

run: sync
	$(PY) -m service --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest

# The benchmark (BENCHMARKS.md): about 4 minutes with a 1 M-number block list.
# Flags go in BENCH_ARGS, e.g. make bench BENCH_ARGS="--numbers 10000000 --rounds 12"
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
