"""`make search`: Optuna over a YAML space, trials as ordinary runs, a study that resumes, pruning."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from ichpipe.base.config import load_config
from ichpipe.base.errors import InputError
from ichpipe.stages.search import run_search
from ichpipe.stages.train import train_fold
from tests.conftest import TINY_OVERRIDES, TINY_TRAIN


def _space(tmp_path, name, **extra):
    spec = {"name": name, "trials": 3, "fold": 0, "seed": 1, "pruner": {"kind": "none"},
            "space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model.drop_rate": {"choices": [0.0, 0.3]}},
            **extra}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _overrides(root, *extra):
    return [*TINY_OVERRIDES, f"data.root={root}", "data.workers=2", *TINY_TRAIN, "train.epochs=1", *extra]


def test_search_runs_trials_as_runs_resumes_and_writes_the_best_config(processed, tmp_path):
    root, _, _ = processed
    ov = _overrides(root)
    result = run_search(None, _space(tmp_path, "search_a"), ov, progress=False, train_fold=train_fold)
    runs = root / "runs"
    out = runs / "search_a"
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and (trials.state == "COMPLETE").all()
    base = load_config(None, ov)
    assert trials["train.lr"].iloc[0] == pytest.approx(base.train.lr)  # trial 0: the experiment's own settings
    for _, t in trials.iterrows():  # every trial an ordinary run folder with its resolved config
        saved = yaml.safe_load((runs / t.experiment / "fold0" / "config.yaml").read_text())
        assert saved["train"]["lr"] == pytest.approx(t["train.lr"])
        assert saved["model"]["drop_rate"] == t["model.drop_rate"]
        history = pd.read_csv(runs / t.experiment / "fold0" / "history.csv")
        assert t.value == pytest.approx(history.val_loss.iloc[-1])
    assert result.best_value == pytest.approx(trials.value.min())
    best = load_config(out / "best.yaml", [f"data.root={root}"])
    assert best.train.lr == pytest.approx(result.params["train.lr"]) and best.experiment == "search_a_best"
    assert (out / "optimization_history.png").stat().st_size > 5000
    assert (out / "param_importances.png").stat().st_size > 5000
    # A second call with more trials continues the same study: only the missing trial runs.
    run_search(None, _space(tmp_path, "search_a", trials=4), ov, progress=False, train_fold=train_fold)
    again = pd.read_csv(out / "trials.csv")
    assert len(again) == 4 and again.iloc[:3][["number", "value"]].equals(trials[["number", "value"]])


def test_pruned_trials_stop_early_and_bad_spaces_are_refused(processed, tmp_path):
    root, _, _ = processed
    ov = _overrides(root, "train.epochs=2")
    # A threshold no validation loss stays under: every trial is stopped after its first epoch.
    space = _space(tmp_path, "search_b", trials=2, pruner={"kind": "threshold", "upper": 1e-6})
    with pytest.raises(InputError, match="no trial of study search_b finished"):
        run_search(None, space, ov, progress=False, train_fold=train_fold)
    trials = pd.read_csv(root / "runs" / "search_b" / "trials.csv")
    assert list(trials.state) == ["PRUNED", "PRUNED"]
    for name in trials.experiment:
        assert len(pd.read_csv(root / "runs" / name / "fold0" / "history.csv")) == 1  # 1 of 2 epochs
    bad = _space(tmp_path, "search_c", space={"train.lrr": {"low": 1e-4, "high": 1e-2}})
    with pytest.raises(InputError, match=r"space.train.lrr: not a config key"):
        run_search(None, bad, ov, progress=False, train_fold=train_fold)
    with pytest.raises(InputError, match=r"space.yaml: pruner: .*unexpected keyword argument 'n_startup'"):
        run_search(None, _space(tmp_path, "search_c", pruner={"kind": "median", "n_startup": 2}), ov, progress=False,
                   train_fold=train_fold)
    with pytest.raises(InputError, match=r"space.yaml: trials must be a positive integer below 2\*\*32, got 0"):
        run_search(None, _space(tmp_path, "search_c", trials=0), ov, progress=False, train_fold=train_fold)
    with pytest.raises(InputError, match=r"space.train.lr: low 0.1 must be below high 0.01"):
        run_search(None, _space(tmp_path, "search_c", space={"train.lr": {"low": 0.1, "high": 0.01}}), ov,
                   progress=False, train_fold=train_fold)


_DYING_WORKER = """
import os, sys, time
import optuna
from ichpipe.stages.search import open_storage

study = optuna.create_study(study_name="s", storage=open_storage(sys.argv[1], heartbeat_s=1, grace_s=2))

def objective(trial):
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    time.sleep(1.5)  # a heartbeat is recorded
    os._exit(3)  # then the process dies mid-trial, as a killed search does

study.optimize(objective, n_trials=1)
"""


def test_a_trial_whose_process_died_is_failed_and_queued_again(tmp_path):
    """A killed search used to leave its trial "running" for ever; now its heartbeat goes stale, the trial
    is failed and queued again with the same values."""
    import subprocess
    import sys
    import time

    import optuna

    from ichpipe.stages.search import open_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    died = subprocess.run([sys.executable, "-c", _DYING_WORKER, url], capture_output=True, text=True, timeout=120)
    assert died.returncode == 3, died.stderr
    time.sleep(2.5)  # past the grace period
    study = optuna.load_study(study_name="s", storage=open_storage(url, heartbeat_s=1, grace_s=2))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING]
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        optuna.storages.fail_stale_trials(study)  # what every optimize() does before its next trial
    first, retry = study.trials
    assert first.state == optuna.trial.TrialState.FAIL and set(first.params) == {"lr"}
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == first.params
