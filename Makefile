# OpenDiT: `make demo` and `make test` set everything up themselves on a fresh machine.
# GPU users: make demo TORCH="torch>=2.9" (or any CUDA build of torch) — the default is the CPU wheel this machine has.
# GPU lane (docs/gpu.md): make test-gpu (NCCL equivalence, >= 2 GPUs), make gpu-smoke (one- and multi-GPU scripts).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 2
# test processes (pytest-xdist): one per core; each test still runs its own 1-4 gloo ranks
TEST_WORKERS ?= 2

.PHONY: demo test test-fast test-sweeps test-gpu gpu-smoke test-matrix test-xl lint format bench clean browser

# one resolver run for torch and the project; no byte-compiling of every installed file up front (Python compiles
# what it imports, once): half the set-up time (docs/testing.md)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/opendit sample --nproc $(NPROC) --ulysses $(NPROC) --classes 0 1 2 3 4 5 6 7 8 9 --seed 0 --out outputs
	$(BIN)/opendit sample --video --nproc $(NPROC) --sp-impl dsp --classes 3 7 0 5 --motion right up left down --seed 0 --out outputs/video

# the CPU suite, with CUDA hidden (also on a GPU machine: its tolerances are CPU's; the GPU lane is test-gpu)
test: $(STAMP) lint
	CUDA_VISIBLE_DEVICES= OPENDIT_FUZZ_PROFILE=ci $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not sweep" --durations=15

# the families' parallel checks repeated at 3-4 processes and in bf16, the second combinations of capabilities that
# `make test` runs once end to end, the slow quality checks and the web page in headless Chromium (tests/conftest.py)
test-sweeps: $(STAMP) browser
	CUDA_VISIBLE_DEVICES= $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m sweep

test-fast: $(STAMP)
	CUDA_VISIBLE_DEVICES= OPENDIT_FUZZ_PROFILE=fast $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# every plan on 2-4 GPUs over NCCL vs one GPU, GPU tolerances (fp32 1e-5 with TF32 off, bf16 1e-2); skipped with one
# line when fewer than 2 GPUs are visible (docs/gpu.md)
test-gpu: $(STAMP)
	OPENDIT_GPU=1 $(BIN)/python -m pytest -q -rs tests/gpu

# one command each, < 10 min on a GPU machine, a JSON summary each; exit 0 with one line where no GPU is visible
gpu-smoke: $(STAMP)
	$(BIN)/python scripts/gpu_smoke_1gpu.py
	$(BIN)/python scripts/gpu_smoke_multi.py

# headless Chromium + its driver for tests/test_serve_page.py (Debian packages; installed only when missing)
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver)

# every family x every capability through `opendit sample` vs one process (~25-40 min); writes docs/capabilities.md
test-matrix: $(STAMP)
	OPENDIT_MATRIX=1 $(BIN)/python -m pytest -q -s tests/matrix

# full-size acceptances: issue 13's memory (DiT-XL/2, 2.7 GB checkpoint; ~4 min) and issue 15's Latte-XL/2
# checkpoint through sample --video (~4 min): not part of `make test`
test-xl: $(STAMP)
	OPENDIT_XL=1 $(BIN)/python -m pytest -q -s tests/test_whole_memory_xl.py tests/test_latte_xl.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
