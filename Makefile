# Two commands do all set-up: `make demo` and `make test`. Both build .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
KLAS := $(VENV)/bin/klas
STAMP := $(VENV)/.klas-installed

.PHONY: demo demo-tree test bench clean-demo gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The suite in TEST_JOBS processes (pytest-xdist; one test file per process at a time), the slowest
# tests listed at the end.
TEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=10

# The demo: train (or reuse) the digits model family, then the four klas stages on its ViTs. The
# search has no budget, so the selection spans the whole family (klas_vit_ti .. klas_vit_b), and
# klas train uses its defaults (the winner of benchmarks/bench_recipe.py).
# It ends with the answer: the most accurate network no slower than klas_vit_s (its latency measured on
# this machine, one image per forward pass) and the one under 0.01 GFLOPs (about half klas_vit_b's cost),
# each exported alone (export/best-under-*), and the fronts over GFLOPs and over latency as pictures.
demo: $(STAMP)
	$(KLAS) zoo
	$(KLAS) cache --model klas_vit_ti --model klas_vit_s --model klas_vit_b --data digits --out cache/demo-vit
	$(KLAS) search cache/demo-vit --run cache/runs/demo-vit --overwrite
	$(KLAS) train cache/runs/demo-vit --overwrite
	$(MAKE) demo-tree
	$(KLAS) export pareto cache/runs/demo-vit --models --best-under klas_vit_s:ms --best-under 0.01

# The demo's last stage: a Stitch Tree over two demo models of different families (a ViT and a
# ResNet): klas chooses the trunk and 3 share points from its scores, trains each tree's stitch layer
# with final-feature matching and prints the trade-off table (README, "Stitch Tree").
demo-tree: $(STAMP)
	$(KLAS) cache --model klas_vit_s --model klas_resnet_s --data digits --limit 3000 --out cache/demo-tree
	$(KLAS) tree cache/demo-tree --run cache/runs/demo-tree --overwrite
	$(KLAS) export tree cache/runs/demo-tree

clean-demo:
	rm -rf cache/demo-vit cache/runs/demo-vit cache/demo-tree cache/runs/demo-tree cache/zoo

# Benchmarks behind the README's figures (ratios within one run; minutes on 2 CPU cores);
# bench_recipe.py reads the run `make demo` searched (cache/runs/demo-vit).
bench: $(STAMP)
	$(PY) benchmarks/bench_storage.py
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_scorer.py
	$(PY) benchmarks/bench_search_scale.py
	$(KLAS) zoo --model klas_vit_d4 --model klas_vit_d8
	$(PY) benchmarks/bench_quality.py
	$(PY) benchmarks/bench_heterogeneous.py
	$(PY) benchmarks/bench_tree.py
	$(PY) benchmarks/bench_recipe.py --run cache/runs/demo-vit

# The prepared GPU check (benchmarks/bench_gpu.py; README "Benchmarks"): every stage on real timm
# models over synthetic JPEGs, with its pass/fail checks, under 8 minutes on one GPU; writes
# benchmarks/results/gpu.json, exit status 1 when a check fails. It runs from the checkout with the
# machine's own python (no .venv, no install: a GPU machine may reach no package registry).
# On a CPU: make gpu-check GPU_CHECK_ARGS="--device cpu --small --out /tmp/gpu.json"
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) benchmarks/bench_gpu.py $(GPU_CHECK_ARGS)
