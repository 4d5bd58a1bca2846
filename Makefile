# The habits: `make run`, `make test`, `make lint`, `make proto`.
# Everything installs into .venv from the project's own files.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: system-deps deploy-tools install run test lint fmt proto proto-check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml Cargo.toml dispatcher_rs/Cargo.toml $(wildcard dispatcher_rs/src/*.rs)
	@command -v cargo >/dev/null || { echo "cargo (Rust) is required: https://rustup.rs"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e clients/python -e '.[dev]'
	touch $@

run: install
	$(VENV)/bin/dispatchd up

# System packages the tests need (a real PostgreSQL), installed if missing.
system-deps:
	bash scripts/ensure-system-deps.sh

# Helm and the chart's manifest validator and grpcurl (built with Go once) and Debian's nginx (unpacked),
# cached in ~/.cache/dispatch/tools; tests/deploy runs them.
deploy-tools:
	bash scripts/ensure-helm.sh >/dev/null
	bash scripts/ensure-nginx.sh >/dev/null
	bash scripts/ensure-grpcurl.sh >/dev/null

test: install system-deps deploy-tools
	cargo test -q --manifest-path dispatcher_rs/Cargo.toml
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	MYPYPATH=services $(PY) -m mypy.stubtest dispatch._dispatcher
	cargo fmt --all --check
	cargo clippy --all-targets -q -- -D warnings

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	cargo fmt --all

bench: install
	$(PY) -m bench

proto: install
	$(PY) scripts/gen_protos.py

proto-check: install
	$(PY) scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) target .pytest_cache .mypy_cache .ruff_cache

# ---- The Go client (clients/go) ------------------------------------------------------------
# Its modules (go.sum pins them) and the pinned protoc plugins `make proto` runs are fetched with
# the other tools; `make test` runs its unit tests (its conformance run is
# tests/conformance/test_go.py, under pytest) and `make lint` vets it. Go from PATH, else
# /usr/local/go/bin.
GO    ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
GOFMT := $(dir $(GO))gofmt

.PHONY: go-deps go-test go-vet

go-deps:
	cd clients/go && $(GO) mod download
	bash scripts/ensure-protoc-gen-go.sh >/dev/null

go-test: go-deps
	cd clients/go && GOFLAGS=-mod=readonly $(GO) test ./...

go-vet: go-deps
	cd clients/go && GOFLAGS=-mod=readonly $(GO) vet ./...
	cd clients/go && unformatted="$$($(GOFMT) -l .)" && test -z "$$unformatted" || { echo "gofmt -l: $$unformatted"; exit 1; }

deploy-tools: go-deps
test: go-test
lint: go-vet

# --- The TypeScript client (clients/typescript) --------------------------------------------
# `npm ci` from its package-lock.json (again only when that changes), then `npm run build`
# (tsc, and the browser bundle) when a source changed. `make install`, `test` and `lint` use it.
TS_DIR     := clients/typescript
TS_STAMP   := $(TS_DIR)/node_modules/.install-stamp
TS_BUILT   := $(TS_DIR)/dist/.built
TS_SOURCES := $(shell find $(TS_DIR)/src $(TS_DIR)/test $(TS_DIR)/scripts -type f 2>/dev/null) $(TS_DIR)/tsconfig.json

.PHONY: ts-install ts-lint ts-test ts-clean
install: ts-install
test: ts-test
lint: ts-lint
clean: ts-clean

ts-install: $(TS_BUILT)

$(TS_STAMP): $(TS_DIR)/package-lock.json $(TS_DIR)/package.json
	@command -v npm >/dev/null || { echo "Node.js 20+ with npm is required for clients/typescript"; exit 1; }
	cd $(TS_DIR) && npm ci --no-audit --no-fund
	touch $@

$(TS_BUILT): $(TS_STAMP) $(TS_SOURCES)
	cd $(TS_DIR) && npm run --silent build
	touch $@

ts-lint: ts-install
	cd $(TS_DIR) && npm run --silent lint

ts-test: ts-install
	cd $(TS_DIR) && node --test --test-timeout=120000 dist/test/unit/

ts-clean:
	rm -rf $(TS_DIR)/node_modules $(TS_DIR)/dist
