#!/usr/bin/env python
"""`make benchmark`: one table that can tell a better recipe from a worse one, with its noise.

    python benchmarks/benchmark.py [--spec configs/benchmark/cpu.yaml] [--root data/benchmark]
                                   [--options "mixup no_crop"]

On a synthetic set of its own (``synthetic`` in the spec: 150 patients on the CPU), every experiment of the
spec runs through the pipeline's own stages (2 train, 3 embed, 4 sequence model, 5 blend, the ensemble):

- each family's baseline (its config), and the noise family's (the first) again with each other model seed (the
  fold assignment stays): its rows are the mean over the seeds, ± their standard deviation;
- the sequence-model variants on the first family's first-seed CNN (its checkpoints and embeddings are shared;
  only stage 4 and 5 run again);
- the families' ensemble (mean, fitted weights, stacker) of each family's first seed;
- with ``--options``: one run of the first family per option (first seed), against its baseline's run with the
  same seed: a difference within twice its noise (sqrt(2) x the seed sd: two single runs) is "within noise";
- each family's first-seed report (``make report``), whose Grad-CAM pointing game goes into the table's page.

Rows: OOF and synthetic-test weighted log loss and the per-class OOF AUC. Written by this script as
``<root>/<spec>/benchmark.md``, ``benchmark.json`` and ``benchmark.png`` (the rows with their error bars),
with the targets of issue 24 checked at the end. Resumable: every stage keeps what it finished, so a killed
benchmark continues where it stopped when run again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
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


class Spec(BaseModel):
    """configs/benchmark/<name>.yaml."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    synthetic: dict[str, int | float] = {}
    families: dict[str, str] = Field(min_length=1)
    overrides: list[str] = []
    family_overrides: dict[str, list[str]] = {}
    noise: Noise
    sequence: dict[str, list[str]] = {}
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

        cfg = self.config(next(iter(self.spec.families)), name, [f"ensemble.name={name}",
                                                                 f"ensemble.members=[{','.join(members)}]"])
        with contextlib.redirect_stdout(io.StringIO()):
            return run_ensemble(cfg)


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


def targets(table: list[dict], spec: Spec, sd: float) -> list[tuple[str, bool | None, str]]:
    """Issue 24's targets: (what, met or not, the figures)."""
    by = {r["row"]: r for r in table}
    out = []
    prior = by["prior"]["oof"]
    for family in spec.families:
        blend = by[f"{family}: final blend"]["oof"]
        out.append((f"{family}: final blend <= 0.60 x the prior OOF", blend <= 0.60 * prior,
                    f"{blend:.4f} = {blend / prior:.2f} x {prior:.4f}"))
        cnn, seq = by[f"{family}: CNN, bag of epochs"]["oof"], by[f"{family}: + sequence model"]["oof"]
        out.append((f"{family}: sequence model <= 0.90 x its CNN", seq <= 0.90 * cnn, f"{seq:.4f} = {seq / cnn:.2f} x "
                                                                                      f"{cnn:.4f}"))
    final = by.get("ensemble: final")
    if final:
        low = {c: final[f"auc_{c}"] for c in SUBTYPES}
        out.append(("every subtype's OOF AUC >= 0.90 (the ensemble's final)", all(v >= 0.90 for v in low.values()),
                    ", ".join(f"{ABBREVIATIONS[c]} {v:.3f}" for c, v in low.items())))
        # the members the ensemble combined (each family's first seed), not a family's mean over seeds
        members = final.get("members_oof") or [by[f"{f}: final blend"]["oof"] for f in spec.families]
        best_combiner = min(by[f"ensemble: {c}"]["oof"] for c in ("mean", "weights", "stacker"))
        gain = min(members) - best_combiner
        out.append(("best ensemble <= 0.95 x its best member, by more than 2 x the seed noise",
                    best_combiner <= 0.95 * min(members) and gain > 2 * sd,
                    f"{best_combiner:.4f} = {best_combiner / min(members):.3f} x {min(members):.4f}; gain {gain:.4f} "
                    "vs "
                    f"2 sd {2 * sd:.4f}"))
    for r in table:
        if r["group"] == "option":
            out.append((r["row"], None, f"{r['verdict']} ({r['delta']:+.4f} vs the baseline's run with the same seed, "
                        f"{r.get('delta_mean', math.nan):+.4f} vs its mean; 2 x sqrt(2) sd "
                        f"{2 * math.sqrt(2) * sd:.4f})"))
    return out


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
    lines += ["", "Targets (issue 24):", ""]
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
    colours = {"family": "tab:blue", "noise": "tab:blue", "sequence": "tab:green", "ensemble": "tab:purple",
               "option": "tab:orange"}
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


def benchmark(bench: Bench, options: list[str], spec_path: Path) -> int:
    spec, root = bench.spec, bench.root
    bench.data()
    first = next(iter(spec.families))
    table: list[dict] = []
    cvs = {}
    for family in spec.families:
        seeds = spec.noise.seeds if family == spec.noise.family else spec.noise.seeds[:1]
        per_seed = []
        for seed in seeds:
            name = f"{family}_s{seed}"
            cvs[name] = bench.run(bench.config(family, name, [f"seed={seed}"]))
            per_seed.append([row(f"{family}: {label}", cvs[name], model, root, name, "family")
                             for label, model in (("CNN, last epoch", "cnn_single"), ("CNN, bag of epochs",
                                                                                      "cnn_bagged"),
                                                  ("+ sequence model", "lstm"), ("final blend", "blend"))])
        if not table:
            table.append(row("prior", cvs[f"{family}_s{seeds[0]}"], "prior", root, f"{family}_s{seeds[0]}", "prior"))
        for i in range(4):
            rows = [s[i] for s in per_seed]
            table.append(with_noise(rows) if len(rows) > 1 else rows[0])
    noise_rows = {r["row"]: r for r in table if "oof_sd" in r}
    sd = noise_rows[f"{spec.noise.family}: final blend"]["oof_sd"]
    for variant, overrides in spec.sequence.items():
        name = f"{first}_s0_{variant}"
        cv = bench.run(bench.config(first, name, ["seed=" + str(spec.noise.seeds[0]), *overrides]),
                       shared_cnn=f"{first}_s{spec.noise.seeds[0]}")
        table.append(row(f"{first}: sequence model {variant} ({' '.join(overrides)})", cv, "lstm", root, name,
                         "sequence"))
    members = [f"{f}_s{spec.noise.seeds[0]}" for f in spec.families]
    if len(members) > 1:
        ens = bench.ensemble(members, "ensemble")
        bench.log(f"ensemble of {' + '.join(members)}: final = {ens.final}")
        for model in ("mean", "weights", "stacker", "final"):
            table.append({**row(f"ensemble: {model}", ens.scores, model, root, "ensemble", "ensemble"),
                          "chosen": ens.final, "members_oof": [ens.scores["oof"][m].weighted for m in members]})
    baseline = next(r for r in table if r["row"] == f"{first}: final blend")  # the mean over the seeds
    same_seed = cvs[f"{first}_s{spec.noise.seeds[0]}"]["oof"]["blend"].weighted
    for option in options:
        name = f"{first}_s{spec.noise.seeds[0]}_{option}"
        cv = bench.run(bench.config(first, name, [f"seed={spec.noise.seeds[0]}", *spec.options[option]]))
        r = row(f"option {option} ({' '.join(spec.options[option])})", cv, "blend", root, name, "option")
        # against the baseline's run with the same seed (the same initial weights and batches): a seed's luck
        # shared by both cancels; the mean over the seeds shown beside it
        r["delta"], r["delta_mean"] = r["oof"] - same_seed, r["oof"] - baseline["oof"]
        r["verdict"] = verdict(r["delta"], sd)
        table.append(r)
    bench.log("table done")
    looks = {}  # where each family's baseline looks: its report's Grad-CAM pointing game
    for family in spec.families:
        name = f"{family}_s{spec.noise.seeds[0]}"
        looks[name] = bench.report(bench.config(family, name, [f"seed={spec.noise.seeds[0]}"]))
    bench.log("reports done")
    runs = bench.seconds()
    took = f"{sum(runs) / 60:.0f} min" + (f" over {len(runs)} invocations ({', '.join(f'{s / 60:.1f}' for s in runs)} "
                                          "min: "
                                          "resumed)" if len(runs) > 1 else "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    meta = read_metadata(root)
    header = [f"# Benchmark `{spec.name}` ({spec_path.name}), {time.strftime('%Y-%m-%d')}, commit {commit or '?'}",
              "", f"{meta.fold.notna().sum():,} labelled + {(meta.split == 'test').sum():,} test slices of "
                  f"{meta.PatientID.nunique()} patients, {meta.fold.nunique()} folds; families: "
                  + ", ".join(f"{f} ({Path(c).name})" for f, c in spec.families.items())
              + f"; ± = sd over {len(spec.noise.seeds)} model seeds of {spec.noise.family}; {took} on "
                f"{platform.machine()}, {os.cpu_count()} CPUs "
                f"({'options: ' + ' '.join(options) if options else 'core table'})."]
    checks = targets(table, spec, sd)
    write(root, table, checks, header, looks)
    print((root / "benchmark.md").read_text())
    bench.log(f"written {root / 'benchmark.md'}, benchmark.json, benchmark.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
