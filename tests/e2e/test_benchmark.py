"""`make benchmark`'s own logic: the spec, the noise, the verdicts and the targets (the runs are the stages')."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from ichpipe.base.errors import InputError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import benchmark  # noqa: E402


def test_the_shipped_specs_load_and_name_configs_that_load():
    from ichpipe.base.config import load_config

    specs = [p for p in sorted((REPO / "configs" / "benchmark").glob("*.yaml")) if "families:" in p.read_text()]
    assert [p.name for p in specs] == ["cpu.yaml", "gpu.yaml"]  # beside them, the families' own configs
    for path in specs:
        spec = benchmark.read_spec(path)
        assert spec.noise.family in spec.families and len(spec.noise.seeds) >= 2
        for family, config in spec.families.items():
            cfg = load_config(REPO / config, [*spec.overrides, *spec.family_overrides.get(family, [])])
            assert not cfg.model.pretrained and cfg.train.crop_border, (path, family)  # from scratch, head crop
        for overrides in [*spec.sequence.values(), *spec.options.values(), spec.ensemble.overrides,
                          spec.pseudo or []]:
            load_config(REPO / next(iter(spec.families.values())), overrides)
        combiners = ",".join(spec.ensemble.combiners)
        load_config(REPO / next(iter(spec.families.values())), [f"ensemble.combiners=[{combiners}]",
                                                                 "pseudo.source=x", "seeds=[0,1]"])


def test_a_bad_spec_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("name: x\nfamilies: {a: configs/benchmark/bench_resnet.yaml}\nnoise: {family: b, seeds: [0, 1]}\n")
    with pytest.raises(InputError, match=r"b.yaml: \['b'\] named but not among the families \['a'\]"):
        benchmark.read_spec(bad)
    bad.write_text("name: x\nfamilies: {a: c.yaml}\nnoise: {family: a, seeds: [0]}\nextra: 1\n")
    with pytest.raises(InputError, match=r"b.yaml: .*seeds.*at least 2.*extra.*not permitted"):
        benchmark.read_spec(bad)
    with pytest.raises(InputError, match="benchmark spec not found"):
        benchmark.read_spec(tmp_path / "none.yaml")


def test_rows_over_seeds_carry_their_mean_and_standard_deviation():
    rows = [{"row": "m: final blend", "oof": v, "test": 2 * v, "auc_any": 0.9} for v in (0.10, 0.12, 0.14)]
    out = benchmark.with_noise(rows)
    assert out["oof"] == pytest.approx(0.12) and out["oof_sd"] == pytest.approx(0.02)
    assert out["test_sd"] == pytest.approx(0.04) and out["auc_any_sd"] == 0.0 and out["seeds"] == 3


@pytest.mark.parametrize(("delta", "sd", "word"), [(-0.006, 0.002, "better"), (0.006, 0.002, "worse"),
                                                    (-0.005, 0.002, "within noise"), (0.001, math.nan, "within noise")])
def test_a_difference_of_two_runs_is_called_against_twice_its_noise(delta, sd, word):
    """Two single runs, each with the seed noise sd: their difference has sqrt(2) sd; 2 x sqrt(2) x 0.002 = 0.0057."""
    assert benchmark.verdict(delta, sd) == word


def test_the_targets_are_checked_with_their_figures():
    spec = benchmark.Spec(name="t", families={"a": "x.yaml", "b": "y.yaml"}, noise={"family": "a", "seeds": [0, 1]})
    aucs = {f"auc_{c}": 0.95 for c in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")}
    table = [{"row": "prior", "oof": 0.20, "group": "prior"},
             {"row": "a: CNN, bag of epochs", "oof": 0.12, "group": "family"},
             {"row": "a: + sequence model", "oof": 0.10, "group": "family"},
             {"row": "a: final blend", "oof": 0.10, "group": "family"},
             {"row": "b: CNN, bag of epochs", "oof": 0.15, "group": "family"},
             {"row": "b: + sequence model", "oof": 0.14, "group": "family"},
             {"row": "b: final blend", "oof": 0.14, "group": "family"},
             {"row": "a: bag of 3 seeds", "oof": 0.0960, "oof_sd": 0.001, "group": "bag", "bags": 20, "bag": 3},
             *[{"row": f"ensemble: {c}", "oof": v, "oof_sd": 0.002, "seeds": 6, "group": "ensemble",
                "best_member_oof": 0.1, **aucs}
               for c, v in (("mean", 0.097), ("weights", 0.095), ("context", 0.092), ("final", 0.092))],
             {"row": "a: pseudo-label round", "oof": 0.099, "group": "pseudo", "delta": -0.001, "delta_se": 0.002,
              "verdict": "within noise", "pairs": 6},
             {"row": "option x", "oof": 0.09, "group": "option", "delta": -0.01, "delta_mean": -0.012,
              "verdict": "better"}]
    checks = {what: (ok, figures) for what, ok, figures in benchmark.targets(table, spec, sd=0.001)}
    assert checks["a: final blend <= 0.60 x the prior OOF"] == (True, "0.1000 = 0.50 x 0.2000")
    assert checks["b: final blend <= 0.60 x the prior OOF"][0] is False  # 0.70 x
    assert checks["a: sequence model <= 0.90 x its CNN"][0] is True
    assert checks["b: sequence model <= 0.90 x its CNN"][0] is False
    ok, figures = checks["best ensemble <= 0.93 x its best member, by more than 2 x its noise"]
    assert ok is True and figures == ("ensemble: context 0.0920 = 0.920 x 0.1000 over 6 seeds; gain 0.0080 vs 2 sd "
                                      "0.0040")
    assert checks["the context stacker <= the mean out of fold"] == (True, "0.0920 vs 0.0970 (0.948 x)")
    assert checks["every subtype's OOF AUC >= 0.90 (the ensemble's final)"][0] is True
    assert checks["a: a bag of 3 seeds <= 0.97 x one seed"] == (True, "0.0960 ± 0.0010 (20 bags) = 0.960 x 0.1000")
    assert checks["a: pseudo-label round"] == (None, "within noise (mean paired difference -0.0010 ± 2 se 0.0040 "
                                                     "over 6 seeds)")
    assert checks["option x"] == (None, "better (-0.0100 vs the baseline's run with the same seed, -0.0120 vs its "
                                        "mean; 2 x sqrt(2) sd 0.0028)")
    for r in table:  # noisier: the gain of 0.008 no longer beyond twice the noise
        if r["group"] == "ensemble":
            r["oof_sd"] = 0.0045
    big_noise = {w: ok for w, ok, _ in benchmark.targets(table, spec, sd=0.001)}
    assert big_noise["best ensemble <= 0.93 x its best member, by more than 2 x its noise"] is False


def test_paired_differences_are_judged_on_their_standard_error():
    assert benchmark.paired([-0.004, -0.005, -0.003, -0.004])["verdict"] == "better"  # se 0.0004
    assert benchmark.paired([-0.004, 0.005, -0.003, 0.001])["verdict"] == "within noise"
    out = benchmark.paired([0.01, 0.012, 0.011])
    assert out["verdict"] == "worse" and out["pairs"] == 3 and out["delta"] == pytest.approx(0.011)


def test_a_resumed_benchmark_counts_the_time_of_every_invocation(tmp_path):
    spec = benchmark.read_spec(REPO / "configs" / "benchmark" / "cpu.yaml")
    first = benchmark.Bench(spec, tmp_path / "cpu", [])
    first.log("one")
    first.earlier = [600.0]  # as if an invocation of ten minutes had been killed before it
    first.log("two")
    again = benchmark.Bench(spec, tmp_path / "cpu", [])  # the next invocation reads what the others took
    assert again.earlier[0] == 600.0 and len(again.earlier) == 2 and 0 <= again.earlier[1] < 60
    assert len(again.seconds()) == 3 and sum(again.seconds()) >= 600


def test_the_written_table_carries_each_family_s_pointing_game(tmp_path):
    """benchmark.md and .json show where each family's baseline looks (its report's pointing game); one not
    measured (no masks) is left out, not printed empty."""
    import json

    import pandas as pd

    table = [{"row": "prior", "oof": 0.2, "test": 0.3, "group": "prior"},
             {"row": "a: final blend", "oof": 0.1, "test": 0.15, "group": "family", "auc_any": 0.9}]
    game = pd.DataFrame({"slices": [12], "peak_inside": [0.25], "mass_inside": [0.031], "blood_share": [0.004]},
                        index=pd.Index(["subdural"], name="subtype"))
    benchmark.write(tmp_path, table, [("x", True, "y")], ["# head"], {"a_s0": game, "b_s0": None})
    page = (tmp_path / "benchmark.md").read_text()
    assert "Where `a_s0` looks" in page and "| subdural | 12 | 25% | 3.1% | 0.4% |" in page and "b_s0" not in page
    saved = json.loads((tmp_path / "benchmark.json").read_text())["pointing_game"]
    assert list(saved) == ["a_s0"] and saved["a_s0"][0]["subtype"] == "subdural" and saved["a_s0"][0]["slices"] == 12


def test_seeds_on_the_command_line_replace_the_spec_s_and_bad_ones_are_one_line(tmp_path, capsys, monkeypatch):
    """`make benchmark SEEDS="0 1 2 3 4"`: the noise over those seeds; fewer than two, or not numbers: one line,
    before anything is made."""
    ran = {}
    monkeypatch.setattr(benchmark, "benchmark",
                        lambda bench, options, path: ran.setdefault("seeds", bench.spec.noise.seeds) and 0)
    spec = str(REPO / "configs/benchmark/cpu.yaml")
    assert benchmark.main(["--spec", spec, "--root", str(tmp_path), "--seeds", "0 1 2 3 4"]) == 0
    assert ran["seeds"] == [0, 1, 2, 3, 4]
    for bad in ("3", "0 x"):
        assert benchmark.main(["--spec", str(REPO / "configs/benchmark/cpu.yaml"), "--root", str(tmp_path / "b"),
                               "--seeds", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: SEEDS={bad!r}: two or more whole numbers") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
