# make demo: set up .venv and run the whole mission on the embedded lab model (CPU, no network).
# make test: set up .venv and run the tests (after ruff and the docs build).
# make docs: build the docs site into site/ (mkdocs --strict: a warning or a broken link fails).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-decoder test test-slow stress lint format bench setup clean lock docs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24" "setuptools>=77.0.3,<81" wheel
	# torch first: the CPU wheel; everything after is constrained to it.
	$(BIN)/pip install -q torch==2.13.0
	# everything else at the versions of requirements.lock (pyproject keeps ranges for library users)
	$(BIN)/pip install -q -c constraints.txt -c requirements.lock -e ".[dev,lmeval,wandb]"
	$(BIN)/pip install -q --no-deps --ignore-requires-python promptsource==0.2.3
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/multipromot run configs/demo.yaml

# The paper's decoder-only setting on a lab-llama that never saw the En-Fr-like task (on the
# built-in lab-llama, which translates it already, fine-tuning has nothing to learn:
# docs/results/decoder.md). Both steps reuse what is built.
demo-decoder: $(STAMP)
	$(BIN)/multipromot lab pretrain --size llama-small --hold-out lab_trans_fr --out runs/lab-llama-heldout-fr
	$(BIN)/multipromot run configs/demo_decoder.yaml model=runs/lab-llama-heldout-fr

test: $(STAMP)
	$(BIN)/ruff check multipromot tests benchmarks
	$(BIN)/ruff format --check multipromot tests benchmarks
	# not -q: quiet mode hides the warnings --strict counts, so a broken link would pass
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	$(BIN)/python -m pytest -q

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

stress: test-slow

lint: $(STAMP)
	$(BIN)/ruff check multipromot tests benchmarks
	$(BIN)/ruff format --check multipromot tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format multipromot tests benchmarks
	$(BIN)/ruff check --fix multipromot tests benchmarks

# The CPU benchmarks, one after the other (~30 min on 2 quiet cores): each rewrites its section of
# benchmarks/RESULTS.md; at the end every target's verdict from its 95% interval is printed.
# Run it on an otherwise idle machine: each section records the CPU that other processes used.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache

# Rewrite requirements.lock from the installed .venv (after changing a dependency in pyproject):
# tests/test_lock.py then checks that every dependency is pinned and installed at its pin.
lock: $(STAMP)
	{ echo "# The resolved versions make installs (make lock rewrites this from .venv; torch is pinned in"; \
	  echo "# constraints.txt, promptsource is installed on its own). Python 3.11, Linux x86_64."; \
	  $(BIN)/pip freeze --all --exclude-editable | grep -viE '^(torch|promptsource|multipromot|pip|wheel)==' | grep -v '^-e'; \
	} > requirements.lock
