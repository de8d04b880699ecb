#!/usr/bin/env python
"""One offline command that proves the GPU path: `make gpu-check` (≤ 8 minutes on one GPU).

    python benchmarks/gpu_check.py [--out DIR] [--record BENCHMARKS.md] [--budget-s 480]
    GPU_CHECK_TINY=1 python benchmarks/gpu_check.py --out /tmp/x     # the same code on a CPU in ~1 min (tested)

No network and no pretrained weights (``model.pretrained=false``): it needs only the torch stack of the
machine and this project (``pip install --no-deps -e .`` plus the wheels ``make gpu-wheels`` gathers). On a
small synthetic set it generates, it measures and checks, each part timed and recorded even when another
fails:

1. the machine: GPU, memory, torch/CUDA/cuDNN versions, bf16 support;
2. training img/s of every GPU config in configs/real/: tensors on the device vs the PNG loader, fp32 vs AMP
   (and bf16 where supported), cudnn.benchmark on, peak memory at the config's batch (64 for the ResNeXt);
3. a 3-epoch run killed (SIGKILL) after its first epoch and resumed, against an uninterrupted run;
4. ``train.compile=true``: seconds to the first step and a step after;
5. stage 3 and stage 4 (``lstm.train_on`` oof and train, the 2nd place's 2 x 2048 BiLSTM) seconds;
6. ``bench-scale`` at a small scale with the 2nd place's sequence model;
7. the test suite on the GPU (skipped in the tiny mode, which runs inside the test suite).

Writes DIR/gpu_check.md and gpu_check.json; ``--record FILE`` puts the markdown between the
``<!-- gpu-check:start -->`` and ``<!-- gpu-check:end -->`` markers of FILE. Exit code 1 if a part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train beside this file

from bench_train import throughput  # noqa: E402

from ichpipe.base.config import load_config  # noqa: E402
from ichpipe.base.device import default_device  # noqa: E402

START, END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"
TINY = os.environ.get("GPU_CHECK_TINY", "") not in ("", "0")
# The real check: every GPU config; the tiny one: the CPU test model at 32 px (same code, seconds).
GPU_CONFIGS = sorted((REPO / "configs" / "real").glob("*.yaml"))
TINY_MODEL = ["model.backbone=test_resnet", "train.image_size=32", "train.batch_size=4", "embed.batch_size=8",
              "train.loader_workers=0"]
RECIPE = REPO / "configs" / "real" / "resnext101_2nd_place.yaml"


class Check:
    """The parts' results, in order: each a title, a markdown body, figures for the JSON, ok or the error."""

    def __init__(self, budget_s: float):
        self.parts: list[dict] = []
        self.start, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def run(self, title: str, fn, *args) -> None:
        t = time.perf_counter()
        print(f"== {title}", flush=True)
        try:
            body, figures = fn(*args)
            part = {"title": title, "ok": True, "body": body, "figures": figures}
        except Exception as exc:  # noqa: BLE001 - one failed part must not hide the others' figures
            traceback.print_exc()
            part = {"title": title, "ok": False, "body": f"**failed**: `{type(exc).__name__}: {str(exc)[:300]}`",
                    "figures": {}}
        part["seconds"] = round(time.perf_counter() - t, 1)
        print(part["body"], flush=True)
        self.parts.append(part)

    def markdown(self, header: str) -> str:
        lines = [header, ""]
        for p in self.parts:
            lines += [f"**{p['title']}** ({p['seconds']:.0f} s{'' if p['ok'] else ', FAILED'})", "", p["body"], ""]
        return "\n".join(lines)


def _table(rows: list[dict], columns: dict[str, str]) -> str:
    out = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k)) for k in columns) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "–" if np.isnan(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def machine(device: torch.device) -> tuple[str, dict]:
    f = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
         "cpus": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        f.update(gpu=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                 capability=f"{props.major}.{props.minor}",
                 cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    else:
        f.update(gpu="none (CPU)", bf16=False)
    return ", ".join(f"{k} {v}" for k, v in f.items()), f


FOLDS = 2 if TINY else 3


def make_data(root: Path, patients: int) -> tuple[str, dict]:
    from ichpipe.stages.preprocess import run_preprocess
    from ichpipe.synthetic.dataset import generate_dataset

    cfg = load_config(overrides=[f"data.root={root}", f"synthetic.n_patients={patients}", "synthetic.slices_min=12",
                                 "synthetic.slices_max=20", f"preprocess.n_folds={FOLDS}",
                                 "preprocess.max_bad_fraction=0.1"])
    t = time.perf_counter()
    table = generate_dataset(cfg.synthetic, root, workers=0, progress=False)
    gen = time.perf_counter() - t
    run_preprocess(cfg, progress=False)
    return (f"{len(table)} synthetic DICOMs ({patients} patients) in {gen:.0f} s, preprocessed to 512 px PNGs in "
            f"{time.perf_counter() - t - gen:.0f} s; {FOLDS} folds"), {"slices": len(table)}


def train_speed(root: Path, device: torch.device, steps: int) -> tuple[str, dict]:
    rows = []
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    for path in GPU_CONFIGS[:1] if TINY else GPU_CONFIGS:
        cfg = load_config(path, [f"data.root={root}", "model.pretrained=false", f"preprocess.n_folds={FOLDS}",
                                 *(TINY_MODEL if TINY else [])])
        precisions = {"fp32": None, "fp16": torch.float16} if device.type == "cuda" else {"fp32": None}
        if bf16:
            precisions["bf16"] = torch.bfloat16
        for r in throughput(cfg, steps, device, precisions):
            rows.append({"config": path.stem, "backbone": cfg.model.backbone, **r})
    body = _table(rows, {"config": "config", "size": "px", "batch": "batch", "precision": "precision",
                         "device_img_s": "img/s, tensors on device", "loader_img_s": "img/s, PNG loader",
                         "peak_gb": "peak GPU memory (GB)"})
    return body + "\n\ncudnn.benchmark on, channels_last, each config's optimiser; the loader: its workers, crop and " \
                  "augmentation on the 512 px PNGs.", {"rows": rows}


def _train_cmd(root: Path, experiment: str, extra: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "02_train_cnn.py"), "--config", str(RECIPE), f"data.root={root}",
            f"experiment={experiment}", "model.pretrained=false", "train.epochs=3", "fold=0", *extra]


def _weights(root: Path, experiment: str) -> dict:
    return torch.load(root / "runs" / experiment / "fold0" / "checkpoints" / "epoch02.pt", map_location="cpu",
                      weights_only=True)


def kill_and_resume(root: Path, extra: list[str]) -> tuple[str, dict]:
    from ichpipe.stages.train import train_fold

    t = time.perf_counter()  # the uninterrupted run in this process; the killed one as `make train` runs it
    cmd = _train_cmd(root, "gc_straight", extra)
    train_fold(load_config(cmd[cmd.index("--config") + 1], cmd[cmd.index("--config") + 2:]), progress=False)
    straight_s = time.perf_counter() - t
    proc = subprocess.Popen(_train_cmd(root, "gc_killed", extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = root / "runs" / "gc_killed" / "fold0" / "last.pt"
    while proc.poll() is None and not first.exists():
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(f"the run to kill ended by itself (exit {proc.returncode}) before its first epoch was saved")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (root / "runs" / "gc_killed" / "fold0" / "checkpoints").glob("*.pt"))
    subprocess.run(_train_cmd(root, "gc_killed", [*extra, "resume=true"]), check=True, capture_output=True, text=True)
    a, b = _weights(root, "gc_straight"), _weights(root, "gc_killed")
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())
    import pandas as pd

    h1 = pd.read_csv(root / "runs" / "gc_straight" / "fold0" / "history.csv")
    h2 = pd.read_csv(root / "runs" / "gc_killed" / "fold0" / "history.csv")
    if h1.epoch.tolist() != h2.epoch.tolist():
        raise RuntimeError(f"the resumed run's history has epochs {h2.epoch.tolist()}, the uninterrupted "
                           f"run's {h1.epoch.tolist()}")
    gap = float((h1.val_loss - h2.val_loss).abs().max())
    return (f"resnext101_2nd_place recipe ({'tiny model' if TINY else 'ResNeXt-101 at 224 px'}), 3 epochs: "
            f"uninterrupted {straight_s:.0f} s; killed with SIGKILL after {len(done)} checkpoint(s) "
            f"({', '.join(done)}), "
            f"resumed: largest weight difference after epoch 3 {diff:.2e}, validation losses differ by at most "
            f"{gap:.2e} ({h1.val_loss.iloc[-1]:.4f} vs {h2.val_loss.iloc[-1]:.4f})"), \
        {"max_weight_diff": diff, "max_val_loss_gap": gap, "straight_s": straight_s}


def compile_time(device: torch.device) -> tuple[str, dict]:
    from ichpipe.networks.dataset import normalize
    from ichpipe.networks.losses import make_loss
    from ichpipe.networks.models import create_model

    cfg = load_config(RECIPE, ["model.pretrained=false", *(TINY_MODEL if TINY else ["train.batch_size=32"])])
    model = create_model(cfg.model.backbone, pretrained=False, kwargs=cfg.model.kwargs).to(device)
    model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model, backend="eager" if TINY else "inductor")  # eager in the tiny mode: no C++ build on CI
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    loss_fn = make_loss("weighted_bce", device)
    x = torch.randint(0, 256, (cfg.train.batch_size, 3, cfg.train.image_size, cfg.train.image_size), dtype=torch.uint8,
                      device=device)
    y = torch.zeros(cfg.train.batch_size, 6, device=device)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        with torch.autocast(device.type, torch.float16, enabled=device.type == "cuda"):
            loss = loss_fn(net(normalize(x).contiguous(memory_format=torch.channels_last)), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return (f"{cfg.model.backbone} at {cfg.train.image_size} px, batch {cfg.train.batch_size}: first step (compile) "
            f"{times[0]:.1f} s, third step {times[2]:.3f} s"), {"first_step_s": times[0], "third_step_s": times[2]}


def stages(root: Path, extra: list[str]) -> tuple[str, dict]:
    from ichpipe.stages.embed import embed_fold
    from ichpipe.stages.sequence import train_sequence_fold

    base = [f"data.root={root}", "experiment=gc_killed", "model.pretrained=false", "train.epochs=3", "fold=0",
            "embed.epochs=[2]", *extra]
    rows = []
    cfg = load_config(RECIPE, base)
    t = time.perf_counter()
    embed_fold(cfg, progress=False)
    rows.append({"stage": "3: embed (held-out, test and training slices, 3 views)", "seconds": time.perf_counter() - t})
    for train_on in ("oof", "train"):
        # the second replaces the first's sequence models (the same checkpoint, other settings): told to
        cfg = load_config(RECIPE, [*base, f"lstm.train_on={train_on}", "lstm.inner_folds=2", "replace=true"])
        t = time.perf_counter()
        result = train_sequence_fold(cfg, progress=False)["epoch02"]
        rows.append({"stage": f"4: {cfg.lstm.kind} {cfg.lstm.layers} x {cfg.lstm.hidden}, train_on={train_on}, "
                              f"{cfg.lstm.epochs} epochs", "seconds": time.perf_counter() - t,
                     "oof": f"CNN {result.cnn:.4f} -> {result.lstm:.4f}"})
    return _table(rows, {"stage": "stage (fold 0, last checkpoint)", "seconds": "seconds", "oof": "OOF loss"}), \
        {"rows": rows}


def scale(work: Path) -> tuple[str, dict]:
    args = ["--scale", "0.0005", "--dim", "32", "--lstm-epochs", "1", "lstm.hidden=16"] if TINY else \
        ["--scale", "0.02", "--lstm-epochs", "1"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--work", str(work), "--config", str(RECIPE),
           *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}")
    lines = [line for line in res.stdout.splitlines() if line.startswith(("inputs:", "lstm", "blend:"))]
    return "\n".join(f"- {line}" for line in lines), {"stdout": res.stdout}


def test_suite(left_s: float) -> tuple[str, dict]:
    workers = min(8, max(1, (os.cpu_count() or 2) // 2))
    has_xdist = subprocess.run([sys.executable, "-c", "import xdist"], capture_output=True).returncode == 0
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests"),
           *(["-n", str(workers)] if has_xdist else [])]
    t = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, left_s), cwd=REPO, check=False,
                             env={**os.environ, "ICHPIPE_DEVICE": "auto"})  # the suite on the GPU, not its CPU default
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the test suite did not finish in the {left_s:.0f} s left of the budget") from None
    tail = [line for line in res.stdout.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    summary = tail[-1] if tail else res.stdout.strip().splitlines()[-1:]
    if res.returncode:
        raise RuntimeError(f"{summary}; " + "; ".join(failed[:5]))
    runner = f"pytest -n {workers}" if has_xdist else "pytest"
    return f"`{runner}` on the GPU: {summary} in {time.perf_counter() - t:.0f} s", {"summary": summary}


def record(path: Path, markdown: str) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{START}\n{markdown}\n{END}{after}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "data" / "gpu_check"))
    parser.add_argument("--record", default="", help="a markdown file to put the results in (BENCHMARKS.md)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time; the tests get the rest")
    parser.add_argument("--steps", type=int, default=2 if TINY else 10, help="timed training steps per measurement")
    args = parser.parse_args(argv)
    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    device = default_device()
    check = Check(args.budget_s)
    root = work / "data"
    extra = [*TINY_MODEL, "train.image_size=48", "lstm.hidden=16"] if TINY else ["train.image_size=224",
                                                                                  "train.batch_size=32"]
    check.run("Machine", machine, device)
    check.run("Synthetic set", make_data, root, 6 if TINY else 40)
    check.run("Training throughput per GPU config", train_speed, root, device, args.steps)
    check.run("Killed and resumed", kill_and_resume, root, extra)
    check.run("train.compile=true", compile_time, device)
    check.run("Stages 3 and 4", stages, root, extra)
    check.run("bench-scale, small", scale, work / "scale")
    if TINY:
        print("== The test suite: skipped in the tiny mode (it runs inside the test suite)")
    else:
        check.run("The test suite", lambda: test_suite(check.left()))
    stamp = time.strftime("%Y-%m-%d %H:%M")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    header = (f"### `make gpu-check`, {stamp}, commit {commit or '?'}{' (tiny mode)' if TINY else ''}: "
              f"{sum(p['ok'] for p in check.parts)} of {len(check.parts)} parts ok, "
              f"{time.perf_counter() - check.start:.0f} s")
    md = check.markdown(header)
    (out / "gpu_check.md").write_text(md + "\n")
    (out / "gpu_check.json").write_text(json.dumps(check.parts, indent=1, default=str) + "\n")
    if args.record:
        record(Path(args.record), md)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{header}\nwritten: {out / 'gpu_check.md'}")
    return 0 if all(p["ok"] for p in check.parts) else 1


if __name__ == "__main__":
    sys.exit(main())
