# focalnet_jax: `make demo` and `make test` work on a fresh clone with only Python >= 3.11 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_run
# Taken exactly as given and passed to the recipes in the environment: make would expand a `$`
# in it (`d$x` named `d`, which `make clean` deleted).
override DEMO_DIR := $(value DEMO_DIR)
export DEMO_DIR
TEST_WORKERS ?= 2

.PHONY: test lint format demo clean

$(STAMP): pyproject.toml
	@# A venv left by a failed creation (no python3-venv: no pip) or older than 3.11 is made again.
	$(PY) -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

demo: $(STAMP)
	$(PY) -m focalnet_jax.demo --out="$$DEMO_DIR"

clean:
	rm -rf $(VENV) "$$DEMO_DIR" .pytest_cache
