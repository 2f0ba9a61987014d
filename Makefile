# `make test` and `make demo` are the whole set-up on a fresh machine: each creates/refreshes .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv chromium test test-fast demo ui bench-crawl clean

venv: $(STAMP)

# Reinstall only when the package's declared dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The deployment tests render the Prefect UI in a headless browser: Debian's chromium, installed once.
chromium:
	@command -v chromium >/dev/null || (echo "installing chromium (apt-get)" && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null)

test: venv chromium
	$(BIN)/python -m pytest -q -ra

# Everything but the slow end-to-end tests.
test-fast: venv chromium
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo: venv
	$(BIN)/python -m pipelines.demo

# The Prefect UI (flow runs, deployments, schedules) and the MLflow UI, and a runner serving the deployments.
ui: venv
	$(BIN)/pipelines ui

bench-crawl: venv
	$(BIN)/python benchmarks/crawl_images.py --n 3000 --runs 3

clean:
	rm -rf $(VENV) .bench demo-out .pytest_cache
