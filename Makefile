# cm_lightning: `make help` lists the targets.
PYTHON ?= python
# The CPU build on this project's machines; on a GPU box: make install TORCH=torch (PyPI's Linux wheel is CUDA's).
# Elsewhere, a CPU-only torch: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST ?= $(PYTHON) -m pytest

.DEFAULT_GOAL := help
.PHONY: help install test test-all mutants train demo figure teacher evaluate lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

install:  ## install torch ($(TORCH)) and the package with its dev tools (editable)
	$(PYTHON) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PYTHON) -m pip install -q -e ".[dev]"

test:  ## the test suite CI runs (CPU, under 15 minutes)
	$(PYTEST) -q -m "not slow"

test-all:  ## every test, the slow ones too
	$(PYTEST) -q

mutants:  ## apply each curated wrong formula to a copy of the package; every one must fail a fast test (docs/mutants.md)
	$(PYTHON) tools/mutants.py --out docs/mutants.md

train:  ## CD on the tiny random model, CPU, 20 steps (the quickstart)
	$(PYTHON) -m cm_lightning.train experiment=quickstart

demo: install  ## install, then distill the shipped shapes teacher with MCD (K=4) on CPU; writes the figure and the metrics
	$(PYTHON) -m cm_lightning.shapes.demo

figure:  ## the seed's five-row figure on the tiny model (trains CT, CD, MCD briefly first)
	$(PYTHON) -m cm_lightning.compare model=tiny train_missing=true

teacher:  ## retrain the shapes teacher from scratch (one GPU; estimated ~15 min, see benchmarks/teacher.md)
	$(PYTHON) -m cm_lightning.shapes.build_teacher out=cm_lightning/assets/shapes_teacher

evaluate:  ## the quality table on the shapes world (GPU; see benchmarks/quality.md)
	$(PYTHON) -m cm_lightning.shapes.evaluate

lint:  ## ruff
	$(PYTHON) -m ruff check cm_lightning tests

clean:  ## remove run outputs and caches (not the shipped assets)
	rm -rf outputs/* .cache .pytest_cache
	@touch outputs/.gitkeep
