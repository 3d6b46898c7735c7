# Two entry points that work on a fresh machine (README): `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: setup demo dev test unit lint clean

$(BIN)/.installed: pyproject.toml constraints.txt
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq espeak-ng sox; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m pipelines.demo

# The UI, daemon and sensors on the instance and weights `make demo` recorded in .env.
dev: setup
	$(BIN)/dagster dev -w workspace.yaml

# The whole suite (what CI runs), one xdist worker per core.
test: setup
	$(BIN)/python -m pytest -q -n auto

# The quick tests only: everything not marked slow.
unit: setup
	$(BIN)/python -m pytest -q -n auto -m "not slow"

lint: setup
	$(BIN)/ruff check musetalk_ops pipelines tests bench
	$(BIN)/ruff format --check musetalk_ops pipelines tests bench

clean:
	rm -rf $(VENV) .musetalk .pytest_cache
