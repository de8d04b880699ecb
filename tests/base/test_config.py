
import pytest
import yaml

from ichpipe.base.config import ConfigError, load_config, parse_overrides, save_config
from tests.conftest import experiment_configs


def test_defaults_and_dotted_overrides():
    cfg = load_config(overrides=["fold=3", "data.root=/mnt/rsna", "synthetic.test_fraction=1",
                                 "synthetic.bleed_rates.epidural=0.5"])
    assert cfg.fold == 3
    assert cfg.data.root == "/mnt/rsna"
    assert cfg.synthetic.test_fraction == 1.0 and isinstance(cfg.synthetic.test_fraction, float)
    # a mapping override changes one entry and keeps the others
    assert cfg.synthetic.bleed_rates["epidural"] == 0.5
    assert cfg.synthetic.bleed_rates["subdural"] == load_config().synthetic.bleed_rates["subdural"]


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; the guide's own example `train.lr=3e-4` must work
    assert load_config(overrides=["train.lr=3e-4"]).train.lr == 3e-4
    (tmp_path / "lr.yaml").write_text("train:\n  lr: 2e-5\n")
    assert load_config(tmp_path / "lr.yaml").train.lr == 2e-5


def test_parse_overrides_nests_and_parses_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=true"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2],
                                                                         "e": True}


@pytest.mark.parametrize("override, message", [
    ("synthetic.n_patiens=3", "synthetic.n_patiens: unknown key"),
    ("nope=1", "nope: unknown key"),
    ("fold=abc", "fold: expected an integer"),
    ("synthetic.n_patients=2.5", "synthetic.n_patients: expected an integer"),
    ("synthetic.faint_rate=high", "synthetic.faint_rate: expected a number"),
    ("data=3", "data: expected a section"),
    ("fold", "overrides are key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_yaml_base_chain_and_unknown_key_in_file(tmp_path):
    (tmp_path / "base.yaml").write_text("experiment: base\nsynthetic:\n  n_patients: 11\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nexperiment: child\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.experiment, cfg.synthetic.n_patients) == ("child", 11)
    (tmp_path / "bad.yaml").write_text("synthetic:\n  n_patient: 11\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: synthetic.n_patient: unknown key"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(overrides=["fold=2", "synthetic.seed=5"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["synthetic"]["seed"] == 5
    assert load_config(path) == cfg


def test_mapping_keys_take_the_fields_key_type(tmp_path):
    # a dotted override arrives with the string key "2"; the blend looks weights up by the integer epoch
    cfg = load_config(overrides=["blend.epoch_weights.2=0.5", "blend.fold_weights.1=0"])
    assert cfg.blend.epoch_weights == {2: 0.5} and cfg.blend.fold_weights == {1: 0.0}
    (tmp_path / "w.yaml").write_text("blend:\n  epoch_weights: {2: 0.5}\n  fold_weights: {'1': 0}\n")
    assert load_config(tmp_path / "w.yaml").blend.epoch_weights == {2: 0.5}
    assert load_config(tmp_path / "w.yaml").blend.fold_weights == {1: 0.0}
    with pytest.raises(ConfigError, match=r"blend.epoch_weights: keys are integers, got 'last'"):
        load_config(overrides=["blend.epoch_weights.last=1"])


@pytest.mark.parametrize("override, message", [
    ("train.amp=fp8", "train.amp: one of auto, bf16, fp16, off, got 'fp8'"),
    ("train.loss=focal", "train.loss: one of weighted_bce, mse"),
    ("preprocess.mode=3d", "preprocess.mode: one of windows, 2.5d"),
    ("train.batch_size=0", "train.batch_size: must be at least 1, got 0"),
    ("train.epochs=-1", "train.epochs: must be at least 1, got -1"),
    ("train.loader_workers=-1", "train.loader_workers: must be at least 0"),
    ("preprocess.n_folds=1", "preprocess.n_folds: must be at least 2"),
    ("preprocess.size=0", "preprocess.size: must be at least 1"),
    ("preprocess.chunk_size=0", "preprocess.chunk_size: must be at least 1"),
    ("preprocess.png_level=12", r"preprocess.png_level: must be between 0 and 9"),
    ("blend.lstm_weight=1.5", "blend.lstm_weight: must be between 0.0 and 1.0"),
    ("blend.epoch_weights.1=-2", r"blend.epoch_weights.1: epochs, folds and weights are not negative"),
    ("data.workers=-1", "data.workers: must be at least 0"),
])
def test_values_no_stage_can_use_are_refused_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_every_shipped_config_loads_and_names_a_timm_model():
    import timm

    from ichpipe.networks.sequence_models import KINDS

    paths = experiment_configs()
    assert len(paths) >= 5
    for path in paths:
        cfg = load_config(path)
        assert timm.is_model(cfg.model.backbone), path
        assert cfg.lstm.kind in KINDS and 2 * cfg.lstm.hidden % cfg.lstm.heads == 0, path


def _stage(argv: list[str], capsys) -> tuple[int, str]:
    from ichpipe.base.cli import stage_main

    code = stage_main("", lambda cfg, args: 0, argv=argv)
    return code, capsys.readouterr().err


def test_a_config_that_says_two_things_or_cannot_be_read_is_one_line_naming_it(tmp_path, capsys):
    """Issue 31: each was accepted (a key set twice: the last value, silently) or a traceback."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 2.0e-3\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    base = tmp_path / "base.yaml"
    base.write_text("base: 5\n")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 10) + "]\n" for p, c in zip("abcdef", "bcdefg", strict=True))
        + "experiment: *g\n")
    for argv, line in (
            (["--config", str(twice)], f"error: {twice}, line 4: key 'lr' is set twice in one mapping; say each "
                                       "setting once"),
            (["--config", str(binary)], f"error: {binary}: not a text (UTF-8) file; a config is YAML text"),
            (["--config", str(base)], f"error: {base}: base: the name of a YAML file (relative to this one), got 5"),
            (["--config", str(bomb)], f"error: {bomb}: expands to more than 100,000 values or 10,000,000 characters "
                                      "(nested aliases?); not a config"),
            (["seed=99999999999999999999999"], "error: seed: must fit in 64 bits, got 99999999999999999999999"),
            (["seed=-1"], "error: seed: must be between 0 and 4294967295, got -1"),
            (["train=5", "train.lr=1"], "error: train: given both a value (5) and a setting inside it (train.lr); "
                                        "give one"),
            (["train.lr=1", "train=5"], "error: train: given both a value (5) and settings inside it; give one"),
            ([f"experiment={'x' * 101}"], "error: experiment: must be a plain folder name"),
    ):
        code, err = _stage(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith(line), (argv, err)
        assert len(err) < 300
    assert load_config(overrides=["seed=4294967295"]).seed == 2**32 - 1
