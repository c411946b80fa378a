# keybroker: the targets the README names.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup run test proto proto-check lint bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e clients/python -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## virtualenv with the broker, the client and the dev tools

run: setup  ## OpenBao dev server + bootstrap + demo keys + broker on 127.0.0.1:50051 (SQLite)
	$(VENV)/bin/keybroker dev

test: setup  ## the whole suite against real OpenBao, gRPC and SQLite
	$(PY) -m pytest $(PYTEST_ARGS)

proto: setup  ## regenerate clients/python/keybroker_client/v1 from protos/
	$(PY) tools/genproto.py

proto-check: proto  ## fail when the committed generated code is stale
	git diff --exit-code -- clients/python/keybroker_client/v1

lint: setup
	$(VENV)/bin/ruff check broker tests clients/python tools bench
	$(VENV)/bin/mypy

bench: setup  ## LeaseKey vs an empty RPC on the same server, 1 and 32 callers
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) .keybroker .pytest_cache
