# ichpipe: the pipeline is this file. Every stage target takes
#   DATA_DIR=...  the competition files as Kaggle unzips them (default: data, the synthetic set)
#   WORKERS=N     worker processes (default 0 = every core)
#   CONFIG=...    a YAML in configs/ (default configs/default.yaml)
# and any dotted config override, e.g. `make preprocess preprocess.size=256`.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
DATA_DIR ?= data
WORKERS  ?= 0
CONFIG   ?= configs/default.yaml

# Dotted overrides given on the make command line (lower-case keys) go to the scripts as they are.
OVERRIDES := $(filter-out DATA_DIR=% WORKERS=% CONFIG=% TRAIN_CONFIG=% PYTHON=% VENV=% GPUS=% SHARD=% N=%,$(MAKEOVERRIDES))
STAGE_ARGS = --config $(CONFIG) data.root=$(DATA_DIR) data.workers=$(WORKERS) $(OVERRIDES)

.PHONY: help setup demo synthetic preprocess train embed eda test lint bench bench-preprocess bench-train clean-data

help:
	@echo "make demo        set up, generate the synthetic set and run the pipeline on it"
	@echo "make test        run the test suite (sets up first)"
	@echo "make setup       create $(VENV) and install the pinned requirements"
	@echo "make synthetic   write the synthetic RSNA-format dataset under DATA_DIR"
	@echo "make preprocess  DICOMs -> 3-window PNGs, metadata table, folds (DATA_DIR/processed)"
	@echo "make train fold=0   train the CNN of one fold (all folds without fold=; GPUS=N for torchrun)"
	@echo "make embed fold=0   embeddings and logits of OOF and test slices per checkpoint, with TTA"
	@echo "make eda         dataset overview figures from the metadata table (DATA_DIR/eda)"
	@echo "make bench       print the benchmark figures"

# The venv is rebuilt only when the requirements change.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

synthetic: setup
	$(PY) scripts/00_make_synthetic.py $(STAGE_ARGS)

# SHARD=I/N runs one shard of the preprocessing chunks (cluster array jobs).
SHARD ?= 0/1
preprocess: setup
	$(PY) scripts/01_preprocess.py --shard $(SHARD) $(STAGE_ARGS)

# make train fold=0 (one fold) or make train (every fold); GPUS=4 runs torchrun with 4 processes.
TRAIN_CONFIG ?= configs/cnn/cpu_small.yaml
GPUS ?= 1
N_FOLDS = $(shell $(PY) -c "from ichpipe.config import load_config as l; print(l('$(TRAIN_CONFIG)').preprocess.n_folds)" 2>/dev/null || echo 5)
TRAIN_ARGS = --config $(TRAIN_CONFIG) data.root=$(DATA_DIR) data.workers=$(WORKERS) $(filter-out fold=%,$(OVERRIDES))
ifeq ($(GPUS),1)
TRAIN_CMD = $(PY) scripts/02_train_cnn.py
else
TRAIN_CMD = $(PY) -m torch.distributed.run --standalone --nproc_per_node $(GPUS) scripts/02_train_cnn.py
endif

train: setup
ifdef fold
	$(TRAIN_CMD) $(TRAIN_ARGS) fold=$(fold)
else
	for k in $$(seq 0 $$(($(N_FOLDS) - 1))); do $(TRAIN_CMD) $(TRAIN_ARGS) fold=$$k || exit 1; done
endif

# make embed fold=0 (one fold) or make embed (every fold): embeddings + logits per epoch checkpoint.
embed: setup
ifdef fold
	$(PY) scripts/03_embed.py $(TRAIN_ARGS) fold=$(fold)
else
	for k in $$(seq 0 $$(($(N_FOLDS) - 1))); do $(PY) scripts/03_embed.py $(TRAIN_ARGS) fold=$$k || exit 1; done
endif

eda: setup
	$(PY) eda/01_dataset_overview.py $(STAGE_ARGS)

demo: synthetic preprocess eda

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check src scripts tests eda benchmarks

bench: bench-preprocess bench-train

# img/s of the configured backbone: tensors on the device vs the PNG loader, fp32 vs AMP.
bench-train: setup
	$(PY) benchmarks/bench_train.py --config $(TRAIN_CONFIG) data.root=$(DATA_DIR) $(OVERRIDES)

# N generated 512x512 DICOMs, one core: our stage vs a Kaggle-kernel reference vs the decode+encode floor.
N ?= 300
bench-preprocess: setup
	$(PY) benchmarks/bench_preprocess.py --n $(N)

clean-data:
	rm -rf $(DATA_DIR)/processed
