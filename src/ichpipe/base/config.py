"""Typed configuration: YAML files in ``configs/`` validated into pydantic models, with dotted CLI overrides.

A YAML file may name a ``base:`` file (relative to itself) whose values it overrides. Command-line
overrides are ``key=value`` pairs with dotted keys (``fold=0``, ``preprocess.size=256``); values are
parsed as YAML. The layers (defaults, the YAML chain, the overrides) are merged as mappings, key by key, and
the result is validated once by the models below: every setting's type, its choices (``Literal``), its
bounds (``Field``) and the checks that involve two settings live in the model, and an unknown key is an
error. The first problem is one line naming the key (and the file, for a YAML file's own mistakes).
:func:`save_config` writes the resolved config beside a stage's output.
"""

from __future__ import annotations

import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from ichpipe.base.errors import quote
from ichpipe.base.files import atomic_path
from ichpipe.base.yaml_io import bound_yaml, parse_yaml, read_yaml_mapping

REPO_ROOT = Path(__file__).resolve().parents[3]  # src/ichpipe/base/config.py
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"  # load_config()'s base when no file is named
# The config of every entry point run without --config (scripts/*.py, eda/*.py) and of the Makefile's CONFIG: one
# default, so that `python scripts/04_lstm_train.py` after `make demo` works on the demo's experiment with its settings
STAGE_CONFIG = REPO_ROOT / "configs" / "demo" / "cpu_small.yaml"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def _number(value: Any) -> Any:
    """A float setting: ints and numeric strings (YAML 1.1 reads 3e-4, without a dot, as a string) are numbers; a
    boolean is not; the number must be finite."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {quote(value)}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {quote(value)}") from None
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def _text(value: Any) -> Any:
    """A string setting: a number given for it (``experiment=2024``) is its text."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # at most 100 characters: a file system takes 255


def check_name(value: str, key: str = "") -> str:
    """``value`` if it is a plain folder name (letters, digits, ``_ . -``, not starting with a dot); else an
    error (a ConfigError naming ``key`` when given): a name from the command line must not lead outside its
    folder."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        message = (f"must be a plain folder name (letters, digits, '_', '.', '-'; not starting with '.'; at most 100), "
                   f"got {quote(value)}")
        raise ConfigError(f"{key}: {message}") if key else ValueError(message)
    return value


def _int64(value: int) -> int:
    """Every integer setting fits in 64 bits (numpy, torch and the OS take no more: 10**23 would overflow there)."""
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"must fit in 64 bits, got {quote(value)}")
    return value


Int = Annotated[int, Strict(), AfterValidator(_int64)]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_number)]
Str = Annotated[str, BeforeValidator(_text)]
Seed = Annotated[Int, Field(ge=0, le=2**32 - 1)]  # numpy's and torch's generators take any seed in this range
Name = Annotated[Str, AfterValidator(check_name)]  # a folder or file name under the data root
OptionalName = Annotated[Str, AfterValidator(lambda v: check_name(v) if v else v)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    root: Str = "data"  # DATA_DIR: the competition files exactly as Kaggle unzips them (only read)
    work_dir: Str = ""  # where every output goes (processed/, runs/, eda/); empty = the data root
    workers: Annotated[Int, Field(ge=0)] = 0  # worker processes for parallel stages; 0 = every core


class SyntheticConfig(_Section):
    """The synthetic RSNA-format dataset (``scripts/00_make_synthetic.py``)."""

    seed: Seed = 2019  # the whole set is a pure function of this seed and the settings below
    # the brain: "drawn" (ellipsoids and harmonics) or "template" (the ICBM152 2009 average brain, per patient scaled,
    # warped and atrophied: ichpipe.synthetic.template; bleeds go into its own sulci, fissures, cisterns, ventricles)
    anatomy: Literal["drawn", "template"] = "drawn"
    n_patients: Annotated[Int, Field(ge=1)] = 60  # patients, train and test together
    # share of patients in stage_2_test/ (disjoint from train)
    test_fraction: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.2
    second_study_rate: Float = 0.3  # patients with two studies
    slices_min: Int = 20  # slices per series, drawn between slices_min and slices_max
    slices_max: Int = 40  # slices per series at most
    size: Int = 512  # matrix size of most series (rate_non512 get another)
    control_rate: Float = 0.45  # patients with no bleed in any study
    # chance that a non-control study holds a bleed of this subtype
    bleed_rates: dict[Str, Float] = Field(default_factory=lambda: {
        "epidural": 0.08, "intraparenchymal": 0.5, "intraventricular": 0.45,
        "subarachnoid": 0.3, "subdural": 0.2,
    })
    faint_rate: Float = 0.25  # bleeds that are not acute: hyperacute, subacute (isodense), chronic or mixed (subdurals)
    min_label_area_mm2: Float = 6.0  # a slice is labelled when a bleed covers at least this much
    # The real data's quirks, as rates per study (series) or counts.
    rate_12bit_quirk: Float = 0.1  # unsigned 12-bit, PixelRepresentation 0, intercept > -100
    rate_multivalue_window: Float = 0.2  # WindowCenter/Width stored as two values
    rate_non512: Float = 0.05  # series of another matrix size
    rate_fov_padding: Float = 0.3  # pixels outside the scan circle at -2000 HU (padding)
    # series with a tilted gantry (ImageOrientationPatient not axial)
    rate_gantry_tilt: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.15
    rate_motion: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.05  # series with a few slices blurred by patient motion
    n_truncated: Int = 1  # train files whose pixel data is shorter than declared
    n_duplicate_images: Int = 2  # images whose six label rows appear twice in stage_2_train.csv


class PreprocessConfig(_Section):
    """DICOM → 3-window PNGs and the metadata table (``scripts/01_preprocess.py``)."""

    size: Annotated[Int, Field(ge=1)] = 512  # PNG side; 256 for half-resolution training
    # (center, width) per RGB channel: brain, subdural, and soft tissue 40/380 (the 2nd place) or bone 600/2800 (the
    # 1st)
    windows: list[list[Float]] = Field(default_factory=lambda: [[40, 80], [80, 200], [40, 380]])
    # "windows": one window per channel; "2.5d": brain window of slices s-1, s, s+1; "2.5d_windows": 9 channels,
    # the 3 windows of slices s-1, s, s+1 (stage 1 writes the "windows" PNGs; the loader stacks neighbours)
    mode: Literal["windows", "2.5d", "2.5d_windows"] = "windows"
    name: OptionalName = ""  # output folder under processed/; empty = "<size>" (windows, 2.5d_windows) or "<size>_2.5d"
    # PNG encoder: the wall of this stage. Chosen by `make bench-preprocess` (BENCHMARKS.md): no
    # row filter at zlib level 1 is ~2.5x faster than libpng's adaptive filters and smaller too.
    png_level: Annotated[Int, Field(ge=0, le=9)] = 1
    png_filter: Literal["none", "sub", "up", "paeth", "adaptive"] = "none"  # none | sub | up | paeth | adaptive
    png_strategy: Literal["filtered", "default", "rle"] = "filtered"  # filtered | default | rle
    n_folds: Annotated[Int, Field(ge=2)] = 5  # patient folds (grouped by PatientID, the rare classes spread first)
    fold_seed: Seed = 42  # the folds' seed; one fold table serves every experiment (see replace_folds)
    replace_folds: Bool = False  # rewrite the fold table although finished runs were trained on the current one
    max_bad_fraction: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.01  # fail when more files than this are unreadable
    chunk_size: Annotated[Int, Field(ge=1)] = 128  # files per task; a finished chunk is never redone on resume

    @model_validator(mode="after")
    def _windows(self) -> PreprocessConfig:
        if self.mode != "2.5d" and len(self.windows) != 3:
            raise ValueError(f"preprocess.windows: need three [center, width] pairs (R, G, B), got {self.windows}")
        for w in self.windows:
            if len(w) != 2 or w[1] <= 0:
                raise ValueError(f"preprocess.windows: each window is [center, width > 0], got {w}")
        return self


class ModelConfig(_Section):
    backbone: Str = "resnet18"  # any timm model name
    pretrained: Bool = True  # ImageNet weights through timm (needs the network or timm's cache)
    weights: Str = ""  # a local ImageNet weights file for the backbone, instead of downloading
    init_from: Str = ""  # an ichpipe checkpoint to start from (half-res -> full-size fine-tuning)
    drop_rate: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.0  # dropout before the classifier (timm's drop_rate)
    # more arguments of timm.create_model, e.g. a reduced width {channels: [16, 32, 64, 128], stem_width: 16} for a
    # resnet, saved with the run and the bundle (every stage builds the same network)
    kwargs: dict[Str, Any] = Field(default_factory=dict)


class TrainConfig(_Section):
    """The CNN stage (``scripts/02_train_cnn.py``); one run per fold."""

    image_size: Annotated[Int, Field(ge=1)] = 256  # network input; PNGs are resized on the fly when they differ
    epochs: Annotated[Int, Field(ge=1)] = 3  # a checkpoint per epoch (the bag of stage 3)
    batch_size: Annotated[Int, Field(ge=1)] = 32  # images per optimizer step, over every process and accumulation step
    lr: Annotated[Float, Field(gt=0.0)] = 3e-4  # peak learning rate
    # adamw | adam (torch.optim; adam's weight_decay is an L2 term, as torch has it)
    optimizer: Literal["adamw", "adam"] = "adamw"
    weight_decay: Annotated[Float, Field(ge=0.0)] = 1e-2  # decoupled (AdamW) or L2 (Adam)
    # cosine: linear warm-up, then cosine to 0 | constant: linear warm-up, then lr
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: Annotated[Int, Field(ge=0)] = 50  # linear warm-up from 0, in optimizer steps
    accumulate: Annotated[Int, Field(ge=1)] = 1  # micro-batches per optimizer step
    clip_grad: Annotated[Float, Field(ge=0.0)] = 1.0  # max gradient norm; 0 = off
    loss: Literal["weighted_bce", "mse"] = "weighted_bce"  # weighted_bce (the metric: any x2) | mse (on probabilities)
    # Beta(α, α) of mixup, one λ per batch (0.4 as the 2nd place tried on EfficientNet); 0 = off
    mixup: Annotated[Float, Field(ge=0.0)] = 0.0
    label_smoothing: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.0  # training targets y(1-ε) + ε/2; 0 = off
    # auto (fp16 + GradScaler on CUDA, off on CPU) | bf16 | fp16 | off
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: Bool = True  # NHWC memory layout on the device (faster convolutions with AMP)
    compile: Bool = False  # torch.compile the model
    # on CUDA: let cuDNN time its kernels for the fixed input size once, then use the fastest
    cudnn_benchmark: Bool = True
    loader_workers: Annotated[Int, Field(ge=0)] = 2  # DataLoader processes per GPU
    # keep each decoded PNG in memory after its first read, up to this many MB per process (stages 2 and 3, every
    # fold of an --all-folds run): for sets that fit (the demo's 2,331 PNGs at 128 px take 115 MB); 0 = off
    image_cache_mb: Annotated[Int, Field(ge=0)] = 0
    augment: list[dict[Str, Any]] = Field(default_factory=list)  # empty = ichpipe.networks.dataset.DEFAULT_AUGMENT
    # crop the black border around the head and pad the box to a square before resizing (the 2nd place's
    # autocrop); the same crop in training, stage 3 and predict
    crop_border: Bool = False
    # with crop_border: random margin per side in training, up to this x box size; 0 = tight
    crop_margin: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.1
    log_every: Annotated[Int, Field(ge=1)] = 20  # steps between TensorBoard points


class EmbedConfig(_Section):
    """Per-slice embeddings and logits from each bagged checkpoint (``scripts/03_embed.py``)."""

    # views, averaged
    tta: list[Literal["none", "hflip", "transpose"]] = Field(default_factory=lambda: ["none", "hflip", "transpose"])
    keep_views: Bool = False  # also save every view separately
    epochs: list[Int] = Field(default_factory=list)  # checkpoints to embed; empty = every epoch
    batch_size: Annotated[Int, Field(ge=1)] = 64  # slices per batch
    train: Bool = False  # also the fold's training patients (train_*.npy), for lstm.train_on=train or train_and_oof
    # the embeddings' dtype on disk (logits stay float32): float16 halves stage 3's disk (5 folds x 5 epochs at
    # 2048-d: ~28 GB instead of ~55) and what stage 4 reads; stage 4 computes in float32 either way
    dtype: Literal["float16", "float32"] = "float16"


class LstmConfig(_Section):
    """The sequence model over each series' slices (``scripts/04_lstm_train.py``); one run per fold."""

    # lstm | gru | gru_attention | transformer | lstm_2nd_place (src/ichpipe/networks/sequence_models.py): the 2nd
    # place's
    # own network, two BiLSTMs whose outputs, their ReLU-linear maps and the embedding are summed before the head
    kind: Literal["lstm", "gru", "gru_attention", "transformer", "lstm_2nd_place"] = "lstm"
    heads: Int = 4  # attention heads (gru_attention, transformer); must divide 2 x hidden
    # patient groups inside the fold: each inner model predicts one (leakage-free OOF)
    inner_folds: Annotated[Int, Field(ge=2)] = 4
    # oof: train on the fold's held-out patients only (nested CV: lstm.inner_folds models + a refit).
    # train: on the CNN's own training patients only, one model per checkpoint that predicts the held-out
    # patients and the test set (the 2nd place's recipe; needs embed.train=true). train_and_oof: both, nested.
    # Every OOF prediction comes from a model that never saw the patient, over a CNN that never saw it
    train_on: Literal["oof", "train", "train_and_oof"] = "oof"
    # Linear+ReLU from the CNN embedding to this size first; 0 = use it as is
    reduce_dim: Annotated[Int, Field(ge=0)] = 64
    standardize: Bool = True  # embeddings standardised by the training rows' mean/std (false: raw, as the 2nd place)
    # units per direction (recurrent kinds); the transformer's width is 2 x hidden
    hidden: Annotated[Int, Field(ge=1)] = 64
    layers: Annotated[Int, Field(ge=1)] = 2  # recurrent or encoder layers
    dropout: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.2  # between the recurrent or encoder layers
    epochs: Annotated[Int, Field(ge=1)] = 12  # as the 2nd place
    bag_last: Annotated[Int, Field(ge=1)] = 4  # predictions averaged over the last this many epochs
    batch_size: Annotated[Int, Field(ge=1)] = 8  # series per batch
    optimizer: Literal["adamw", "adam"] = "adamw"  # adamw | adam
    lr: Annotated[Float, Field(gt=0.0)] = 2e-3  # the sequence model's learning rate
    # the lr is multiplied by this after every epoch (StepLR; the 2nd place: 0.95); 1 = constant
    lr_gamma: Annotated[Float, Field(ge=0.0, le=1.0)] = 1.0
    weight_decay: Annotated[Float, Field(ge=0.0)] = 1e-2  # the sequence model's (AdamW decoupled, Adam L2)
    # augmentation as the 1st place's: each training series cut to a random window of this many slices (0: whole)
    window: Annotated[Int, Field(ge=0)] = 0
    reverse: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.0  # chance that a training series is read backward
    reverse_tta: Bool = False  # predict each series forward and backward, and average (the 1st place's test view)


class BlendConfig(_Section):
    """Folds x bags x TTA averaged into a submission (``scripts/05_blend.py``)."""

    epoch_weights: dict[int, Float] = Field(default_factory=dict)  # CNN epoch -> weight; missing = 1
    fold_weights: dict[int, Float] = Field(default_factory=dict)  # fold -> weight for the test set; missing = 1
    # final = lstm_weight x LSTM + (1 - lstm_weight) x CNN bagged
    lstm_weight: Annotated[Float, Field(ge=0.0, le=1.0)] = 1.0
    # probabilities clipped to [clip, 1 - clip], as the top teams did
    clip: Annotated[Float, Field(ge=0.0, le=0.5)] = 1e-5
    out_dir: Str = "submissions"  # relative to the work folder (data.work_dir, else the data root) unless absolute
    competition: Str = "rsna-intracranial-hemorrhage-detection"  # for `make submit`


class StackerConfig(_Section):
    """The ensemble's second-level model per class (scikit-learn), on the members' neighbour features."""

    # logistic (L2 logistic regression on standardised features) | hgb (gradient boosting)
    model: Literal["logistic", "hgb"] = "logistic"
    neighbours: list[Int] = Field(default_factory=lambda: [1, 2])  # features of the slices at z ± these
    c: Float = 0.01  # logistic: inverse L2 strength
    # hgb (HistGradientBoostingClassifier): small trees, as a few thousand training slices per fold allow
    max_iter: Int = 60  # hgb: boosting iterations
    learning_rate: Float = 0.05  # hgb: shrinkage
    max_leaf_nodes: Int = 4  # hgb: leaves per tree
    min_samples_leaf: Int = 80  # hgb: slices per leaf at least
    l2_regularization: Float = 5.0  # hgb: L2 on the leaf values


class ContextConfig(_Section):
    """The context stacker (combiner ``context``, the 3rd and 11th places'): LightGBM per class over every member's
    probabilities at the slice and its neighbours, boosted from the members' mean (src/ichpipe/fitting/stackers.py)."""

    neighbours: Annotated[Int, Field(ge=0, le=20)] = 5  # the slices at z ± 1..this (the 3rd place: 20)
    inner_folds: Annotated[Int, Field(ge=2)] = 3  # inner patient groups: early stopping on each, their models averaged
    learning_rate: Annotated[Float, Field(gt=0.0)] = 0.05
    num_leaves: Annotated[Int, Field(ge=2)] = 7  # leaves per tree
    min_data_in_leaf: Annotated[Int, Field(ge=1)] = 50  # slices per leaf at least
    feature_fraction: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.5  # features drawn per tree
    bagging_fraction: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.8  # slices drawn per tree
    lambda_l2: Annotated[Float, Field(ge=0.0)] = 5.0  # L2 on the leaf values
    max_rounds: Annotated[Int, Field(ge=1)] = 500  # boosting rounds at most
    early_stopping: Annotated[Int, Field(ge=1)] = 30  # rounds without a better inner-validation loss before stopping


def _ensemble_sequence() -> LstmConfig:
    """The ensemble's sequence model (combiner ``sequence``): each member's embedding projected to 32 on its own,
    the 1st place's augmentations (series read backward at random) and their test view (forward and backward)."""
    return LstmConfig(reduce_dim=32, reverse=0.5, reverse_tta=True)


class EnsembleConfig(_Section):
    """Experiments combined into one submission (``scripts/06_ensemble.py``, ``make ensemble``)."""

    name: Name = "ensemble"  # its folder under runs/ and its submissions' name
    members: list[Name] = Field(default_factory=list)  # experiment names; EXPERIMENTS="a b" on make
    member_model: Str = "blend"  # which of each member's stage-5 models: blend | cnn_bagged | lstm | ...
    # scored out of fold on the same folds: mean | weights (per class) | stacker (logistic, z ± 2) | context
    # (LightGBM over z ± k, boosted from the mean) | sequence (a sequence model over the members' embeddings)
    combiners: list[Literal["mean", "weights", "stacker", "context", "sequence"]] = Field(
        default_factory=lambda: ["mean", "weights", "stacker"])
    # per-class weights on probabilities (prob), logits (logit) or by CV (auto)
    weight_space: Literal["auto", "prob", "logit"] = "auto"
    final: Str = "auto"  # the submitted combiner or member; auto = the lowest OOF loss of all of them
    stacker: StackerConfig = Field(default_factory=StackerConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    # the sequence model over the members' per-slice embeddings and logits (stage 4's settings; its train_on needs
    # every member embedded with embed.train=true for train / train_and_oof)
    sequence: LstmConfig = Field(default_factory=_ensemble_sequence)


class PseudoConfig(_Section):
    """Pseudo-labels (src/ichpipe/fitting/pseudo.py): a finished model's test predictions, fold by fold, as the
    labels of the test slices that stage 2 and stage 4 of this experiment also train on."""

    # the experiment (or ensemble) whose stage 5 wrote runs/<source>/blend/test_by_fold.parquet; empty: off
    source: OptionalName = ""
    model: Str = "blend"  # which of its models: blend | lstm | cnn_bagged (an ensemble: a combiner, or final)
    # soft: the probabilities as targets, every test slice | hard: rounded, confident slices only
    labels: Literal["soft", "hard"] = "soft"
    # hard: keep a slice when every class is below this or above 1 - this
    confidence: Annotated[Float, Field(ge=0.0, le=0.5)] = 0.1
    stages: list[Literal["train", "lstm"]] = Field(default_factory=lambda: ["train", "lstm"])  # which stages use them


class ReportConfig(_Section):
    """The experiment report (``scripts/07_report.py``): figures and report.md from the OOF predictions."""

    # whose OOF predictions: prior | cnn_single | cnn_bagged | lstm | blend
    model: Literal["prior", "cnn_single", "cnn_bagged", "lstm", "blend"] = "blend"
    examples_per_class: Annotated[Int, Field(ge=1)] = 4  # rows of Figure 1
    default_recall: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.95  # target recall of each class's operating point
    target_recall: dict[Str, Float] = Field(default_factory=lambda: {"any": 0.95})  # per class, over the default
    # a bundle reports a class present (predict's series.csv, its DICOM SR) only where the series' highest slice
    # reaches the point whose OOF series specificity is at least this (ichpipe.stages.bundle.operating_points)
    rule_in_specificity: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.95
    calibration_bins: Annotated[Int, Field(ge=2)] = 10  # bins of the reliability diagram
    # the Grad-CAM pointing game where the data root has the synthetic answer key's bleed masks: at most this many
    # correctly flagged OOF slices per subtype (a seeded sample), each with its own fold's CNNs; 0: off
    pointing_slices: Annotated[Int, Field(ge=0)] = 100


class Config(_Section):
    experiment: Name = "demo"  # its folder under runs/: every stage of one experiment takes the same name
    # the fold that stages 2-4 run (make train fold=0); --all-folds runs each in turn
    fold: Annotated[Int, Field(ge=0)] = 0
    seed: Seed = 42  # model seed: initial weights, data order, augmentation, sequence models (the folds have their own)
    # a bag of seeds: each a full run under runs/<experiment>/seed<s>/ (stages 2-4 run every seed in turn, each
    # resumes on its own), averaged by stage 5; empty: one run with ``seed``
    seeds: list[Seed] = Field(default_factory=list)
    resume: Bool = False  # continue the fold's run from its last checkpoint
    # redo a finished result (embeddings, sequence models) that was made with other settings; without it such a
    # result is kept and the stage stops, naming the settings that differ
    replace: Bool = False
    data: DataConfig = Field(default_factory=DataConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    lstm: LstmConfig = Field(default_factory=LstmConfig)
    blend: BlendConfig = Field(default_factory=BlendConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    pseudo: PseudoConfig = Field(default_factory=PseudoConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _across_settings(self) -> Config:
        """The checks that involve two settings (one line each, naming both)."""
        for key, lstm in (("lstm", self.lstm), ("ensemble.sequence", self.ensemble.sequence)):
            if lstm.bag_last > lstm.epochs:
                raise ValueError(f"{key}.bag_last={lstm.bag_last}: must not exceed {key}.epochs={lstm.epochs}")
        if not self.ensemble.sequence.reduce_dim:
            raise ValueError("ensemble.sequence.reduce_dim: each member's embedding is projected first; give a width "
                             "above 0")
        for key in ("epoch_weights", "fold_weights"):
            for k, w in getattr(self.blend, key).items():
                if k < 0 or w < 0:
                    raise ValueError(f"blend.{key}.{k}: epochs, folds and weights are not negative, got {k}: {w}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed once, got {self.seeds}")
        if self.pseudo.source and self.pseudo.source == self.experiment:
            raise ValueError(f"pseudo.source={self.pseudo.source}: the experiment itself; name a finished one")
        e = self.ensemble
        if not e.combiners:
            raise ValueError("ensemble.combiners: name at least one of mean, weights, stacker, context, sequence")
        if e.final not in ("auto", *e.combiners, *e.members):
            raise ValueError(f"ensemble.final={e.final!r}: auto, one of ensemble.combiners {e.combiners} or a "
                             f"member {list(e.members)}")
        return self


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The chain of mappings from the deepest ``base:`` to ``path`` itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; --config takes a YAML file such as configs/demo/cpu_small.yaml")
    data = read_yaml_mapping(path, ConfigError)
    base = data.pop("base", None)
    if base is not None and not (isinstance(base, str) and base):
        raise ConfigError(f"{path}: base: the name of a YAML file (relative to this one), got {quote(base)}")
    chain = _read_yaml(path.parent / base, (*seen, path)) if base else []
    return [*chain, data]


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "fold=0"]`` → ``{"a": {"b": 1}, "fold": 0}`` (values parsed as YAML)."""
    flat: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item}: overrides are key=value (e.g. fold=0 train.lr=3e-4)")
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except (yaml.YAMLError, RecursionError):  # text that is no YAML is a string
            value = raw
        flat[key] = bound_yaml(value, f"{key}=", ConfigError)
    return nest(flat)


def nest(flat: dict) -> dict:
    """``{"a.b": 1, "c": 2}`` → ``{"a": {"b": 1}, "c": 2}`` (the inverse of :func:`flatten`)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: given both a value ({quote(node)}) and a setting inside "
                                  f"it ({key}); give one")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"{key}: given both a value ({quote(value)}) and settings inside it; give one")
        node[parts[-1]] = value
    return out


def _merge(base: dict, layer: dict) -> dict:
    """``layer`` over ``base``, mappings merged key by key (so an override can change one entry of a section or of
    a mapping setting); anything else replaced."""
    out = dict(base)
    for key, value in layer.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# The mistakes one layer can make on its own (the rest, such as bounds or settings that must agree, are judged
# on the merged result): reported with the file that made them.
_LAYER_ERRORS = {"extra_forbidden", "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing",
                 "bool_type", "bool_parsing", "string_type", "list_type", "dict_type", "model_type",
                 "model_attributes_type"}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> Config:
    """Defaults ← YAML chain of ``path`` (default ``configs/default.yaml``) ← ``overrides`` (``key=value`` text)
    ← ``values`` (dotted keys with typed values, e.g. a search trial's), validated into a Config."""
    path = Path(path) if path else DEFAULT_CONFIG
    merged = Config().model_dump(mode="python")
    for layer in _read_yaml(path):
        merged = _merge(merged, layer)
        _check_layer(merged, path)
    merged = _merge(merged, parse_overrides(overrides or []))
    merged = _merge(merged, nest(values or {}))
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None


def _check_layer(merged: dict, path: Path) -> None:
    """A YAML layer's own mistakes (:data:`_LAYER_ERRORS`), named with its file; problems a later layer may still
    fix wait for the merged result."""
    try:
        Config.model_validate(merged)
    except ValidationError as exc:
        own = [e for e in exc.errors() if e["type"] in _LAYER_ERRORS]
        if own:
            raise ConfigError(f"{path}: {_describe(own[0])}") from None


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
               "list": "a list", "dict": "a mapping", "model": "a section (mapping)", "model_attributes": "a section "
                                                                                                          "(mapping)"}


def _describe(error: dict) -> str:
    """One line for one of pydantic's errors, in this project's words: ``key: what is wrong, got value``."""
    loc = list(error["loc"])
    is_key = bool(loc) and loc[-1] == "[key]"
    if is_key:
        loc = loc[:-1]
    key = _dotted(loc)
    kind, value = error["type"], error.get("input")
    ctx = error.get("ctx", {})
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = ", ".join(sorted(parent.model_fields)) if parent is not None else ""
        return f"{key}: unknown key (known: {known})"
    if is_key:
        return f"{key.rpartition('.')[0]}: keys are integers, got {quote(loc[-1])}"
    family = kind.split("_")[0] if not kind.startswith("model_attributes") else "model_attributes"
    if kind.endswith(("_type", "_parsing")) or kind == "int_from_float":
        return f"{key}: expected {_TYPE_WORDS.get(family, family)}, got {quote(value)}"
    if kind == "literal_error":
        return f"{key}: one of {', '.join(map(str, _literal_args(loc)))}, got {quote(value)}"
    info = _field([p for p in loc if isinstance(p, str)])
    if info is not None and _bare(info.annotation) is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # as the setting holds it: -1 given for a float is -1.0
    bounds = _bounds(loc)
    if kind in ("greater_than_equal", "less_than_equal") and "ge" in bounds and "le" in bounds:
        return f"{key}: must be between {bounds['ge']} and {bounds['le']}, got {quote(value)}"
    if kind == "greater_than_equal":
        return f"{key}: must be at least {ctx['ge']}, got {quote(value)}"
    if kind == "greater_than":
        return f"{key}: must be above {ctx['gt']}, got {quote(value)}"
    if kind == "less_than_equal":
        return f"{key}: must be at most {ctx['le']}, got {quote(value)}"
    message = str(ctx.get("error", error["msg"])).removeprefix("Value error, ")
    names_itself = not key or message.startswith((f"{key}.", f"{key}:", f"{key}="))  # a check across settings
    return message if names_itself else f"{key}: {message}"


def _model_at(loc: list) -> type[BaseModel] | None:
    """The model class a (field-name) location leads to; None past a non-model."""
    model: type[BaseModel] = Config
    for part in loc:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return None
        model = info.annotation
    return model


def _field(loc: list):
    parent = _model_at([p for p in loc[:-1] if isinstance(p, str)])
    return parent.model_fields.get(loc[-1]) if parent is not None and loc and isinstance(loc[-1], str) else None


def _bare(tp: Any) -> Any:
    """The type inside ``Annotated[...]`` (pydantic keeps the constraints beside it)."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _dotted(loc: list) -> str:
    """A pydantic location as this project writes a key: ``train.lr``, ``embed.tta[1]``, ``blend.epoch_weights.2``."""
    key, tp = "", Config
    for part in loc:
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str) and part in tp.model_fields:
            key, tp = (f"{key}.{part}" if key else part), _bare(tp.model_fields[part].annotation)
        elif typing.get_origin(tp) is list:
            key, tp = f"{key}[{part}]", _bare(typing.get_args(tp)[0])
        elif typing.get_origin(tp) is dict:
            key, tp = f"{key}.{part}", _bare(typing.get_args(tp)[1])
        else:
            key, tp = (f"{key}.{part}" if key else str(part)), None
    return key


def _bounds(loc: list) -> dict:
    info = _field([p for p in loc if isinstance(p, str)])
    out = {}
    for m in getattr(info, "metadata", []):
        for name in ("ge", "le", "gt"):
            if getattr(m, name, None) is not None:
                out[name] = getattr(m, name)
    return out


def _literal_args(loc: list) -> tuple:
    info = _field([p for p in loc if isinstance(p, str)])
    tp = getattr(info, "annotation", None)
    while typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def get_value(cfg: Config, key: str) -> Any:
    """The value of a dotted key (``train.lr``); AttributeError for a key the schema does not have."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def to_dict(cfg: Config) -> dict:
    """The config as plain Python values (sections as mappings), as save_config writes it."""
    return cfg.model_dump(mode="python")


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v and all(isinstance(x, str) for x in v)
                   else {f"{prefix}{k}": v})
    return out


def changed_settings(saved_path: str | os.PathLike, cfg: Config, keys: tuple[str, ...]) -> dict[str, tuple]:
    """Settings under ``keys`` (exact keys with whatever they hold, e.g. ``model.kwargs`` and its entries, or
    sections ending in '.') whose value in the config saved at ``saved_path`` differs from ``cfg``'s:
    ``{key: (saved, now)}``. Empty when nothing was saved."""
    if not Path(saved_path).exists():
        return {}
    saved, now = flatten(to_dict(load_config(saved_path))), flatten(to_dict(cfg))

    def wanted(key: str) -> bool:
        return any(key == k or key.startswith(k if k.endswith(".") else k + ".") for k in keys)

    return {k: (saved.get(k),
                now.get(k)) for k in sorted(set(saved) | set(now)) if wanted(k) and saved.get(k) != now.get(k)}


def describe_changes(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k}={quote(old)} (now {quote(new)})" for k, (old, new) in changes.items())


def may_replace(folder: str | os.PathLike, cfg: Config, keys: tuple[str, ...], what: str) -> dict[str, tuple]:
    """The settings under ``keys`` in which the finished result in ``folder`` (its saved ``config.yaml``) differs
    from ``cfg``'s; empty when none. A difference without ``replace=true`` is a one-line ConfigError naming the
    settings and the two ways on: no stage silently replaces a result made with other settings."""
    changed = changed_settings(Path(folder) / "config.yaml", cfg, keys)
    if changed and not cfg.replace:
        raise ConfigError(f"{folder}: {what} made with other settings ({describe_changes(changed)}); set "
                          f"experiment=<new name> to keep it and start another, or add replace=true to redo it")
    return changed


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically); load it back with :func:`load_config`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
