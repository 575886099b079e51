# Two commands for a fresh machine: `make demo` and `make test`.
# Each sets up what it needs (a virtualenv in .venv with this package installed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup setup-test services demo test test-slow bench bench-smoke clean

# The package and what it needs to run: all the demo installs.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

# The tests' extras too (shap, LightGBM, XGBoost, moto...): the tests' reference libraries.
$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed
setup-test: $(BIN)/.installed-test

## Services the tests start themselves but cannot pip-install: Debian's Prometheus.
services:
	@command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus (a test has it scrape a real worker)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

## The main job on the embedded default: broker, train, stream, enrich, show.
demo: setup
	$(BIN)/enricher demo

## The tests, against a real Tansu broker and the real chDB engine (~15 minutes on 2 cores).
test: setup-test services
	$(BIN)/python -m pytest -m "not slow"

## The slow fault and soak tests (SIGKILL, restarts, rebalances, deadlines: ~5 minutes); CI runs them too.
test-slow: setup-test services
	$(BIN)/python -m pytest -m slow

## Our worker against the pipelines a user would write, side by side (~10 minutes):
## writes benchmarks/results/latest.{json,md,png}.
bench: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/run.py

## The same on 5,000 rows, to keep the benchmark from rotting (CI runs it).
bench-smoke: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/run.py --smoke

clean:
	rm -rf $(VENV) .enricher .enricher-demo
