#!/usr/bin/env python
"""`make benchmark`: one table that can tell a better recipe from a worse one, with its noise.

    python benchmarks/benchmark.py [--spec configs/benchmark/cpu.yaml] [--root data/benchmark]
                                   [--options "mixup no_crop"] [--seeds "0 1 2 3 4 5"]

On a synthetic set of its own (``synthetic`` in the spec: 150 patients on the CPU), every experiment of the
spec runs through the pipeline's own stages (2 train, 3 embed, 4 sequence model, 5 blend, the ensemble):

- each family with each model seed of ``noise.seeds`` (the fold assignment stays): its rows are the mean over the
  seeds, ± their standard deviation;
- the sequence-model variants on the first family's first-seed CNN (its checkpoints and embeddings are shared;
  only stage 4 and 5 run again);
- a bag of ``bag`` seeds of the first family (``seeds: [...]``, its seeds' runs shared): the bag of the first seeds
  as the pipeline blends it, and the mean ± sd over every bag of that many of the seeds (overlapping bags);
- the families' ensemble of seed i of each, for every seed i (``ensemble.combiners``): each combiner's row the mean
  ± sd over the seeds, beside the best member of each seed;
- a pseudo-label round of the first family for every seed i, labelled fold by fold by ensemble i's final (its
  difference to the same seed's run without them, paired);
- with ``--options``: one run of the first family per option (first seed), against its baseline's run with the
  same seed: a difference within twice its noise (sqrt(2) x the seed sd: two single runs) is "within noise";
- each family's first-seed report (``make report``), whose Grad-CAM pointing game goes into the table's page.

Rows: OOF and synthetic-test weighted log loss and the per-class OOF AUC. Written by this script as
``<root>/<spec>/benchmark.md``, ``benchmark.json`` and ``benchmark.png`` (the rows with their error bars),
with the targets checked at the end, on every seed and again on all but the last two (a verdict that moves when
two seeds are added rests on too few). Resumable: every stage keeps what it finished, so a killed benchmark
continues where it stopped when run again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

REPO = Path(__file__).resolve().parents[1]

from ichpipe.base.config import Config, load_config  # noqa: E402
from ichpipe.base.errors import InputError, first_line  # noqa: E402
from ichpipe.base.files import atomic_path, write_text_atomic  # noqa: E402
from ichpipe.base.labels import ABBREVIATIONS, LABELS, SUBTYPES  # noqa: E402
from ichpipe.base.paths import read_metadata, run_dir  # noqa: E402
from ichpipe.scoring.localisation import pointing_lines  # noqa: E402
from ichpipe.scoring.metrics import auc_or_nan  # noqa: E402
from ichpipe.scoring.results import Scores  # noqa: E402


class Noise(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: str
    seeds: list[int] = Field(min_length=2)


class EnsembleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    combiners: list[str] = ["mean", "weights", "stacker", "context", "sequence"]
    overrides: list[str] = []  # ensemble.* settings of every seed's ensemble


class Spec(BaseModel):
    """configs/benchmark/<name>.yaml."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    synthetic: dict[str, int | float] = {}
    families: dict[str, str] = Field(min_length=1)
    overrides: list[str] = []
    family_overrides: dict[str, list[str]] = {}
    noise: Noise  # every family runs every seed; ``family``: the one the variants, the bag and the options use
    sequence: dict[str, list[str]] = {}
    ensemble: EnsembleSpec = EnsembleSpec()
    bag: int = Field(default=3, ge=0)  # seeds per bag of the first family; 0: no bag rows
    pseudo: list[str] | None = None  # the pseudo-label round's overrides (pseudo.*); absent: no round
    options: dict[str, list[str]] = {}


def read_spec(path: Path) -> Spec:
    try:
        spec = Spec.model_validate(yaml.safe_load(path.read_text()) or {})
    except FileNotFoundError:
        raise InputError(f"{path}: benchmark spec not found") from None
    except Exception as exc:  # noqa: BLE001 - pydantic's and YAML's errors: one line naming the file
        raise InputError(f"{path}: {' '.join(str(exc).split())[:300]}") from None
    unknown = {spec.noise.family, *spec.family_overrides} - set(spec.families)
    if unknown:
        raise InputError(f"{path}: {sorted(unknown)} named but not among the families {sorted(spec.families)}")
    return spec


class Bench:
    """One benchmark: its data root, its experiments' configs and the stages that run them."""

    def __init__(self, spec: Spec, root: Path, extra: list[str]):
        self.spec, self.root, self.extra = spec, root, extra
        self.started = time.perf_counter()
        # the time of every invocation on this root (a killed one included), so that a resumed benchmark reports
        # what the whole table cost
        self.timing = root / "timing.json"
        self.earlier = json.loads(self.timing.read_text())["invocations_s"] if self.timing.exists() else []

    def seconds(self) -> list[float]:
        """Seconds of each invocation on this root, this one last (so far)."""
        return [*self.earlier, time.perf_counter() - self.started]

    def log(self, text: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.timing, json.dumps({"invocations_s": [round(s, 1) for s in self.seconds()]}) + "\n")
        print(f"[{(time.perf_counter() - self.started) / 60:5.1f} min] {text}", flush=True)

    def config(self, family: str, experiment: str, overrides: list[str] = ()) -> Config:
        return load_config(REPO / self.spec.families[family], [
            f"data.root={self.root}", f"experiment={experiment}", f"blend.out_dir={self.root / 'submissions'}",
            *self.spec.overrides, *self.spec.family_overrides.get(family, []), *overrides, *self.extra])

    def data(self) -> None:
        """The benchmark's own synthetic set (written once; a set of other settings there is refused: the runs
        beside it were made on it) and stage 1."""
        from ichpipe.base.config import save_config
        from ichpipe.base.paths import DataPaths
        from ichpipe.stages.preprocess import run_preprocess
        from ichpipe.synthetic.dataset import existing_set, generate_dataset

        cfg = self.config(next(iter(self.spec.families)), "data",
                          [f"synthetic.{k}={v}" for k, v in self.spec.synthetic.items()])
        why = existing_set(self.root, cfg.synthetic)
        if why and "other synthetic settings" in why:
            raise InputError(f"{self.root}: {why} than {self.spec.name}'s (its runs were made on that set); delete "
                             f"{self.root} or give another --root")
        if why:
            self.log(f"synthetic set: {cfg.synthetic.n_patients} patients (seed {cfg.synthetic.seed}) -> {self.root}")
            generate_dataset(cfg.synthetic, self.root, workers=cfg.data.workers, progress=True)
            save_config(cfg, DataPaths(self.root).synthetic_config)
        self.log("preprocess")
        run_preprocess(cfg, progress=True)

    def run(self, cfg: Config, shared_cnn: str | None = None) -> Scores:
        """Stages 2-5 of one experiment (2-3 from ``shared_cnn``'s folders when given); returns its CV scores."""
        from ichpipe.base.cli import table_folds
        from ichpipe.stages.blend import run_blend
        from ichpipe.stages.embed import embed_fold
        from ichpipe.stages.sequence import train_sequence_fold
        from ichpipe.stages.train import train_fold

        for k in table_folds(cfg):
            cfg_k = copy.deepcopy(cfg)
            cfg_k.fold, cfg_k.resume = k, True
            if shared_cnn:
                _share_cnn(run_dir(cfg_k).parent.parent / shared_cnn / f"fold{k}", run_dir(cfg_k))
            else:
                m = train_fold(cfg_k, progress=False)
                val = m.val_loss if m.last else pd.read_csv(run_dir(cfg_k) / "history.csv").val_loss.iloc[-1]
                self.log(f"{cfg.experiment} fold {k}: CNN validation {val:.4f} (prior {m.prior_loss:.4f})")
                embed_fold(cfg_k, progress=False)
            results = train_sequence_fold(cfg_k, progress=False)
            last = results[sorted(results)[-1]]
            self.log(f"{cfg.experiment} fold {k}: sequence model {last.cnn:.4f} -> {last.lstm:.4f}")
        with contextlib.redirect_stdout(io.StringIO()):
            return run_blend(cfg).scores

    def report(self, cfg: Config) -> pd.DataFrame | None:
        """``make report`` of one experiment (under its runs/<experiment>/report/); returns its pointing game."""
        from ichpipe.stages.report import run_report

        with contextlib.redirect_stdout(io.StringIO()):
            return run_report(cfg).pointing_game

    def ensemble(self, members: list[str], name: str):  # -> ichpipe.stages.ensemble.EnsembleResult
        from ichpipe.stages.ensemble import run_ensemble

        e = self.spec.ensemble
        cfg = self.config(next(iter(self.spec.families)), name, [
            f"ensemble.name={name}", f"ensemble.members=[{','.join(members)}]",
            f"ensemble.combiners=[{','.join(e.combiners)}]", *e.overrides])
        with contextlib.redirect_stdout(io.StringIO()):
            return run_ensemble(cfg, progress=False)

    def bag(self, family: str, seeds: list[int]) -> Scores:
        """Stage 5 of a bag of seeds of ``family`` (``seeds: [...]``) over the seeds' own runs (linked, not
        retrained)."""
        from ichpipe.stages.blend import run_blend

        name = f"{family}_bag{len(seeds)}"
        for seed in seeds:
            link = self.root / "runs" / name / f"seed{seed}"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to((self.root / "runs" / f"{family}_s{seed}").resolve())
        cfg = self.config(family, name, [f"seeds=[{','.join(map(str, seeds))}]"])
        with contextlib.redirect_stdout(io.StringIO()):
            return run_blend(cfg).scores


def _share_cnn(source: Path, target: Path) -> None:
    """``target`` (a fold folder) sees ``source``'s CNN checkpoints, embeddings and records, not its sequence models."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        link = target / item.name
        if item.name != "lstm" and not link.exists():
            link.symlink_to(item.resolve())


def aucs(root: Path, experiment: str, model: str) -> dict[str, float]:
    """OOF AUC per class of one model of an experiment (its stage-5 or ensemble predictions)."""
    meta = read_metadata(root).set_index("image_id")
    oof = pd.read_parquet(root / "runs" / experiment / "blend" / "oof_predictions.parquet")
    oof = oof[oof.model == model].set_index("image_id")
    y = meta.loc[oof.index, list(LABELS)].to_numpy()
    return {c: auc_or_nan(y[:, i], oof[c].to_numpy()) for i, c in enumerate(LABELS)}


def row(name: str, cv: Scores, model: str, root: Path, experiment: str, group: str) -> dict:
    test = cv.get("test", {}).get(model)
    out = {"row": name, "group": group, "experiment": experiment, "model": model,
           "oof": cv["oof"][model].weighted, "test": test.weighted if test else math.nan}
    out.update({f"oof_{c}": cv["oof"][model].per_class[c] for c in LABELS})
    out.update({f"auc_{c}": v for c, v in aucs(root, experiment, model).items()})
    return out


def with_noise(rows_by_seed: list[dict]) -> dict:
    """The first seed's row with the mean and standard deviation over the seeds of its numbers."""
    first = dict(rows_by_seed[0])
    for key in [k for k, v in first.items() if isinstance(v, float)]:
        values = np.array([r[key] for r in rows_by_seed], dtype=float)
        first[key] = float(np.mean(values))
        first[f"{key}_sd"] = float(np.std(values, ddof=1))
    first["seeds"] = len(rows_by_seed)
    return first


def verdict(delta: float, sd: float) -> str:
    """A difference of two single runs (lower is better) against twice its noise: each run has the seed noise
    ``sd``, so their difference sqrt(2) x sd (less, if a seed's luck carries over from one setting to the other)."""
    if math.isnan(sd) or abs(delta) <= 2 * math.sqrt(2) * sd:
        return "within noise"
    return "better" if delta < 0 else "worse"


def paired(deltas: list[float]) -> dict:
    """Differences of paired runs (the same seed with and without a change): their mean, its standard error and the
    verdict against twice that (a mean over n seeds)."""
    d = np.asarray(deltas, float)
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    mean = float(d.mean())
    word = "within noise" if math.isnan(se) or abs(mean) <= 2 * se else ("better" if mean < 0 else "worse")
    return {"delta": mean, "delta_se": se, "verdict": word, "pairs": len(d)}


ENSEMBLE_TARGET = 0.93  # the best ensemble's OOF over its best member's, at most
BAG_TARGET = 0.97  # the bag of seeds' OOF over one seed's, at most


def targets(table: list[dict], spec: Spec, sd: float) -> list[tuple[str, bool | None, str]]:
    """The benchmark's targets: (what, met or not (None: a verdict, not a target), the figures). ``sd``: the seed sd
    of the first family's final blend (the options' noise)."""
    by = {r["row"]: r for r in table}
    out = []
    prior = by["prior"]["oof"]
    for family in spec.families:
        blend = by[f"{family}: final blend"]["oof"]
        out.append((f"{family}: final blend <= 0.60 x the prior OOF", blend <= 0.60 * prior,
                    f"{blend:.4f} = {blend / prior:.2f} x {prior:.4f}"))
        cnn, seq = by[f"{family}: CNN, bag of epochs"]["oof"], by[f"{family}: + sequence model"]["oof"]
        out.append((f"{family}: sequence model <= 0.90 x its CNN", seq <= 0.90 * cnn,
                    f"{seq:.4f} = {seq / cnn:.2f} x {cnn:.4f}"))
    out += _ensemble_targets(by, table)
    first = spec.noise.family
    bag = next((r for r in table if r["group"] == "bag" and "oof_sd" in r), None)
    if bag:
        one = by[f"{first}: final blend"]["oof"]
        out.append((f"{first}: a bag of {bag['bag']} seeds <= {BAG_TARGET} x one seed", bag["oof"] <= BAG_TARGET * one,
                    f"{bag['oof']:.4f} ± {bag['oof_sd']:.4f} ({bag['bags']} bags) = {bag['oof'] / one:.3f} x "
                    f"{one:.4f}"))
    for r in table:
        if r["group"] == "pseudo":
            out.append((r["row"], None, f"{r['verdict']} (mean paired difference {r['delta']:+.4f} ± 2 se "
                                        f"{2 * r['delta_se']:.4f} over {r['pairs']} seeds)"))
        if r["group"] == "option":
            out.append((r["row"], None, f"{r['verdict']} ({r['delta']:+.4f} vs the baseline's run with the same seed, "
                        f"{r.get('delta_mean', math.nan):+.4f} vs its mean; 2 x sqrt(2) sd "
                        f"{2 * math.sqrt(2) * sd:.4f})"))
    return out


def _ensemble_targets(by: dict, table: list[dict]) -> list[tuple[str, bool | None, str]]:
    final = by.get("ensemble: final")
    if not final:
        return []
    low = {c: final[f"auc_{c}"] for c in SUBTYPES}
    out = [("every subtype's OOF AUC >= 0.90 (the ensemble's final)", all(v >= 0.90 for v in low.values()),
            ", ".join(f"{ABBREVIATIONS[c]} {v:.3f}" for c, v in low.items()))]
    combiners = [r for r in table if r["group"] == "ensemble" and r["row"] != "ensemble: final"]
    best = min(combiners, key=lambda r: r["oof"])
    member, noise = best["best_member_oof"], best.get("oof_sd", math.nan)
    gain = member - best["oof"]
    seeds = f" over {best['seeds']} seeds" if "seeds" in best else ""
    out.append((f"best ensemble <= {ENSEMBLE_TARGET} x its best member, by more than 2 x its noise",
                best["oof"] <= ENSEMBLE_TARGET * member and gain > 2 * noise,
                f"{best['row']} {best['oof']:.4f} = {best['oof'] / member:.3f} x {member:.4f}{seeds}; gain "
                f"{gain:.4f} vs 2 sd {2 * noise:.4f}"))
    if "ensemble: context" in by and "ensemble: mean" in by:
        ctx, mean = by["ensemble: context"]["oof"], by["ensemble: mean"]["oof"]
        out.append(("the context stacker <= the mean out of fold", ctx <= mean,
                    f"{ctx:.4f} vs {mean:.4f} ({ctx / mean:.3f} x)"))
    return out


def bag_rows(root: Path, runs: list[str], size: int) -> tuple[list[dict], int]:
    """Every bag of ``size`` of the seed runs ``runs`` (their final blends averaged, as stage 5 averages a bag):
    one row per bag (OOF, test and per-class OOF AUC) and how many bags."""
    from ichpipe.scoring.results import score

    meta = read_metadata(root).set_index("image_id")
    tables = {}
    for run in runs:
        for where in ("oof", "test"):
            t = pd.read_parquet(root / "runs" / run / "blend" / f"{where}_predictions.parquet")
            tables[run, where] = t[t.model == "blend"].set_index("image_id")[list(LABELS)].sort_index()
    truth_test = None
    if (root / "synthetic_test_labels.csv").exists():
        from ichpipe.base.label_csv import long_to_wide, read_long_csv

        truth_test = long_to_wide(read_long_csv(root / "synthetic_test_labels.csv"), root / "synthetic_test_labels.csv")
    rows = []
    for bag in itertools.combinations(runs, size):
        oof = sum(tables[r, "oof"] for r in bag) / size
        test = sum(tables[r, "test"] for r in bag) / size
        y = meta.loc[oof.index, list(LABELS)]
        row = {"oof": score({"b": oof}, y)["b"].weighted,
               "test": score({"b": test}, truth_test, complete=False)["b"].weighted if truth_test is not None else
               math.nan}
        row.update({f"auc_{c}": auc_or_nan(y[c].to_numpy(), oof[c].to_numpy()) for c in LABELS})
        rows.append(row)
    return rows, len(rows)


def write(out: Path, table: list[dict], checks, header: list[str], looks: dict | None = None) -> None:
    """benchmark.md, benchmark.json and benchmark.png; ``looks``: experiment → its report's pointing game (None: not
    measured)."""
    cols = ["oof", "test", *[f"auc_{c}" for c in LABELS]]
    lines = [*header, "", "| row | OOF | test | " + " | ".join(f"AUC {ABBREVIATIONS[c]}" for c in LABELS) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for r in table:
        cells = []
        for c in cols:
            v, sd = r.get(c, math.nan), r.get(f"{c}_sd")
            cells.append("–" if isinstance(v, float) and math.isnan(v) else f"{v:.4f} ± {sd:.4f}" if sd is not None
                         and c in ("oof", "test") else f"{v:.3f}" if c.startswith("auc") else f"{v:.4f}")
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:", ""]
    lines += [f"- {'met' if ok else 'MISSED' if ok is False else '·'}: {what}: {figures}" for what, ok,
              figures in checks]
    looks = {name: game for name, game in (looks or {}).items() if game is not None}
    for name, game in looks.items():
        lines += ["", f"Where `{name}` looks: the Grad-CAM pointing game of its report (runs/{name}/report/; the OOF "
                  "slices flagged correctly at 95% recall, each with its own fold's CNNs):", "", *pointing_lines(game)]
    write_text_atomic(out / "benchmark.md", "\n".join(lines) + "\n")
    write_text_atomic(out / "benchmark.json", json.dumps(
        {"header": header, "rows": table, "targets": checks,
         "pointing_game": {name: game.reset_index().to_dict("records") for name, game in looks.items()}},
        indent=1, default=float) + "\n")
    plot(out / "benchmark.png", table)


def plot(path: Path, table: list[dict]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no backend chosen, no figure left open

    rows = [r for r in table if r["row"] != "prior"]
    fig = Figure(figsize=(9, 0.32 * len(rows) + 1.5))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    colours = {"family": "tab:blue", "noise": "tab:blue", "sequence": "tab:green", "bag": "tab:cyan",
               "ensemble": "tab:purple", "pseudo": "tab:red", "option": "tab:orange"}
    ax.barh(y, [r["oof"] for r in rows], color=[colours.get(r["group"], "grey") for r in rows])
    with_sd = [i for i, r in enumerate(rows) if "oof_sd" in r]
    ax.errorbar([rows[i]["oof"] for i in with_sd], y[with_sd], xerr=[rows[i]["oof_sd"] for i in with_sd], fmt="none",
                ecolor="black", capsize=3)
    noisy = [r for r in rows if "oof_sd" in r and r["row"].endswith("final blend")]
    if noisy:  # the seed noise drawn across every row: twice the sd either side of the first family's final blend
        first = next(r for r in rows if r["row"].endswith("final blend"))
        sd = noisy[0]["oof_sd"]
        ax.axvspan(first["oof"] - 2 * sd, first["oof"] + 2 * sd, color="grey", alpha=0.2,
                   label=f"{first['row']} ± 2 sd of the seed noise")
    prior = next(r["oof"] for r in table if r["row"] == "prior")
    ax.set_xlim(0.8 * min(r["oof"] for r in rows), max(r["oof"] for r in rows) * 1.05)
    ax.set_title(f"prior (not drawn): {prior:.4f}", fontsize=9)
    ax.set_yticks(y, [r["row"] for r in rows], fontsize=8)
    ax.set_xlabel("OOF weighted log loss (lower is better); error bars: sd over model seeds")
    if noisy:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="auto", help="configs/benchmark/<name>.yaml; auto: gpu.yaml with a GPU, else "
                                                       "cpu.yaml")
    parser.add_argument("--root", default=str(REPO / "data" / "benchmark"), help="where its data and runs go")
    parser.add_argument("--options", default="", help="space-separated option names of the spec")
    parser.add_argument("--seeds", default="", help="space-separated model seeds of the noise family, instead of "
                        "the spec's noise.seeds (the first is the seed of every other run)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every experiment (quick checks)")
    args = parser.parse_args(argv)
    try:
        import torch

        spec_path = Path(args.spec) if args.spec != "auto" else \
            REPO / "configs" / "benchmark" / ("gpu.yaml" if torch.cuda.is_available() else "cpu.yaml")
        spec = read_spec(spec_path)
        if args.seeds:
            try:
                spec.noise = Noise(family=spec.noise.family, seeds=[int(s) for s in args.seeds.split()])
            except (ValueError, ValidationError) as exc:
                raise InputError(f"SEEDS={args.seeds!r}: two or more whole numbers are needed "
                                 f"({first_line(exc)})") from None
        options = args.options.split()
        unknown = [o for o in options if o not in spec.options]
        if unknown:
            raise InputError(f"OPTIONS: {unknown} not in {spec_path}'s options {sorted(spec.options)}")
        bench = Bench(spec, Path(args.root) / spec.name, args.overrides)
        return benchmark(bench, options, spec_path)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


FAMILY_ROWS = (("CNN, last epoch", "cnn_single"), ("CNN, bag of epochs", "cnn_bagged"), ("+ sequence model", "lstm"),
               ("final blend", "blend"))


class Runs:
    """What the benchmark ran, per seed: the rows it makes into the table for any subset of the seeds (the targets
    are judged on all of them and on all but the last two)."""

    def __init__(self, bench: Bench):
        self.bench, self.spec, self.root = bench, bench.spec, bench.root
        self.per_seed: dict[str, dict[int, dict]] = {}  # row name -> seed -> row
        self.single: list[dict] = []  # rows of one run (sequence variants, options, the pipeline's own bag)
        self.cvs: dict[str, Scores] = {}

    def add(self, seed: int, r: dict) -> None:
        self.per_seed.setdefault(r["row"], {})[seed] = r

    def families(self) -> None:
        for family in self.spec.families:
            for seed in self.spec.noise.seeds:
                name = f"{family}_s{seed}"
                self.cvs[name] = self.bench.run(self.bench.config(family, name, [f"seed={seed}"]))
                for label, model in FAMILY_ROWS:
                    self.add(seed, row(f"{family}: {label}", self.cvs[name], model, self.root, name, "family"))
                if family == next(iter(self.spec.families)):
                    self.add(seed, row("prior", self.cvs[name], "prior", self.root, name, "prior"))

    def sequence_variants(self) -> None:
        first, seed = self.spec.noise.family, self.spec.noise.seeds[0]
        for variant, overrides in self.spec.sequence.items():
            name = f"{first}_s{seed}_{variant}"
            cv = self.bench.run(self.bench.config(first, name, [f"seed={seed}", *overrides]),
                                shared_cnn=f"{first}_s{seed}")
            self.single.append(row(f"{first}: sequence model {variant} ({' '.join(overrides)})", cv, "lstm", self.root,
                                   name, "sequence"))

    def ensembles(self) -> None:
        if len(self.spec.families) < 2:
            return
        for seed in self.spec.noise.seeds:
            members = [f"{f}_s{seed}" for f in self.spec.families]
            ens = self.bench.ensemble(members, f"ensemble_s{seed}")
            self.bench.log(f"ensemble of {' + '.join(members)}: final = {ens.final} "
                           f"({ens.scores['oof']['final'].weighted:.4f} OOF)")
            best = min(ens.scores["oof"][m].weighted for m in members)
            for model in (*self.spec.ensemble.combiners, "final"):
                self.add(seed, {**row(f"ensemble: {model}", ens.scores, model, self.root, f"ensemble_s{seed}",
                                      "ensemble"), "chosen": ens.final, "best_member_oof": best})

    def bags(self) -> None:
        first, seeds, size = self.spec.noise.family, self.spec.noise.seeds, self.spec.bag
        if not size or size > len(seeds):
            return
        cv = self.bench.bag(first, seeds[:size])  # the pipeline's own bag of the first seeds
        name = f"{first}_bag{size}"
        self.single.append({**row(f"{first}: bag of seeds {' '.join(map(str, seeds[:size]))} (stage 5 of seeds=[...])",
                                  cv, "blend", self.root, name, "bag"), "bag": size})
        self.bag_size = size

    def pseudo_rounds(self) -> None:
        if self.spec.pseudo is None or len(self.spec.families) < 2:
            return
        first = self.spec.noise.family
        for seed in self.spec.noise.seeds:
            name = f"{first}_s{seed}_pseudo"
            cfg = self.bench.config(first, name, [f"seed={seed}", f"pseudo.source=ensemble_s{seed}",
                                                  "pseudo.model=final", *self.spec.pseudo])
            cv = self.bench.run(cfg)
            self.add(seed, {**row(f"{first}: pseudo-label round ({' '.join(self.spec.pseudo)}, labels of ensemble "
                                  f"i's final)", cv, "blend", self.root, name, "pseudo"),
                            "baseline": self.cvs[f"{first}_s{seed}"]["oof"]["blend"].weighted})

    def table(self, seeds: list[int]) -> list[dict]:
        """The rows over ``seeds``: mean ± sd where a row was run per seed."""
        out = []
        for by_seed in self.per_seed.values():
            rows = [by_seed[s] for s in seeds if s in by_seed]
            if not rows:
                continue
            r = with_noise(rows) if len(rows) > 1 else dict(rows[0])
            if r["group"] == "pseudo":
                r.update(paired([x["oof"] - x["baseline"] for x in rows]))
            out.append(r)
        out += [r for r in self.single if r["group"] in ("sequence", "bag")]
        size = getattr(self, "bag_size", 0)
        if size and len(seeds) >= size:
            first = self.spec.noise.family
            combos, n = bag_rows(self.root, [f"{first}_s{s}" for s in seeds], size)
            r = with_noise([{"row": "", "group": "bag", **c} for c in combos])
            r.update(row=f"{first}: bag of {size} seeds (each bag of {size} of the {len(seeds)} seeds; they overlap)",
                     bags=n, bag=size)
            r.pop("seeds", None)
            out.append(r)
        out += [r for r in self.single if r["group"] == "option"]
        order = {"prior": 0, "family": 1, "sequence": 2, "bag": 3, "ensemble": 4, "pseudo": 5, "option": 6}
        return sorted(out, key=lambda r: order[r["group"]])  # stable: the rows keep their order within a group


def benchmark(bench: Bench, options: list[str], spec_path: Path) -> int:
    spec, root = bench.spec, bench.root
    bench.data()
    runs = Runs(bench)
    runs.families()
    runs.sequence_variants()
    runs.bags()
    runs.ensembles()
    runs.pseudo_rounds()
    first, seed0 = spec.noise.family, spec.noise.seeds[0]
    seeds = spec.noise.seeds
    baseline = next(r for r in runs.table(seeds) if r["row"] == f"{first}: final blend")
    sd, baseline_mean = baseline.get("oof_sd", math.nan), baseline["oof"]
    same_seed = runs.cvs[f"{first}_s{seed0}"]["oof"]["blend"].weighted
    for option in options:
        name = f"{first}_s{seed0}_{option}"
        cv = bench.run(bench.config(first, name, [f"seed={seed0}", *spec.options[option]]))
        r = row(f"option {option} ({' '.join(spec.options[option])})", cv, "blend", root, name, "option")
        # against the baseline's run with the same seed (the same initial weights and batches): a seed's luck
        # shared by both cancels; the mean over the seeds shown beside it
        r["delta"], r["delta_mean"] = r["oof"] - same_seed, r["oof"] - baseline_mean
        r["verdict"] = verdict(r["delta"], sd)
        runs.single.append(r)
    bench.log("table done")
    looks = {}  # where each family's baseline looks: its report's Grad-CAM pointing game
    for family in spec.families:
        name = f"{family}_s{seed0}"
        looks[name] = bench.report(bench.config(family, name, [f"seed={seed0}"]))
    bench.log("reports done")
    table = runs.table(seeds)
    checks = targets(table, spec, sd)
    stability = _stability(runs, spec, checks)
    write(root, table, checks + stability, _header(bench, spec, spec_path, options), looks)
    print((root / "benchmark.md").read_text())
    bench.log(f"written {root / 'benchmark.md'}, benchmark.json, benchmark.png")
    return 0


def _stability(runs: Runs, spec: Spec, checks) -> list[tuple[str, bool | None, str]]:
    """The verdicts again on all seeds but the last two: a verdict that moves rests on too few seeds."""
    seeds = spec.noise.seeds
    if len(seeds) < 4:
        return [("the verdicts on two seeds fewer", None, f"not judged: {len(seeds)} seeds (4 or more needed)")]
    fewer = runs.table(seeds[:-2])
    sd = next(r for r in fewer if r["row"] == f"{spec.noise.family}: final blend").get("oof_sd", math.nan)
    before = {what: (ok, figures) for what, ok, figures in targets(fewer, spec, sd)}
    moved = [what for what, ok, figures in checks if what in before and
             (before[what][0] != ok or (ok is None and before[what][1].split()[0] != figures.split()[0]))]
    return [(f"the verdicts on {len(seeds) - 2} seeds (0 to {len(seeds) - 3} of the list) equal those on "
             f"{len(seeds)}", not moved, "unchanged" if not moved else "moved: " + "; ".join(moved))]


def _header(bench: Bench, spec: Spec, spec_path: Path, options: list[str]) -> list[str]:
    runs = bench.seconds()
    took = f"{sum(runs) / 60:.0f} min" + (f" over {len(runs)} invocations ({', '.join(f'{s / 60:.1f}' for s in runs)} "
                                          "min: resumed)" if len(runs) > 1 else "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    meta = read_metadata(bench.root)
    return [f"# Benchmark `{spec.name}` ({spec_path.name}), {time.strftime('%Y-%m-%d')}, commit {commit or '?'}",
            "", f"{meta.fold.notna().sum():,} labelled + {(meta.split == 'test').sum():,} test slices of "
                f"{meta.PatientID.nunique()} patients, {meta.fold.nunique()} folds; families: "
            + ", ".join(f"{f} ({Path(c).name})" for f, c in spec.families.items())
            + f"; ± = sd over the {len(spec.noise.seeds)} model seeds {' '.join(map(str, spec.noise.seeds))} "
              f"(every family, every ensemble and pseudo-label row); {took} on "
              f"{platform.machine()}, {os.cpu_count()} CPUs "
              f"({'options: ' + ' '.join(options) if options else 'core table'})."]


if __name__ == "__main__":
    sys.exit(main())
