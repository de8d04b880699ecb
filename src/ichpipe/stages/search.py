"""Hyperparameter search with Optuna over a space declared in YAML (``scripts/12_search.py``, ``make search``).

A search space file (``configs/search/*.yaml``) goes on top of any experiment config::

    name: cpu_demo            # the study; trials are experiments <name>_t000, <name>_t001, ...
    trials: 8                 # finished (complete or pruned) trials the study should hold
    fold: 0                   # each trial trains this fold; its objective is the last epoch's val loss
    seed: 0                   # TPE's seed
    pruner: {kind: median, n_startup_trials: 2, n_warmup_steps: 1}   # or none, or threshold (upper)
    space:
      train.lr: {low: 5.0e-4, high: 1.0e-2, log: true}     # float (log or linear)
      lstm.layers: {low: 1, high: 3}                        # int (both bounds integers)
      train.mixup: {choices: [0.0, 0.2, 0.4]}               # categorical

Every key must be a config key (checked against the schema before the first trial). The sampler is
TPE; the pruner stops a trial after an epoch whose validation loss is worse than the median of the
earlier trials at that epoch. Each trial is an ordinary run folder ``runs/<name>_tNNN/fold<k>/`` with
its resolved ``config.yaml``. The study lives in ``runs/<name>/study.db`` (SQLite through Optuna's RDB
storage), so a killed search resumes where it stopped and several processes can share it;
``--storage postgresql://...`` puts it on a database server for a cluster. Running trials beat a
heartbeat; one whose process died (killed, out of memory, a lost node) is marked failed once its
heartbeat is ``GRACE_S`` old and queued again with the same values, instead of staying "running". The first
trial of a new study is the experiment's own settings, so the best is never worse than the starting point.

Writes ``runs/<name>/``: ``trials.csv`` and ``trials.md`` (every trial, its values, state and loss),
``best.yaml`` (the experiment config with the best values: ready for ``make train CONFIG=...``),
``optimization_history.png`` and ``param_importances.png`` (Optuna's standard plots).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ichpipe.base.config import ConfigError, check_name, get_value, load_config, nest
from ichpipe.base.errors import InputError, quote
from ichpipe.base.files import atomic_path, write_text_atomic
from ichpipe.base.paths import data_paths
from ichpipe.base.yaml_io import read_yaml_mapping

PRUNERS = ("median", "none", "threshold")
HEARTBEAT_S = 30  # a running trial records a heartbeat this often
GRACE_S = 120  # a trial silent this long is stale: failed, then retried once with the same values


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S):
    """Optuna's RDB storage at ``url`` with heartbeats: stale trials fail and are re-queued (once)."""
    import optuna

    with warnings.catch_warnings():  # heartbeats and the retry callback are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                                          heartbeat_stale_trial_callback=retry)


def read_space(path: str | Path) -> dict:
    """The search file, checked: one-line errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: search space file not found")
    spec = read_yaml_mapping(path)
    known = {"name", "trials", "fold", "seed", "pruner", "space"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if not spec.get("name") or not isinstance(spec.get("space"), dict) or not spec["space"]:
        raise InputError(f"{path}: needs a name and a non-empty space")
    try:
        check_name(spec["name"], "name")  # the study's folder under runs/ and its trials' experiment names
    except ConfigError as exc:
        raise InputError(f"{path}: {exc}") from None
    spec.setdefault("trials", 8)
    spec.setdefault("fold", 0)
    spec.setdefault("seed", 0)
    spec.setdefault("pruner", {"kind": "median"})
    for key in ("trials", "fold", "seed"):
        if isinstance(spec[key], bool) or not isinstance(spec[key], int) or not (
                (1 if key == "trials" else 0) <= spec[key] < 2**32):  # Optuna's sampler takes a 32-bit seed
            raise InputError(f"{path}: {key} must be a {'positive' if key == 'trials' else 'non-negative'} integer "
                             f"below 2**32, got {quote(spec[key])}")
    if not isinstance(spec["pruner"], dict) or spec["pruner"].get("kind", "median") not in PRUNERS:
        raise InputError(f"{path}: pruner must be a mapping whose kind is one of {', '.join(PRUNERS)}")
    try:
        _pruner(spec)
    except TypeError as exc:
        raise InputError(f"{path}: pruner: {exc}") from None
    for key, dist in spec["space"].items():
        if not isinstance(dist, dict) or not ({"low", "high"} <= set(dist) or "choices" in dist):
            raise InputError(f"{path}: space.{key}: give low/high (with log: true for a log scale) or choices")
        if "choices" not in dist and not dist["low"] < dist["high"]:
            raise InputError(f"{path}: space.{key}: low {dist['low']} must be below high {dist['high']}")
    return spec


def suggest(trial, key: str, dist: dict) -> Any:
    if "choices" in dist:
        return trial.suggest_categorical(key, dist["choices"])
    if isinstance(dist["low"], int) and isinstance(dist["high"], int):
        return trial.suggest_int(key, dist["low"], dist["high"], log=bool(dist.get("log", False)))
    return trial.suggest_float(key, float(dist["low"]), float(dist["high"]), log=bool(dist.get("log", False)))


def _pruner(spec: dict):
    import optuna

    p = dict(spec["pruner"])
    kind = p.pop("kind", "median")
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(**p)
    return optuna.pruners.MedianPruner(**p)


@dataclass(frozen=True)
class SearchResult:
    best: int  # the best trial's number
    best_value: float  # its fold's validation weighted log loss
    params: dict[str, object]  # its settings, by dotted key
    trials: int
    complete: int
    out: Path  # runs/<name>
    figures: list[str]
    table: str  # trials.md


def run_search(config_path: str | Path | None, space_path: str | Path, overrides: list[str],
               storage: str = "", progress: bool = True, *, train_fold: Callable) -> SearchResult:
    """Run (or resume) the search until the study holds ``trials`` finished trials; write its outputs.

    ``train_fold``: stage 2's ``train_fold(cfg, progress=, on_epoch=)``, which trains each trial (given by the
    caller: a stage never imports another)."""
    import optuna

    spec = read_space(space_path)
    base = load_config(config_path, overrides)
    start = {}
    for key in spec["space"]:  # every key is a config key: checked before any training
        try:
            start[key] = get_value(base, key)
            load_config(config_path, overrides, values={key: start[key]})
        except (AttributeError, ConfigError) as exc:
            raise InputError(f"{space_path}: space.{key}: not a config key ({exc})") from None
    out = data_paths(base).runs / spec["name"]
    out.mkdir(parents=True, exist_ok=True)
    storage = open_storage(storage or f"sqlite:///{out / 'study.db'}")
    optuna.logging.set_verbosity(logging.WARNING)
    study = optuna.create_study(study_name=spec["name"], storage=storage, load_if_exists=True, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=spec["seed"]), pruner=_pruner(spec))
    if not study.trials:
        fits = {k: v for k, v in start.items() if "choices" not in spec["space"][k] or v in spec["space"][k]["choices"]}
        study.enqueue_trial(fits)  # the experiment's own settings first
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial) -> float:
        values = {k: suggest(trial, k, d) for k, d in spec["space"].items()}
        name = f"{spec['name']}_t{trial.number:03d}"
        cfg = load_config(config_path, overrides, values={**values, "experiment": name, "fold": spec["fold"]})
        trial.set_user_attr("experiment", name)

        def report(epoch: int, metrics) -> None:  # stage 2's EpochMetrics
            trial.report(metrics.val_loss, epoch)
            if trial.should_prune():
                if progress:
                    print(f"trial {trial.number}: pruned after epoch {epoch + 1} (val {metrics.val_loss:.4f})",
                          flush=True)
                raise optuna.TrialPruned(f"epoch {epoch + 1}: val {metrics.val_loss:.4f}")

        result = train_fold(cfg, progress=False, on_epoch=report)
        if progress:
            print(f"trial {trial.number}: val {result.val_loss:.4f}  " +
                  "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
                  flush=True)
        return float(result.val_loss)

    done = sum(t.state in finished for t in study.trials)
    if done < spec["trials"]:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(spec["trials"], states=finished)],
                       catch=())
    return write_outputs(study, spec, config_path, overrides, out)


def write_outputs(study, spec: dict, config_path, overrides: list[str], out: Path) -> SearchResult:
    """trials.csv/md, best.yaml and Optuna's plots of a study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    frame.columns = [c.removeprefix("params_").removeprefix("user_attrs_") for c in frame.columns]
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds().round(1)
    with atomic_path(out / "trials.csv") as tmp:
        frame.to_csv(tmp, index=False)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise InputError(f"{out}: no trial of study {spec['name']} finished; see trials.csv")
    best = study.best_trial
    lines = [f"# Search {spec['name']}: {len(complete)} complete, "
             f"{sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)} pruned; "
             f"best trial {best.number} (val {best.value:.4f})", "",
             "| trial | state | val loss | " + " | ".join(spec["space"]) + " |",
             "|---|---|---|" + "---|" * len(spec["space"])]
    for t in study.trials:
        value = "" if t.value is None else f"{t.value:.4f}"
        cells = " | ".join(_fmt(t.params.get(k)) for k in spec["space"])
        lines.append(f"| {t.number} | {t.state.name.lower()} | {value} | {cells} |")
    write_text_atomic(out / "trials.md", "\n".join(lines) + "\n")

    load_config(config_path, overrides, values=best.params)  # the best values make a valid config
    nested = nest(best.params)
    header = (f"# Best of search {spec['name']} (trial {best.number}, fold {spec['fold']} val loss {best.value:.4f}).\n"
              f"# Train it: make train CONFIG={out / 'best.yaml'}\n")
    body = {"base": str(Path(config_path).resolve()) if config_path else None,
            "experiment": f"{spec['name']}_best", **nested}
    if body["base"] is None:
        body.pop("base")
    extra = [o for o in overrides if o.split("=", 1)[0] not in ("data.root", "data.workers", "data.work_dir")]
    if extra:
        header += f"# (searched with the overrides {' '.join(extra)}, which are not in this file)\n"
    write_text_atomic(out / "best.yaml", header + yaml.safe_dump(body, sort_keys=False))

    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    figures = {"optimization_history.png": plot_optimization_history}
    if len(complete) >= 2 and len(spec["space"]) >= 2:
        figures["param_importances.png"] = plot_param_importances
    written = []
    for name, plot in figures.items():
        try:
            with warnings.catch_warnings():  # matplotlib plots are "experimental" in Optuna since 2.2
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a parameter that never varied
            print(f"{name}: not drawn ({exc})")
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(name)
    return SearchResult(best.number, best.value, best.params, len(study.trials), len(complete), out, written,
                        "\n".join(lines))


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
