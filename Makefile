# Two commands do all the set-up on a fresh machine with Python 3.11+ and make:
#   make run    install, start a local Redis if none answers, load the sample lists, serve
#   make test   install and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= config.yaml
STAMP  := $(VENV)/.installed

.PHONY: install run redis sync test test-public test-newest-aiohttp lint bench clean

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

# The HTTP tests again on aiohttp's public API only (service/edge/aiohttp_adapter.py).
HTTP_TESTS := tests/test_aiohttp_adapter.py tests/test_answers.py tests/test_dispatch.py \
  tests/test_connections.py tests/test_shutdown.py tests/test_bad_input.py \
  tests/test_workers.py tests/test_auth.py tests/test_operator_listener.py tests/test_admin_api.py
test-public: $(STAMP)
	CALLSCREEN_AIOHTTP_INTERNALS=off $(PY) -m pytest $(HTTP_TESTS)

# The HTTP tests against the newest aiohttp release, in a virtualenv of their own: the
# adapter must use the internals it knows or fall back to the public API by itself.
NEWEST := .venv-newest-aiohttp
test-newest-aiohttp: $(STAMP)
	rm -rf $(NEWEST)
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST)/bin/python -m pip install --quiet -e '.[dev]'
	$(NEWEST)/bin/python -m pip install --quiet --upgrade aiohttp
	$(NEWEST)/bin/python -c 'import aiohttp; from service.edge.aiohttp_adapter import missing_internals as m; print("aiohttp", aiohttp.__version__, "internals:", m() or "known")'
	$(NEWEST)/bin/python -m pytest $(HTTP_TESTS)

# The benchmark (BENCHMARKS.md): about 4 minutes with a 1 M-number block list.
# Flags go in BENCH_ARGS, e.g. make bench BENCH_ARGS="--numbers 10000000 --rounds 12";
# BENCH_ARGS="--public-mode" also serves on aiohttp's public API and reports the ratio.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(NEWEST) .run .pytest_cache .mypy_cache .ruff_cache
