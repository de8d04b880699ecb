"""Typed configuration: YAML files in ``configs/`` loaded into dataclasses, dotted CLI overrides.

A YAML file may name a ``base:`` file (relative to itself) whose values it overrides. Command-line
overrides are ``key=value`` pairs with dotted keys (``fold=0``, ``preprocess.size=256``); values are
parsed as YAML and checked against the field's type. Unknown keys and wrong types are errors that
name the key. :func:`save_config` writes the resolved config beside a stage's output.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ichpipe.io import atomic_path, read_yaml_mapping

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"  # load_config()'s base when no file is named
# The config of every entry point run without --config (scripts/*.py, eda/*.py) and of the Makefile's CONFIG: one
# default, so that `python scripts/lstm_train.py` after `make demo` works on the demo's experiment with its settings
STAGE_CONFIG = REPO_ROOT / "configs" / "cnn" / "cpu_small.yaml"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass
class DataConfig:
    root: str = "data"  # DATA_DIR: the competition files exactly as Kaggle unzips them (only read)
    work_dir: str = ""  # where every output goes (processed/, runs/, eda/); empty = the data root
    workers: int = 0  # worker processes for parallel stages; 0 = every core


@dataclass
class SyntheticConfig:
    """The synthetic RSNA-format dataset (``scripts/00_make_synthetic.py``)."""

    seed: int = 2019
    n_patients: int = 60
    test_fraction: float = 0.2  # share of patients in stage_2_test/ (disjoint from train)
    second_study_rate: float = 0.3  # patients with two studies
    slices_min: int = 20
    slices_max: int = 40
    size: int = 512
    control_rate: float = 0.45  # patients with no bleed in any study
    bleed_rates: dict[str, float] = field(default_factory=lambda: {
        # chance that a non-control study holds a bleed of this subtype
        "epidural": 0.08, "intraparenchymal": 0.5, "intraventricular": 0.45,
        "subarachnoid": 0.3, "subdural": 0.2,
    })
    faint_rate: float = 0.25  # bleeds that are not acute: hyperacute, subacute (isodense), chronic or mixed (subdurals)
    min_label_area_mm2: float = 6.0  # a slice is labelled when a bleed covers at least this much
    # The real data's quirks, as rates per study (series) or counts.
    rate_12bit_quirk: float = 0.1  # unsigned 12-bit, PixelRepresentation 0, intercept > -100
    rate_multivalue_window: float = 0.2  # WindowCenter/Width stored as two values
    rate_non512: float = 0.05  # series of another matrix size
    rate_fov_padding: float = 0.3  # pixels outside the scan circle at -2000 HU (padding)
    rate_gantry_tilt: float = 0.15  # series with a tilted gantry (ImageOrientationPatient not axial)
    rate_motion: float = 0.05  # series with a few slices blurred by patient motion
    n_truncated: int = 1  # train files whose pixel data is shorter than declared
    n_duplicate_images: int = 2  # images whose six label rows appear twice in stage_2_train.csv


@dataclass
class PreprocessConfig:
    """DICOM → 3-window PNGs and the metadata table (``scripts/01_preprocess.py``)."""

    size: int = 512  # PNG side; 256 for half-resolution training
    # (center, width) per RGB channel: brain, subdural, and soft tissue 40/380 (the 2nd place) or bone 600/2800 (the 1st)
    windows: list[list[float]] = field(default_factory=lambda: [[40, 80], [80, 200], [40, 380]])
    # "windows": one window per channel; "2.5d": brain window of slices s-1, s, s+1; "2.5d_windows": 9 channels,
    # the 3 windows of slices s-1, s, s+1 (stage 1 writes the "windows" PNGs; the loader stacks neighbours)
    mode: str = "windows"
    name: str = ""  # output folder under processed/; empty = "<size>" (windows, 2.5d_windows) or "<size>_2.5d"
    # PNG encoder: the wall of this stage. Chosen by `make bench-preprocess` (BENCHMARKS.md): no
    # row filter at zlib level 1 is ~2.5x faster than libpng's adaptive filters and smaller too.
    png_level: int = 1
    png_filter: str = "none"  # none | sub | up | paeth | adaptive
    png_strategy: str = "filtered"  # filtered | default | rle
    n_folds: int = 5
    fold_seed: int = 42
    replace_folds: bool = False  # rewrite the fold table although finished runs were trained on the current one
    max_bad_fraction: float = 0.01  # fail when more files than this are unreadable
    chunk_size: int = 128  # files per task; a finished chunk is never redone on resume


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name
    pretrained: bool = True  # ImageNet weights through timm (needs the network or timm's cache)
    weights: str = ""  # a local ImageNet weights file for the backbone, instead of downloading
    init_from: str = ""  # an ichpipe checkpoint to start from (half-res -> full-size fine-tuning)
    drop_rate: float = 0.0
    # more arguments of timm.create_model, e.g. a reduced width {channels: [16, 32, 64, 128], stem_width: 16} for a
    # resnet, saved with the run and the bundle (every stage builds the same network)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The CNN stage (``scripts/02_train_cnn.py``); one run per fold."""

    image_size: int = 256  # network input; PNGs are resized on the fly when they differ
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-4
    optimizer: str = "adamw"  # adamw | adam (torch.optim; adam's weight_decay is an L2 term, as torch has it)
    weight_decay: float = 1e-2
    schedule: str = "cosine"  # cosine: linear warm-up, then cosine to 0 | constant: linear warm-up, then lr
    warmup_steps: int = 50
    accumulate: int = 1  # micro-batches per optimizer step
    clip_grad: float = 1.0  # max gradient norm; 0 = off
    loss: str = "weighted_bce"  # weighted_bce (the metric: any x2) | mse (on probabilities)
    mixup: float = 0.0  # Beta(α, α) of mixup, one λ per batch (0.4 as the 2nd place tried on EfficientNet); 0 = off
    label_smoothing: float = 0.0  # training targets y(1-ε) + ε/2; 0 = off
    amp: str = "auto"  # auto (fp16 + GradScaler on CUDA, off on CPU) | bf16 | fp16 | off
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    cudnn_benchmark: bool = True  # on CUDA: let cuDNN time its kernels for the fixed input size once, then use the fastest
    loader_workers: int = 2  # DataLoader processes per GPU
    augment: list[dict[str, Any]] = field(default_factory=list)  # empty = ichpipe.data.DEFAULT_AUGMENT
    # crop the black border around the head and pad the box to a square before resizing (the 2nd place's
    # autocrop); the same crop in training, stage 3 and predict
    crop_border: bool = False
    crop_margin: float = 0.1  # with crop_border: random margin per side in training, up to this x box size; 0 = tight
    log_every: int = 20  # steps between TensorBoard points


@dataclass
class EmbedConfig:
    """Per-slice embeddings and logits from each bagged checkpoint (``scripts/03_embed.py``)."""

    tta: list[str] = field(default_factory=lambda: ["none", "hflip", "transpose"])  # views, averaged
    keep_views: bool = False  # also save every view separately
    epochs: list[int] = field(default_factory=list)  # checkpoints to embed; empty = every epoch
    batch_size: int = 64
    train: bool = False  # also the fold's training patients (train_*.npy), for lstm.train_on=train or train_and_oof
    # the embeddings' dtype on disk (logits stay float32): float16 halves stage 3's disk (5 folds x 5 epochs at
    # 2048-d: ~28 GB instead of ~55) and what stage 4 reads; stage 4 computes in float32 either way
    dtype: str = "float16"


@dataclass
class LstmConfig:
    """The sequence model over each series' slices (``scripts/lstm_train.py``); one run per fold."""

    # lstm | gru | gru_attention | transformer | lstm_2nd_place (src/ichpipe/sequence.py): the 2nd place's
    # own network, two BiLSTMs whose outputs, their ReLU-linear maps and the embedding are summed before the head
    kind: str = "lstm"
    heads: int = 4  # attention heads (gru_attention, transformer); must divide 2 x hidden
    inner_folds: int = 4  # patient groups inside the fold: each inner model predicts one (leakage-free OOF)
    # oof: train on the fold's held-out patients only (nested CV: lstm.inner_folds models + a refit).
    # train: on the CNN's own training patients only, one model per checkpoint that predicts the held-out
    # patients and the test set (the 2nd place's recipe; needs embed.train=true). train_and_oof: both, nested.
    # Every OOF prediction comes from a model that never saw the patient, over a CNN that never saw it
    train_on: str = "oof"
    reduce_dim: int = 64  # Linear+ReLU from the CNN embedding to this size first; 0 = use it as is
    standardize: bool = True  # embeddings standardised by the training rows' mean/std (false: raw, as the 2nd place)
    hidden: int = 64  # units per direction (recurrent kinds); the transformer's width is 2 x hidden
    layers: int = 2  # recurrent or encoder layers
    dropout: float = 0.2
    epochs: int = 12  # as the 2nd place
    bag_last: int = 4  # predictions averaged over the last this many epochs
    batch_size: int = 8  # series per batch
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 2e-3
    lr_gamma: float = 1.0  # the lr is multiplied by this after every epoch (StepLR; the 2nd place: 0.95); 1 = constant
    weight_decay: float = 1e-2


@dataclass
class BlendConfig:
    """Folds x bags x TTA averaged into a submission (``scripts/05_blend.py``)."""

    epoch_weights: dict[int, float] = field(default_factory=dict)  # CNN epoch -> weight; missing = 1
    fold_weights: dict[int, float] = field(default_factory=dict)  # fold -> weight for the test set; missing = 1
    lstm_weight: float = 1.0  # final = lstm_weight x LSTM + (1 - lstm_weight) x CNN bagged
    clip: float = 1e-5  # probabilities clipped to [clip, 1 - clip], as the top teams did
    out_dir: str = "submissions"  # relative to the repository root unless absolute
    competition: str = "rsna-intracranial-hemorrhage-detection"  # for `make submit`


@dataclass
class StackerConfig:
    """The ensemble's second-level model per class (scikit-learn), on the members' neighbour features."""

    model: str = "logistic"  # logistic (L2 logistic regression on standardised features) | hgb (gradient boosting)
    neighbours: list[int] = field(default_factory=lambda: [1, 2])  # features of the slices at z ± these
    c: float = 0.01  # logistic: inverse L2 strength (demo, 5-fold-CV: 0.01 → 0.1078, 0.1 → 0.1176)
    # hgb (HistGradientBoostingClassifier): small trees; the demo's ~1,400 training slices per fold
    # over-fit deeper ones (15 leaves, 150 iterations: 0.138 vs 0.113 with these)
    max_iter: int = 60
    learning_rate: float = 0.05
    max_leaf_nodes: int = 4
    min_samples_leaf: int = 80
    l2_regularization: float = 5.0


@dataclass
class EnsembleConfig:
    """Experiments combined into one submission (``scripts/10_ensemble.py``, ``make ensemble``)."""

    name: str = "ensemble"  # its folder under runs/ and its submissions' name
    members: list[str] = field(default_factory=list)  # experiment names; EXPERIMENTS="a b" on make
    member_model: str = "blend"  # which of each member's stage-5 models: blend | cnn_bagged | lstm | ...
    combiners: list[str] = field(default_factory=lambda: ["mean", "weights", "stacker"])
    weight_space: str = "auto"  # per-class weights on probabilities (prob), logits (logit) or by CV (auto)
    final: str = "auto"  # the submitted combiner or member; auto = the lowest OOF loss of all of them
    stacker: StackerConfig = field(default_factory=StackerConfig)


@dataclass
class ReportConfig:
    """The experiment report (``scripts/07_report.py``): figures and report.md from the OOF predictions."""

    model: str = "blend"  # whose OOF predictions: prior | cnn_single | cnn_bagged | lstm | blend
    examples_per_class: int = 4  # rows of Figure 1
    default_recall: float = 0.95  # target recall of each class's operating point
    target_recall: dict[str, float] = field(default_factory=lambda: {"any": 0.95})  # per class, over the default
    calibration_bins: int = 10


@dataclass
class Config:
    experiment: str = "demo"
    fold: int = 0
    seed: int = 42
    resume: bool = False  # continue the fold's run from its last checkpoint
    # redo a finished result (embeddings, sequence models) that was made with other settings; without it such a
    # result is kept and the stage stops, naming the settings that differ
    replace: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    lstm: LstmConfig = field(default_factory=LstmConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: must not be null")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if not args:
            return value
        # Keys too: a dotted override (blend.epoch_weights.2=0.5) arrives with the string key "2".
        return {_coerce_key(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _coerce_key(k: Any, tp: Any, key: str) -> Any:
    """A mapping key as the field's key type: ``"2"`` → 2 for ``dict[int, ...]``."""
    if tp is int and isinstance(k, str):
        try:
            return int(k)
        except ValueError:
            raise ConfigError(f"{key}: keys are integers, got {k!r}") from None
    if tp is str and not isinstance(k, str):
        return str(k)
    return _coerce(k, tp, f"{key} key {k!r}")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    """Set ``values`` (a nested mapping) onto the dataclass ``obj`` in place, checking keys and types."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{full}: unknown key (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a section (mapping), got {value!r}")
            _apply(current, value, f"{full}.")
        elif typing.get_origin(hints[key]) is dict and isinstance(value, dict) and isinstance(current, dict):
            # Mappings merge key by key, so an override can change one entry.
            setattr(obj, key, {**current, **_coerce(value, hints[key], full)})
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The chain of mappings from the deepest ``base:`` to ``path`` itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; --config takes a YAML file such as configs/cnn/cpu_small.yaml")
    data = read_yaml_mapping(path, ConfigError)
    base = data.pop("base", None)
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
            flat[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            flat[key] = raw
    return nest(flat)


def nest(flat: dict) -> dict:
    """``{"a.b": 1, "c": 2}`` → ``{"a": {"b": 1}, "c": 2}`` (the inverse of :func:`flatten`)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML chain of ``path`` (default ``configs/default.yaml``) ← overrides."""
    cfg = Config()
    path = Path(path) if path else DEFAULT_CONFIG
    for layer in _read_yaml(path):
        try:
            _apply(cfg, layer)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    _apply(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


# Settings with a fixed set of values, and settings that must be at least (or above) a bound.
CHOICES = {
    "preprocess.mode": ("windows", "2.5d", "2.5d_windows"),
    "preprocess.png_filter": ("none", "sub", "up", "paeth", "adaptive"),
    "preprocess.png_strategy": ("filtered", "default", "rle"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.optimizer": ("adamw", "adam"),
    "train.schedule": ("cosine", "constant"),
    "embed.dtype": ("float16", "float32"),
    "lstm.kind": ("lstm", "gru", "gru_attention", "transformer", "lstm_2nd_place"),
    "lstm.optimizer": ("adamw", "adam"),
    "train.loss": ("weighted_bce", "mse"),
    "report.model": ("prior", "cnn_single", "cnn_bagged", "lstm", "blend"),
    "lstm.train_on": ("oof", "train", "train_and_oof"),
}
AT_LEAST = {
    "fold": 0, "data.workers": 0, "preprocess.size": 1, "preprocess.n_folds": 2, "preprocess.chunk_size": 1,
    "synthetic.n_patients": 1, "train.image_size": 1, "train.epochs": 1,
    "train.batch_size": 1, "train.accumulate": 1, "train.warmup_steps": 0, "train.loader_workers": 0,
    "train.log_every": 1, "embed.batch_size": 1, "lstm.inner_folds": 2, "lstm.hidden": 1, "lstm.layers": 1,
    "lstm.epochs": 1, "lstm.bag_last": 1, "lstm.batch_size": 1, "lstm.reduce_dim": 0,
    "report.examples_per_class": 1, "report.calibration_bins": 2,
}
ABOVE = {  # strictly above
    "train.lr": 0.0, "lstm.lr": 0.0,
}
NOT_NEGATIVE = ("train.weight_decay", "lstm.weight_decay", "train.clip_grad", "train.mixup")
RANGES = {  # closed intervals
    "preprocess.max_bad_fraction": (0.0, 1.0), "preprocess.png_level": (0, 9), "lstm.dropout": (0.0, 1.0),
    "blend.lstm_weight": (0.0, 1.0), "blend.clip": (0.0, 0.5), "synthetic.test_fraction": (0.0, 1.0),
    "lstm.lr_gamma": (0.0, 1.0), "train.crop_margin": (0.0, 1.0), "train.label_smoothing": (0.0, 1.0),
    "model.drop_rate": (0.0, 1.0), "report.default_recall": (0.0, 1.0),
    "synthetic.rate_gantry_tilt": (0.0, 1.0), "synthetic.rate_motion": (0.0, 1.0),
}


# Settings that become a folder or file name under the data root: a plain name, never a path ("../x", "a/b", "").
NAMES = ("experiment", "ensemble.name")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_name(value: str, key: str) -> str:
    """``value`` if it is a plain folder name (letters, digits, ``_ . -``, not starting with a dot); else a
    one-line ConfigError naming ``key``: a name from the command line must not lead outside its folder."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ConfigError(f"{key}: must be a plain folder name (letters, digits, '_', '.', '-'; not starting with "
                          f"'.'), got {value!r}")
    return value


def _floats(obj: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every float setting of a config (dotted key, value), in mappings and lists too."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _floats(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _floats(v, f"{prefix}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _floats(v, f"{prefix}[{i}]")
    elif isinstance(obj, float):
        yield prefix, obj


def get_value(cfg: Config, key: str) -> Any:
    """The value of a dotted key (``train.lr``); AttributeError for a key the schema does not have."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
    """Values the types allow but no stage can use; a one-line error naming the key, before any work (no run
    folder is made for a config that fails here)."""
    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    for key in NAMES:
        check_name(get_value(cfg, key), key)
    for i, member in enumerate(cfg.ensemble.members):
        check_name(member, f"ensemble.members[{i}]")
    if cfg.preprocess.name:
        check_name(cfg.preprocess.name, "preprocess.name")
    for key, allowed in CHOICES.items():
        if get_value(cfg, key) not in allowed:
            raise ConfigError(f"{key}: one of {', '.join(allowed)}, got {get_value(cfg, key)!r}")
    for key, low in AT_LEAST.items():
        if get_value(cfg, key) < low:
            raise ConfigError(f"{key}: must be at least {low}, got {get_value(cfg, key)}")
    for key, low in ABOVE.items():
        if not get_value(cfg, key) > low:
            raise ConfigError(f"{key}: must be above {low}, got {get_value(cfg, key)}")
    for key in NOT_NEGATIVE:
        if get_value(cfg, key) < 0:
            raise ConfigError(f"{key}: must not be negative, got {get_value(cfg, key)}")
    for key, (low, high) in RANGES.items():
        if not low <= get_value(cfg, key) <= high:
            raise ConfigError(f"{key}: must be between {low} and {high}, got {get_value(cfg, key)}")
    if cfg.lstm.bag_last > cfg.lstm.epochs:
        raise ConfigError(f"lstm.bag_last={cfg.lstm.bag_last}: must not exceed lstm.epochs={cfg.lstm.epochs}")
    for key in ("blend.epoch_weights", "blend.fold_weights"):
        for k, w in get_value(cfg, key).items():
            if k < 0 or w < 0:
                raise ConfigError(f"{key}.{k}: epochs, folds and weights are not negative, got {k}: {w}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


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

    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if wanted(k) and saved.get(k) != now.get(k)}


def describe_changes(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changes.items())


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
