# Two commands do all set-up: `make demo` and `make test`. Each creates .venv when it is missing
# and installs the versions pinned in constraints.txt (`make upgrade-deps` rewrites them).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint typecheck unit bench bench-projections no-trace upgrade-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt --upgrade pip

# The build backend (hatchling, for the editable install) is pinned too, by --build-constraint.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt pip
	$(BIN)/python -m pip install --quiet -c constraints.txt --build-constraint constraints.txt \
		-e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fuse demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/ruff format --check src tests benchmarks examples tools

typecheck: $(STAMP)
	$(BIN)/mypy --strict src/newfuse

# The suite (in two worker processes, a test file to each at a time: most of its time is spent
# waiting on servers), then a subset of it against servers it did not start and what it left.
test: lint typecheck
	$(BIN)/python -m pytest -q -n 2 --dist loadfile
	$(BIN)/python tests/no_trace.py

bench: $(STAMP)
	$(BIN)/python benchmarks/eventstore.py

bench-projections: $(STAMP)
	$(BIN)/python benchmarks/projections.py

# Only that subset (~1 min; `make test` runs it after the suite).
no-trace: $(STAMP)
	$(BIN)/python tests/no_trace.py

# The newest versions pyproject.toml allows, pinned; then `make test` installs and tries them.
upgrade-deps: | $(BIN)/python
	$(BIN)/python tools/upgrade_deps.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
