# BrushNet training framework. `make demo` and `make test` work on a fresh machine:
# every target installs what it needs first (a stamp file skips it afterwards).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch pair is installed first and can be overridden for a cluster's CUDA build, e.g.
#   make install TORCH_SPEC="torch==2.5.1 torchvision==0.20.1" TORCH_INDEX=--index-url=https://...
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
EXTRAS ?= train,data,sam,eval,dev
STAMP := $(VENV)/.installed-$(shell echo "$(TORCH_SPEC) $(EXTRAS)" | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow test-all lint format demo data slurm-check bench gpu-check ablations clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_INDEX) $(TORCH_SPEC)
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

test-all: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# `make demo`: the shipped tiny base trained on photos + 256 photo crops, 1,000 CPU steps (~2.5 min), export,
# grids, held-out inpainting numbers. Each run gets demo/runs/NNN (an unfinished one is resumed; nothing is
# deleted). `make demo BASE=<hub id or folder>` trains the same way on a real base model;
# DEMO_ARGS="--new --steps 500" passes more options (python -m train.tools.demo --help).
# `make demo FAMILY=sdxl`: the same on the shipped SDXL-layout tiny photo base (runs in demo/sdxl);
# `make demo FAMILY=sd3|flux`: on a tiny random SD3 / Flux base (python -m train.tools.demo_dit --help).
BASE ?=
DEMO_ARGS ?=
FAMILY ?=
demo: install
	$(if $(filter-out sdxl sd3 flux,$(FAMILY)),$(error FAMILY=$(FAMILY): expected sdxl, sd3 or flux (or none: SD 1.5)))
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/python -m $(if $(filter sd3 flux,$(FAMILY)),train.tools.demo_dit --family $(FAMILY),train.tools.demo $(if $(filter sdxl,$(FAMILY)),--tiny sdxl) $(if $(BASE),--base $(BASE))) $(DEMO_ARGS)

# `make ablations`: the paper's ablations (configs/ablations/) trained and evaluated on the tiny photo base,
# 3 seeds each, resumable; ABLATION_ARGS="--steps 600 --seeds 0,1,2,3,4" etc. (python -m train.tools.ablations -h)
ABLATION_ARGS ?=
ablations: install
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/python -m train.tools.ablations $(ABLATION_ARGS)

# `make data`: the embedded default builds a small real BrushData set offline (loopback HTTP server);
# `make data CONFIG=configs/data/laion_aesthetic_6plus.yaml METADATA=...` runs the real thing.
CONFIG ?=
METADATA ?=
DATA_OUT ?= data/demo
data: install
	$(if $(CONFIG),$(BIN)/python -m data_pipeline chain --config $(CONFIG) $(if $(METADATA),--metadata $(METADATA)),$(BIN)/python -m data_pipeline demo --out $(DATA_OUT))

# Validate the Slurm scripts against the cluster you are on (sbatch --test-only).
slurm-check:
	bash slurm/check.sh

# `make bench`: device limits, training step (time, FLOPs, memory), Lightning overhead, loader vs the official
# collate, labelling and shard writes -> bench.json + markdown tables (python -m train.tools.bench -h).
# QUICK=1: tiny + small, a few minutes on 2 CPU cores; FULL=1 adds the SD1.5 shape (10-16 GiB on CPU).
QUICK ?=
FULL ?=
BENCH_OUT ?= bench.json
bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m train.tools.bench $(if $(QUICK),--quick) $(if $(FULL),--full) --out $(BENCH_OUT)

# `make gpu-check`: the CUDA checks as one command (python -m train.tools.bench.gpu -h): SD1.5 / SDXL step
# time, samples/s and MFU with fused AdamW, AdamW8bit and torch.compile, then brushnet-train on the device.
gpu-check: install
	HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 $(BIN)/python -m train.tools.bench.gpu --compile --out gpu.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
