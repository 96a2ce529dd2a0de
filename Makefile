# `make test`  : create .venv, install deps, build drmm_kernels._C (CPU + CUDA sources when possible), run the suite.
# `make demo`  : the main job (a short DRMM training run), sharing the same environment.
# Every stage prints its wall time so the CI budget stays visible.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-$(shell cksum < requirements-dev.txt | cut -d' ' -f1)
PYTEST_ARGS ?=
NVCC := $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))

.PHONY: test demo build deps clean bench-cpu device-dry-run dry-run-only lint format

$(STAMP): requirements-dev.txt
	@start=$$SECONDS; \
	test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q -r requirements-dev.txt && touch $@ && \
	echo "[stage] install deps: $$((SECONDS-start)) s"

deps: $(STAMP)

# The CUDA build of torch compiles csrc/cuda without a GPU when nvcc is present (CUDA_HOME + the pip
# nvidia/cu13 headers on CPATH); otherwise only the C++ CPU kernels are built.
build: $(STAMP)
	@start=$$SECONDS; \
	if [ -n "$(NVCC)" ] && [ -z "$$DRMM_SKIP_CUDA_BUILD" ]; then \
	  export CUDA_HOME=$${CUDA_HOME:-$$(dirname $$(dirname $(NVCC)))}; \
	  inc=$$($(PY) -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null); \
	  [ -d "$$inc" ] && export CPATH=$$inc$${CPATH:+:$$CPATH}; \
	fi; \
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . && \
	echo "[stage] build drmm_kernels._C: $$((SECONDS-start)) s"

# ruff (lint + format check) over Python, clang-format (check mode) over csrc/; `make format` rewrites both.
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
lint: $(STAMP)
	@start=$$SECONDS; \
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check --quiet . && \
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC); rc=$$?; \
	echo "[stage] lint: $$((SECONDS-start)) s"; exit $$rc

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format . && $(VENV)/bin/clang-format -i $(CSRC)

test: lint build
	@start=$$SECONDS; \
	DRMM_REQUIRE_EXTENSION=1 $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	echo "[stage] tests: $$((SECONDS-start)) s"; [ $$rc = 0 ] || exit $$rc; \
	start=$$SECONDS; $(PY) -m pytest -q bench/suite --benchmark-disable -p no:cacheprovider; rc=$$?; echo "[stage] benchmark suite, each function once: $$((SECONDS-start)) s"; [ $$rc = 0 ] || exit $$rc; \
	$(MAKE) --no-print-directory dry-run-only

# The GPU check's stages that need no GPU (pre-flight, the build, the Triton tests in the interpreter),
# so the script cannot rot between GPU runs. `test` calls dry-run-only: its build is already done.
device-dry-run: build
	@$(MAKE) --no-print-directory dry-run-only

dry-run-only:
	@start=$$SECONDS; \
	PATH=$(abspath $(VENV))/bin:$$PATH OUT=build/device-check-dry-run bash bench/device_check.sh --dry-run; rc=$$?; \
	echo "[stage] device check dry run: $$((SECONDS-start)) s"; exit $$rc

demo: build
	@start=$$SECONDS; run=runs/demo-$$(date +%Y%m%d-%H%M%S); \
	$(VENV)/bin/drmm train --config configs/demo.yaml --run-dir $$run && \
	$(VENV)/bin/drmm render $$run && \
	echo "[drmm] figures: $$run/learning_curve.png, $$run/reconstructions.png, $$run/rendered_levels.png"; rc=$$?; \
	echo "[stage] demo: $$((SECONDS-start)) s"; exit $$rc

bench-cpu: build
	$(PY) bench/cpu_ops.py

# The pytest-benchmark suite (bench/suite, docs/benchmarks.md): per op and conv_small layer, eager PyTorch,
# torch.compile and every available backend in one table. BENCH_ARGS adds pytest options (BENCH_ARGS='-k L3');
# BENCH_JSON moves the JSON.
.PHONY: bench
bench: build
	@start=$$SECONDS; mkdir -p bench/results; \
	$(PY) -m pytest bench/suite -p no:cacheprovider --benchmark-only --benchmark-min-rounds=10 \
	  --benchmark-warmup=on --benchmark-warmup-iterations=2 --benchmark-columns=min,median,iqr,mean,rounds \
	  --benchmark-json=$(or $(BENCH_JSON),bench/results/pytest-benchmark.json) $(BENCH_ARGS); rc=$$?; \
	echo "[stage] bench: $$((SECONDS-start)) s"; exit $$rc

clean:
	rm -rf build *.egg-info drmm_kernels/_C*.so
