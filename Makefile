# The README's two commands: `make demo` and `make test`. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck bench soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/connector demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check connector tests benchmarks
	$(BIN)/ruff format --check connector tests benchmarks
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy --strict connector

# two workers (pytest-xdist; each has its own embedded PostgreSQL): the suite is mostly waiting
# on servers, so it fits the 15-minute budget on two cores; TEST_WORKERS=0 runs it in one process
TEST_WORKERS ?= 2

test: lint typecheck
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# the unit tier: no database, no connector process, without the minutes-long exhaustive
# searches (tests/conftest.py sets the markers)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "unit and not slow" -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks all $(BENCH_ARGS)

soak: $(STAMP)
	$(BIN)/python -m tests.chaos.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
