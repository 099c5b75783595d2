# Every target creates (or reuses) the virtual environment first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint bench bench-quick bench-env clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the builds this workplace caches (a plain pin may pull another build)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/dualclip demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# anomalib (WinCLIP, AUPRO) only in the benchmarks' own environment, never in the project's
ANOMALIB_VENV := benchmarks/.venv-anomalib
ANOMALIB_STAMP := $(ANOMALIB_VENV)/.installed

$(ANOMALIB_STAMP):
	test -x $(ANOMALIB_VENV)/bin/python || $(PY) -m venv $(ANOMALIB_VENV)
	$(ANOMALIB_VENV)/bin/pip install -q --upgrade pip
	$(ANOMALIB_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(ANOMALIB_VENV)/bin/pip install -q anomalib==2.7.0 open_clip_torch==3.3.0 scipy tqdm pillow platformdirs safetensors
	touch $(ANOMALIB_STAMP)

bench-env: $(ANOMALIB_STAMP)

# bench regenerates BENCHMARKS.md; bench-quick writes runs/bench-quick/BENCHMARKS.md (sections: benchmarks/run.py --help)
bench-quick: $(STAMP) $(ANOMALIB_STAMP)
	$(BIN)/python benchmarks/run.py --quick --results runs/bench-quick --out runs/bench-quick/BENCHMARKS.md

bench: $(STAMP) $(ANOMALIB_STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(ANOMALIB_VENV) runs .pytest_cache
