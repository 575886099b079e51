# Two commands for a fresh machine: `make demo` and `make test`.
# Each sets up what it needs (a virtualenv in .venv with this package installed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup services demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

## Services the tests start themselves but cannot pip-install: Debian's Prometheus.
services:
	@command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus (a test has it scrape a real worker)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

## The main job on the embedded default: broker, train, stream, enrich, show.
demo: setup
	$(BIN)/enricher demo

## The tests, against a real Tansu broker and the real chDB engine.
test: setup services
	$(BIN)/python -m pytest

## A quick measurement of the batch path (the full benchmark grows with issue 3).
bench: setup
	$(BIN)/python benchmarks/batch_path.py

clean:
	rm -rf $(VENV) .enricher .enricher-demo
