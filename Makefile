# Quick start: `make demo` (set up, run the benchmark) and `make test` (set up, run the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On a machine without an NVIDIA GPU this is the CPU build of torch that lies on the machine's disk; a pinned
# version keeps pip from ever resolving a (several-GB) CUDA build there. With a GPU, the venv sees the
# system's own torch (--system-site-packages) and installs none.
TORCH_SPEC ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/*/*.cu)
BENCH_ARGS ?=

.PHONY: demo test install install-test lint format cuda-check clean example-hf

$(VENV)/.torch:
	@if [ -n "$(HAS_GPU)" ]; then $(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi
	$(PIP) install --upgrade "pip>=23" "setuptools>=64" wheel ninja
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "using the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else $(PIP) install "$(TORCH_SPEC)"; fi
	touch $@

$(VENV)/.installed: $(VENV)/.torch $(SOURCES)
	$(PIP) install --no-build-isolation -e ".[bench]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch $(SOURCES)
	$(PIP) install --no-build-isolation -e ".[bench,test,hf]"
	# open_clip's losses, a test reference: without its dependencies (torchvision would pull another torch);
	# tests/test_info_nce.py loads open_clip/loss.py, which needs only torch
	$(PIP) install --no-deps "open-clip-torch==3.3.0"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m infofuse bench $(BENCH_ARGS)

test: install-test
	$(PY) -m pytest -q

# A tiny Llama trained on CPython's standard library, stock and with infofuse.hf.patch (offline, CPU, ~10 min)
example-hf: install-test
	$(PY) examples/train_tiny_lm.py

lint: install-test
	$(VENV)/bin/ruff check python bench tests triton_kernels examples setup.py
	$(VENV)/bin/ruff format --check python bench tests triton_kernels examples setup.py
	$(VENV)/bin/clang-format --dry-run -Werror $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/*/*.cu)

format: install-test
	$(VENV)/bin/ruff format python bench tests triton_kernels examples setup.py
	$(VENV)/bin/clang-format -i $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/*/*.cu)

# CUDA sources must compile wherever nvcc is, GPU or not: `nvcc -c` for sm_80 and sm_90a against torch's headers.
NVCC ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
cuda-check: install
	@if [ -z "$(CUDA_SOURCES)" ]; then echo "cuda-check: no CUDA sources under csrc/cuda"; exit 0; fi; \
	if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found"; exit 1; fi; \
	incs=$$($(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))"); \
	mkdir -p build/cuda-check; \
	for src in $(CUDA_SOURCES); do \
		for arch in 80 90a; do \
			echo "nvcc -c $$src (sm_$$arch)"; \
			$(NVCC) -c -std=c++17 -O2 -gencode=arch=compute_$$arch,code=sm_$$arch -Icsrc $$incs \
				-o build/cuda-check/$$(basename $$src .cu).sm_$$arch.o $$src || exit 1; \
		done; \
	done

clean:
	rm -rf build python/infofuse/*.so *.egg-info python/*.egg-info
