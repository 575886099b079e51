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

# The Compose specification's JSON schema that docker/compose.yaml is checked against:
# the newest our machines reach is the one docker-compose 1.29.2 (PyPI, May 2021) ships.
COMPOSE_SPEC := $(VENV)/share/compose-spec/compose_spec.json

# The tests' extras too (shap, LightGBM, XGBoost, moto...): the tests' reference libraries.
$(BIN)/.installed-test: $(BIN)/.installed $(COMPOSE_SPEC)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(COMPOSE_SPEC): $(BIN)/.installed
	rm -rf $(VENV)/share/compose-spec/wheel && mkdir -p $(VENV)/share/compose-spec/wheel
	$(BIN)/pip download --quiet --no-deps --dest $(VENV)/share/compose-spec/wheel docker-compose==1.29.2
	$(BIN)/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], 'wb').write(z.read('compose/config/compose_spec.json'))" \
	  $(VENV)/share/compose-spec/wheel/docker_compose-1.29.2-py2.py3-none-any.whl $@

setup: $(BIN)/.installed
setup-test: $(BIN)/.installed-test

## Services the tests start themselves but cannot pip-install: Debian's Prometheus;
## and kubectl (its Kustomize renders k8s/), where the machine does not have it.
services:
	@command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus (a test has it scrape a real worker)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }
	@command -v kubectl >/dev/null || { \
	  echo "installing kubectl (Debian's kubernetes-client) to render k8s/ with its Kustomize"; \
	  $(SUDO) apt-get install -y -qq --no-install-recommends kubernetes-client \
	  || echo "no kubectl package here: the tests skip only the Kustomize rendering, and say so"; }

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
