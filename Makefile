# keybroker: the targets the README names.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Node.js tools: the client's dependencies and buf (from the @bufbuild/buf npm package).
NODE_STAMP  := clients/node/node_modules/.installed-stamp
TOOLS_STAMP := tools/node/node_modules/.installed-stamp
BUF         := tools/node/node_modules/.bin/buf
# `buf breaking` compares protos/ with the main branch of this repository.
BUF_AGAINST ?= .git\#branch=main,subdir=protos

.PHONY: setup run test chaos proto proto-check lint buf-lint docs bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e clients/python -e '.[dev]'
	touch $(STAMP)

# npm ci in each Node.js package; without npm they are skipped with a note (the
# Node client's interop test then skips, and buf-lint says what is missing).
$(NODE_STAMP): clients/node/package.json clients/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  cd clients/node && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed-stamp; \
	else echo "npm not found: skipping clients/node (install Node.js 20+)"; fi

$(TOOLS_STAMP): tools/node/package.json tools/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  cd tools/node && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed-stamp; \
	else echo "npm not found: skipping tools/node (buf; install Node.js 20+)"; fi

setup: $(STAMP) $(NODE_STAMP) $(TOOLS_STAMP)  ## virtualenv with the broker, the client and the dev tools; npm ci for the Node client and buf

run: setup  ## OpenBao dev server + bootstrap + demo keys + broker on 127.0.0.1:50051 (SQLite)
	$(VENV)/bin/keybroker dev

test: setup  ## the whole suite against real OpenBao, gRPC and SQLite; lists the 15 slowest steps
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

# The randomized fault campaign (tests/chaos, docs/chaos.md): SEED replays a schedule,
# DURATION is seconds of load per backend, BACKEND is sqlite, redis or both.
SEED     ?=
DURATION ?= 600
BACKEND  ?= both
chaos: setup  ## seeded random faults and clients on SQLite and on 3 replicas over Redis; checks the 7 invariants
	$(PY) -m tests.chaos --backend $(BACKEND) --duration $(DURATION) $(if $(SEED),--seed $(SEED))

proto: setup  ## regenerate clients/python/keybroker_client/v1 from protos/
	$(PY) tools/genproto.py

proto-check: proto  ## fail when the committed generated code is stale
	git diff --exit-code -- clients/python/keybroker_client/v1

buf-lint: $(TOOLS_STAMP)  ## buf lint (STANDARD + COMMENTS) and buf breaking against the main branch
	@test -x $(BUF) || { echo "buf-lint needs npm: buf comes from the @bufbuild/buf package (tools/node)"; exit 1; }
	$(BUF) lint protos
	$(BUF) breaking protos --against '$(BUF_AGAINST)'

docs: setup  ## regenerate docs/configuration.md from broker/config.py
	$(PY) tools/configref.py

lint: setup buf-lint
	$(VENV)/bin/ruff check broker tests clients/python tools bench
	$(VENV)/bin/mypy
	cd clients/node && npm run --silent typecheck

bench: setup  ## keybroker serve as deployed (SQLite, Redis) vs an empty RPC and a bare grpc.aio floor, handler cost per RPC; then workers 1 vs 2 and pool scale (10k-key cold start, 100k keys), appended to bench/results.md
	$(PY) bench/bench.py
	$(PY) bench/workers.py >> bench/results.md
	$(PY) bench/scale.py >> bench/results.md

clean:
	rm -rf $(VENV) .keybroker .pytest_cache clients/node/node_modules tools/node/node_modules
