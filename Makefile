# Distillery: `make test` installs what it needs and runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve test pytest lint format typecheck bench clean

# torch is pinned to 2.13.0 in pyproject.toml: on the development machines pip
# takes that CPU build from local disk instead of a multi-GB CUDA download.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[engine,service,dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole service on embedded defaults (everything under var/); see app/devserver.py.
serve: install
	$(BIN)/python -m app.devserver

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

# mypy runs beside the test suite (which waits on worker processes much of the time);
# either failing fails the target.
test: lint
	$(MAKE) --no-print-directory --jobs=2 --output-sync=line typecheck pytest

# Two test processes (pytest-xdist), each running whole test files (module fixtures such
# as trained teachers are built once): most tests wait on servers, worker processes and
# databases, so one process leaves the cores idle much of the time. Files are handed out
# in the order tests/conftest.py gives them, the long ones (marked slow) first.
# Passive OpenMP waits: torch threads that spin would fight mypy and the worker processes
# for the cores (worker/engine/__init__.py sets the same for the engine's processes).
# The slowest tests are listed at the end, to see where the suite's time goes.
PYTEST_WORKERS ?= 2
pytest: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder \
		--durations=20

bench: install
	$(BIN)/python bench/engine_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
