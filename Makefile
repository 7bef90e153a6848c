# Two commands on a fresh machine:  `make quickstart`  and  `make test`.
# Each creates/updates .venv and installs what it needs (CPU torch; CUDA torch if you install it first).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.megamed-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv install test test-all quickstart nvcc-check bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

# torch first (the build uses the torch it will run with: --no-build-isolation), then the build tools, then megamed.
$(STAMP): $(BIN)/python pyproject.toml CMakeLists.txt $(shell find csrc kernels -type f 2>/dev/null)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja setuptools
	# DS_BUILD_OPS=0: deepspeed (test extra) builds from its sdist without compiling C++/CUDA ops; pip keeps
	# the torch installed above (deepspeed does not pin torch)
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	bash scripts/nvcc_check.sh
	PY=$(BIN)/python bash csrc/cuda/check_glue.sh
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow and not gpu" --durations=15

test-all: $(STAMP)
	bash scripts/nvcc_check.sh
	PY=$(BIN)/python bash csrc/cuda/check_glue.sh
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" --durations=25

quickstart: $(STAMP)
	$(BIN)/megamed quickstart --out quickstart

nvcc-check:
	bash scripts/nvcc_check.sh
	PY=$(BIN)/python bash csrc/cuda/check_glue.sh

clean:
	rm -rf build _skbuild dist *.egg-info
