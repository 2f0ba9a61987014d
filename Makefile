# `make test` and `make demo` are the whole set-up on a fresh machine: each creates/refreshes .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast demo bench-crawl clean

venv: $(STAMP)

# Reinstall only when the package's declared dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q -ra

# Everything but the slow end-to-end tests.
test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo: venv
	$(BIN)/python -m pipelines.demo

bench-crawl: venv
	$(BIN)/python benchmarks/crawl_images.py --n 3000 --runs 3

clean:
	rm -rf $(VENV) .bench demo-out .pytest_cache
