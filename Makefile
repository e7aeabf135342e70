# Two commands do all the set-up on a fresh machine:
#   make demo   venv + install + the report of the shipped models + a short training run of its own
#   make test   venv + install + lint + the test suite (what CI runs; make test-fast skips the slow tests)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
DEMO_MINUTES ?= 3
DEMO_RUN ?= runs/demo-multi-vardeq
DEMO_REPORT ?= runs/report

LINTED := src tests scripts benchmarks hubconf.py

.PHONY: demo test test-fast lint install

$(BIN)/flowmnist: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned here first (the CPU wheel); then the package, which finds it satisfied.
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/flowmnist

demo: install
	# The shipped pretrained models: results table and every figure, no download, no training.
	$(BIN)/flowmnist table --pretrained all
	$(BIN)/flowmnist report --pretrained all --out $(DEMO_REPORT)
	# Then a short run of its own. Data: $$FLOWMNIST_DATA if set, else downloaded to ~/.cache/flowmnist.
	# The budget holds the final validation (on the first 2,000 val images). Uncompiled: compiling the nets
	# takes about 100 s, more than it saves in 3 minutes (on 2 cores: ~460 steps against ~150).
	$(BIN)/flowmnist train --model multi-vardeq --minutes $(DEMO_MINUTES) --val-images 2000 --no-compile \
	  --out $(DEMO_RUN) --force
	# Every 5th image of val and test (2,000 each, spread over the whole split), K = 2: less than the training.
	$(BIN)/flowmnist evaluate $(DEMO_RUN) --split val --split test --every 5 --importance-samples 2
	$(BIN)/flowmnist sample $(DEMO_RUN) --out $(DEMO_RUN)/samples.png

test: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/python -m pytest -q --durations=15  # the slowest tests named: the suite's budget is 10 minutes

test-fast: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check $(LINTED)
