# segclip-d2 entry points. `make train` and `make test` set up .venv first (seconds when done).
PY := .venv/bin/python

.PHONY: setup train test test-fast lint format cuda-check gpu-check bench clean-venv

setup:
	bash scripts/setup.sh

# The built-in default job: train the small CPU model on the synthetic aerial set, evaluate it,
# print the per-class IoU table and write a colour prediction.
train: setup
	$(PY) train_net.py --config-file configs/synthetic/segclip_cpu.yaml --num-gpus 1 \
		--resume OUTPUT_DIR output/synthetic_cpu

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: setup
	.venv/bin/lint-imports
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Compile the CUDA kernel for sm_80 and sm_90 with nvcc (it cannot run here); catches build breaks.
cuda-check: setup
	bash tools/check_cuda_build.sh

# On a GPU machine: offline setup from WHEELS (optional), CUDA op build, checks table (exit 1 on a
# failed check, 2 without a GPU). PYTHON defaults to python3 there (no venv). See README.
GPU_PYTHON ?= python3
gpu-check:
	PYTHON=$(GPU_PYTHON) bash tools/gpu_acceptance.sh $(if $(WHEELS),--wheels $(WHEELS))

bench: setup
	$(PY) tools/benchmark_msda.py
	$(PY) tools/benchmark_inference.py --ab --allow-random-weights --opts MODEL.WEIGHTS ""

clean-venv:
	rm -rf .venv
