# Two commands do all the set-up on a fresh machine:
#   make demo   train the default model on the bundled corpus, then sample from it
#   make test   run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# the CPU build of torch; an unpinned torch would pull a multi-GB CUDA build
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,hf,serve,e2e,eval,seq2seq

.PHONY: demo test test-all lint format bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nanoseek train --out runs/demo --overwrite
	$(VENV)/bin/nanoseek sample runs/demo --prompt "ROMEO:" --max-new-tokens 400 --seed 1

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks conftest.py
	$(VENV)/bin/ruff format --check src tests benchmarks conftest.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks conftest.py
	$(VENV)/bin/ruff format src tests benchmarks conftest.py

test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

bench: $(STAMP)
	$(VENV)/bin/nanoseek bench train --preset gpt2-mini --seq-len 64 --batch 12

clean:
	rm -rf $(VENV) runs .pytest_cache
