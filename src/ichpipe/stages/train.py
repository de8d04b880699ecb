"""Stage 2: a timm CNN per fold on the preprocessed PNGs.

One run folder per fold, ``<data root>/runs/<experiment>/fold<k>/``::

    config.yaml                  the resolved config
    checkpoints/epoch<NN>.pt     model weights after each epoch (for bagging)
    last.pt                      weights + optimizer, scaler, scheduler, epoch, step, RNG: for resume
    oof_epoch<NN>.parquet        validation (out-of-fold) probabilities per image after each epoch
    history.csv                  per epoch: train loss, validation weighted log loss, per-class loss/AUC
    tb/                          TensorBoard: loss, LR, img/s, per-class validation loss and AUC

Data order and augmentation are pure functions of (seed, epoch), and each epoch starts from the
previous epoch's saved state, so ``resume=true`` after a kill ends with the same weights as an
uninterrupted run. Under ``torchrun`` each process trains on its share of every batch (DDP); rank 0
validates, logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from ichpipe.base.config import Config, changed_settings, describe_changes, save_config
from ichpipe.base.device import Amp, Runtime, amp_settings, autocast, close_runtime, init_runtime, local_main_first
from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_path, load_tensors, save_torch, sweep_temp_files, write_text_atomic, writer_lock
from ichpipe.base.labels import LABELS
from ichpipe.base.paths import checkpoint_path, data_paths, read_metadata, run_dir
from ichpipe.fitting.pseudo import PSEUDO_RECORD, PseudoLabels, pseudo_rows, read_pseudo_labels, wanted
from ichpipe.networks.dataset import (
    DEFAULT_AUGMENT,
    EvalInput,
    SliceDataset,
    build_transform,
    checked_labels,
    image_cache,
    make_loader,
    normalize,
)
from ichpipe.networks.losses import make_loss
from ichpipe.networks.models import create_model, load_weights
from ichpipe.networks.optim import accumulation_groups, make_optimizer, make_schedule
from ichpipe.scoring.folds import record_fold_table
from ichpipe.scoring.metrics import auc_or_nan, logit, per_class_log_loss, prior, weighted_log_loss


class EpochSampler(Sampler[int]):
    """Seeded shuffle per epoch, split across ranks; yields ``epoch * n + index``.

    Carrying the epoch inside the index lets dataset copies in persistent workers know the epoch
    (for seeded augmentation) without any state being sent to them.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch = 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank gets as many
        return iter(self.epoch * self.n + i for i in order[self.rank:: self.world])


class EpochDataset(torch.utils.data.Dataset):
    """Decodes :class:`EpochSampler` indices for a :class:`SliceDataset`."""

    def __init__(self, base: SliceDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, k: int):
        self.base.epoch, i = divmod(k, len(self.base))
        return self.base[i]


def init_head_bias(model: nn.Module, prevalence: np.ndarray) -> None:
    """Start the classifier at the training prior (bias = logit of each label's prevalence): an untrained
    model then scores the prior-only loss instead of log(2) per label, and the first steps learn images,
    not the base rates."""
    head = model.get_classifier()
    if isinstance(head, nn.Linear) and head.bias is not None:
        with torch.no_grad():
            head.bias.copy_(torch.as_tensor(logit(np.clip(prevalence, 1e-4, 1 - 1e-4)), dtype=head.bias.dtype))


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's validation of a fold: a row of ``history.csv``."""

    epoch: int  # from 0
    step: int  # optimizer steps so far
    train_loss: float
    prior_loss: float  # the prior-only validation loss
    val_loss: float  # weighted log loss (the competition's metric)
    loss: dict[str, float]  # per label
    auc: dict[str, float]  # per label; NaN where the fold's validation slices hold one class only

    def row(self) -> dict[str, float]:
        """The history.csv row: epoch, step, train_loss, prior_loss, val_loss, loss_<label>, auc_<label>."""
        return {"epoch": self.epoch, "step": self.step, "train_loss": self.train_loss, "prior_loss": self.prior_loss,
                "val_loss": self.val_loss, **{f"loss_{k}": v for k, v in self.loss.items()},
                **{f"auc_{k}": v for k, v in self.auc.items()}}


def evaluate(y: np.ndarray, p: np.ndarray) -> tuple[float, dict[str, float], dict[str, float]]:
    """(weighted log loss, per-class loss, per-class AUC (NaN where a class has one value only))."""
    return (weighted_log_loss(y, p), dict(per_class_log_loss(y, p)),
            {name: auc_or_nan(y[:, i], p[:, i]) for i, name in enumerate(LABELS)})


@dataclass(frozen=True)
class TrainResult:
    """A fold's training as this process ran it (under torchrun rank 0 reports for all)."""

    run_dir: Path
    rank: int
    prior_loss: float
    last: EpochMetrics | None  # the last epoch this run trained; None when every epoch was done before, or rank > 0

    @property
    def val_loss(self) -> float | None:
        return None if self.last is None else self.last.val_loss


def prior_baseline(train_y: np.ndarray, val_y: np.ndarray) -> float:
    """Weighted log loss of predicting the training prevalence for every slice."""
    return weighted_log_loss(val_y, np.broadcast_to(prior(train_y), val_y.shape))


@torch.no_grad()
def validation_probabilities(model: nn.Module, loader: DataLoader, rt: Runtime, amp: Amp, progress: bool = False
                             ) -> np.ndarray:
    model.eval()
    out = []
    for x, _, _ in tqdm(loader, desc="validate", leave=False, disable=not progress):
        x = normalize(x.to(rt.device, non_blocking=True))
        with autocast(rt.device, amp):
            out.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(LABELS)), np.float32)


def load_fold(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, Path, pd.DataFrame]:
    """(training rows, validation rows, PNG folder, whole metadata) of ``cfg.fold``."""
    paths = data_paths(cfg)
    meta = read_metadata(paths)
    labelled = meta[meta.fold.notna()]
    folds = sorted(int(k) for k in labelled.fold.unique())
    if cfg.fold not in folds:
        raise InputError(f"fold={cfg.fold}: the metadata has folds {folds}")
    png_dir = paths.pngs(cfg.preprocess)
    return labelled[labelled.fold != cfg.fold], labelled[labelled.fold == cfg.fold], png_dir, meta


def micro_batch(batch_size: int, accumulate: int, world_size: int) -> int:
    """Images per process and micro-step; ``train.batch_size`` must split evenly (64 on 3 GPUs would train 63)."""
    parts = accumulate * world_size
    if batch_size % parts:
        fits = ", ".join(str(b) for b in sorted({max(parts, batch_size // parts * parts),
                                                 (batch_size // parts + 1) * parts}))
        raise InputError(f"train.batch_size={batch_size} does not split into train.accumulate={accumulate} x "
                         f"{world_size} process(es); use a multiple of {parts} (e.g. {fits})")
    return batch_size // parts


def restore_scaler(scaler: torch.amp.GradScaler, state: dict) -> None:
    """The loss scaler's state from ``last.pt``. A run saved without loss scaling (on a CPU, or bf16) and
    resumed with it (fp16 on a GPU) starts the scaler afresh; the other way round there is nothing to keep."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)


class OptimizerStep:
    """One (scaled) optimizer step per call; it returns False when fp16 gradients overflowed and the scaler
    skipped the update.

    The scale is read once per step, after the update, and kept for the next (the only host sync this
    adds: the scaler's own step already waits for its overflow check). Without loss scaling: no sync.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler):
        self.optimizer, self.scaler = optimizer, scaler
        self.scale: float | None = None

    def __call__(self) -> bool:
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return True
        before = self.scale if self.scale is not None else self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scale = self.scaler.get_scale()
        return self.scale >= before


# A resume continues the same optimisation: these settings must equal the run's own.
# The settings that change a run's result: a resume with another value of one is refused. Each is a dotted key of
# the Config (tests/stages/test_train.py checks that every one names a setting).
RESUME_KEYS = ("seed", "model.backbone", "model.kwargs", "model.drop_rate", "train.image_size", "train.epochs",
               "train.batch_size", "train.lr", "train.optimizer", "train.schedule", "train.weight_decay",
               "train.warmup_steps", "train.accumulate", "train.loss", "train.mixup", "train.label_smoothing",
               "train.augment", "train.crop_border", "train.crop_margin", "preprocess.size", "preprocess.windows",
               "preprocess.mode", "preprocess.name", "pseudo.")


def _training_set(cfg: Config, rt: Runtime, out: Path, train_meta: pd.DataFrame, targets: np.ndarray,
                  meta: pd.DataFrame, png_dir: Path, channels: int, resumed: bool) -> SliceDataset:
    """The fold's training slices with their labels, and with ``pseudo.source`` the test slices with fold k's
    pseudo-labels beside them (recorded in the run folder)."""
    tcfg = cfg.train
    pseudo = read_pseudo_labels(cfg, cfg.fold, meta) if wanted(cfg, "train") else None
    if rt.is_main:
        _record_pseudo(out, pseudo, resumed)
    if pseudo is not None:
        extra = pseudo_rows(meta, pseudo)
        train_meta = pd.concat([train_meta, extra], ignore_index=True)
        targets = np.concatenate([targets, extra[list(LABELS)].to_numpy(np.float32)])
    return SliceDataset(train_meta, png_dir, build_transform(tcfg.augment or DEFAULT_AUGMENT, tcfg.image_size,
                                                             train=True), cfg.seed,
                        tcfg.crop_margin if tcfg.crop_border else None, channels=channels, targets=targets,
                        cache=image_cache(tcfg.image_cache_mb))


def _record_pseudo(out: Path, pseudo: PseudoLabels | None, resumed: bool) -> None:
    """The pseudo-labels a run trains on, in its folder (``pseudo.json``); a resume whose source has changed since
    is refused (its finished epochs learnt from the former labels)."""
    path = out / PSEUDO_RECORD
    now = pseudo.record() if pseudo else None
    if resumed and path.exists():
        before = json.loads(path.read_text())
        if (before or {}).get("digest") != (now or {}).get("digest"):
            given = now["source"] if now else "none"
            raise InputError(f"{out}: its epochs so far trained on other pseudo-labels than those of {given} now; "
                             f"set experiment=<new name> for a new round")
    write_text_atomic(path, json.dumps(now) + "\n")


def check_resume(cfg: Config, out: Path) -> None:
    """Refuse a resume whose settings differ from the run's in a way that changes the result."""
    changed = changed_settings(out / "config.yaml", cfg, RESUME_KEYS)
    if changed:
        raise InputError(f"{out}: resume with other settings than the run's: {describe_changes(changed)}; "
                         f"use the run's settings, or set experiment=<new name>")


def _load_state(path: Path) -> dict:
    try:
        return load_tensors(path)
    except InputError as exc:
        raise InputError(f"{exc}; delete it to start the fold again") from None


def mix_batch(x: torch.Tensor, y: torch.Tensor, alpha: float, smoothing: float, rng: np.random.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (``alpha`` > 0: one λ ~ Beta(α, α) per batch, images and labels mixed with a shuffled copy of
    the batch) and label smoothing (targets pulled towards 0.5 by ``smoothing``/2). ``rng`` seeded per
    (seed, epoch, step, rank): a resumed run mixes the same pairs."""
    if alpha > 0:
        lam = float(rng.beta(alpha, alpha))
        perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
        x = lam * x + (1 - lam) * x[perm]
        y = lam * y + (1 - lam) * y[perm]
    if smoothing > 0:
        y = y * (1 - smoothing) + smoothing / 2
    return x, y


def train_fold(cfg: Config, progress: bool = True, stop_after_epochs: int = 0,
               on_epoch: Callable[[int, EpochMetrics], None] | None = None) -> TrainResult:
    """Train (or resume) the CNN of ``cfg.fold``; returns the last epoch's validation metrics.

    ``stop_after_epochs`` (tests only) stops after that many epochs as if the process were killed.
    ``on_epoch(epoch, metrics)``: called on rank 0 after each epoch's files are written (the search's
    pruner: an exception it raises stops the run there, its finished epochs kept).
    """
    rt = init_runtime(cfg.train.cudnn_benchmark)
    try:
        return _train(cfg, rt, progress and rt.is_main, stop_after_epochs, on_epoch)
    finally:
        close_runtime(rt)


def _shard(n: int, rt: Runtime) -> np.ndarray:
    """The validation rows this process predicts: every world_size-th row (no padding, no repeats)."""
    return np.arange(rt.rank, n, rt.world_size)


def _gather_predictions(probs: np.ndarray, n: int, rt: Runtime) -> np.ndarray | None:
    """Every rank's share of the validation predictions, in row order, on rank 0 (None elsewhere)."""
    if not rt.distributed:
        return probs
    parts = [None] * rt.world_size if rt.is_main else None
    dist.gather_object(probs, parts, dst=0)
    if not rt.is_main:
        return None
    out = np.empty((n, len(LABELS)), np.float32)
    for rank, part in enumerate(parts):
        out[_shard(n, Runtime(rt.device, rank, rt.world_size))] = part
    return out


@dataclass
class _Run:
    """One fold's training as set up (or resumed): what the epochs of :func:`_train` share."""

    cfg: Config
    rt: Runtime
    out: Path
    train_ds: SliceDataset
    val_ds: SliceDataset
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    model: nn.Module
    net: nn.Module  # the model as trained: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    optimizer_step: OptimizerStep
    amp: Amp
    loss_fn: nn.Module
    groups: list[int]  # micro-batches of each micro-batch's accumulation group
    steps_per_epoch: int
    start_epoch: int
    step: int
    baseline: float  # the prior-only validation loss
    history: list[dict]
    writer: object = None  # TensorBoard, on rank 0


def _set_up(cfg: Config, rt: Runtime, stack: contextlib.ExitStack) -> _Run:
    """Data, model, optimiser and schedule of ``cfg.fold``; resumed from ``last.pt`` with ``resume=true``. The run
    folder's write lock is held on rank 0 (the writer) until ``stack`` closes."""
    tcfg = cfg.train
    torch.manual_seed(cfg.seed)
    train_meta, val_meta, png_dir, meta = load_fold(cfg)
    out = run_dir(cfg)
    if rt.is_main:
        stack.enter_context(writer_lock(out, f"stage 2 (train) of {cfg.experiment} fold {cfg.fold}"))
    last = out / "last.pt"
    if last.exists() and not cfg.resume:
        raise InputError(f"{out}: a run exists; add resume=true to continue it, or set experiment=<new name>")
    if last.exists():
        check_resume(cfg, out)
        state = _load_state(last)
    micro = micro_batch(tcfg.batch_size, tcfg.accumulate, rt.world_size)
    if rt.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for folder in (out, out / "checkpoints"):  # what a killed run was writing (a checkpoint's temp file)
            sweep_temp_files(folder)
        record_fold_table(out, meta)
        save_config(cfg, out / "config.yaml")

    val_input = EvalInput.of(tcfg.image_size, tcfg.crop_border, cfg.preprocess.mode)
    channels = val_input.channels
    labelled_targets = checked_labels(train_meta)
    train_ds = _training_set(cfg, rt, out, train_meta, labelled_targets, meta, png_dir, channels, last.exists())
    val_ds = SliceDataset(val_meta, png_dir, val_input.transform, cfg.seed, val_input.crop, labelled=True,
                          channels=channels, cache=image_cache(tcfg.image_cache_mb))
    train_ds.check_files()
    val_ds.check_files()
    sampler = EpochSampler(len(train_ds), cfg.seed, rt.rank, rt.world_size)
    train_loader = make_loader(EpochDataset(train_ds), micro, tcfg.loader_workers, sampler, rt.device)
    val_rows = _shard(len(val_ds), rt)  # validation is split across the processes, then gathered
    val_loader = make_loader(Subset(val_ds, val_rows.tolist()), micro * 2, tcfg.loader_workers, None, rt.device)

    with local_main_first(rt):  # pretrained weights: downloaded once per machine, then read from its cache
        model = create_model(cfg.model.backbone, cfg.model.pretrained, cfg.model.weights, cfg.model.init_from,
                             cfg.model.drop_rate, channels, cfg.model.kwargs).to(rt.device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(tcfg.optimizer, model.parameters(), tcfg.lr, tcfg.weight_decay)
    groups = accumulation_groups(len(train_loader), tcfg.accumulate)
    steps_per_epoch = math.ceil(len(train_loader) / tcfg.accumulate)
    scheduler = make_schedule(optimizer, tcfg.schedule, tcfg.warmup_steps, steps_per_epoch * tcfg.epochs)
    amp = amp_settings(tcfg.amp, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp.scaler)
    start_epoch, step = 0, 0
    if not last.exists() and not cfg.model.init_from:
        init_head_bias(model, prior(labelled_targets))
    if last.exists():
        load_weights(model, state["model"], last, cfg.model.backbone)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_scaler(scaler, state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if rt.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], rt.device)
        start_epoch, step = state["epoch"] + 1, state["step"]
    net = DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None) \
        if rt.distributed else model
    if tcfg.compile:
        net = torch.compile(net)
    history_path = out / "history.csv"
    history = pd.read_csv(history_path).to_dict("records") if history_path.exists() and start_epoch else []
    run = _Run(cfg=cfg, rt=rt, out=out, train_ds=train_ds, val_ds=val_ds, sampler=sampler, train_loader=train_loader,
               val_loader=val_loader, model=model, net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               optimizer_step=OptimizerStep(optimizer, scaler), amp=amp, loss_fn=make_loss(tcfg.loss, rt.device),
               groups=groups, steps_per_epoch=steps_per_epoch, start_epoch=start_epoch, step=step,
               baseline=prior_baseline(labelled_targets, val_ds.labels),
               history=[h for h in history if h["epoch"] < start_epoch])
    if rt.is_main:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(out / "tb"))
    return run


def _train_epoch(run: _Run, epoch: int, progress: bool) -> float:
    """One epoch of optimisation; returns its mean training loss (this process's batches)."""
    cfg, rt, tcfg = run.cfg, run.rt, run.cfg.train
    run.sampler.set_epoch(epoch)
    run.net.train()
    bar = tqdm(total=run.steps_per_epoch, desc=f"fold {cfg.fold} epoch {epoch + 1}/{tcfg.epochs}", disable=not progress)
    # The running loss stays on the device: reading it (a GPU sync) only at log points.
    running, seen = torch.zeros((), device=rt.device), 0
    tick, tick_images = time.perf_counter(), 0
    run.optimizer.zero_grad(set_to_none=True)
    for i, (x, y, _) in enumerate(run.train_loader):
        x = normalize(x.to(rt.device, non_blocking=True))
        if tcfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(rt.device, non_blocking=True)
        if tcfg.mixup or tcfg.label_smoothing:
            x, y = mix_batch(x, y, tcfg.mixup, tcfg.label_smoothing, np.random.default_rng([cfg.seed, epoch, i,
                                                                                            rt.rank]))
        update = (i + 1) % tcfg.accumulate == 0 or (i + 1) == len(run.train_loader)
        # Micro-steps before the update skip DDP's gradient all-reduce; the update's backward does it.
        sync = contextlib.nullcontext() if update or not rt.distributed else run.net.no_sync()
        with sync:
            with autocast(rt.device, run.amp):
                loss = run.loss_fn(run.net(x), y)
            run.scaler.scale(loss / run.groups[i]).backward()
        running += loss.detach() * len(x)
        seen += len(x)
        tick_images += len(x) * rt.world_size
        if not update:
            continue
        if tcfg.clip_grad:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.model.parameters(), tcfg.clip_grad)
        applied = run.optimizer_step()
        run.optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if not applied:
            continue  # fp16 overflow: the scaler skipped this update, so the schedule does not advance
        run.step += 1
        run.scheduler.step_update(run.step)
        if run.writer is not None and run.step % tcfg.log_every == 0:
            elapsed = time.perf_counter() - tick
            mean_loss = running.item() / seen
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            run.writer.add_scalar("train/loss", mean_loss, run.step)
            run.writer.add_scalar("train/lr", run.optimizer.param_groups[0]["lr"], run.step)
            run.writer.add_scalar("train/img_per_s", tick_images / elapsed, run.step)
            tick, tick_images = time.perf_counter(), 0
    bar.close()
    return running.item() / max(seen, 1)


def _validate(run: _Run, epoch: int, train_loss: float, progress: bool) -> tuple[EpochMetrics, np.ndarray] | None:
    """The epoch's validation on every process, gathered; on rank 0 its metrics and the validation
    probabilities (None elsewhere)."""
    rt = run.rt
    if rt.distributed:  # BatchNorm statistics differ per process after training: validate (and save) rank 0's
        for buffer in run.model.buffers():
            dist.broadcast(buffer, src=0)
    probs = _gather_predictions(validation_probabilities(run.model, run.val_loader, rt, run.amp, progress),
                                len(run.val_ds), rt)
    if not rt.is_main:
        return None
    val_loss, loss, auc = evaluate(run.val_ds.labels, probs)
    return EpochMetrics(epoch=epoch, step=run.step, train_loss=train_loss, prior_loss=run.baseline, val_loss=val_loss,
                        loss=loss, auc=auc), probs


def _save_epoch(run: _Run, epoch: int, metrics: EpochMetrics, probs: np.ndarray) -> None:
    """Rank 0: the epoch's OOF predictions, checkpoint, history row and TensorBoard points, then ``last.pt``."""
    out, rt = run.out, run.rt
    run.history.append(metrics.row())
    oof = pd.DataFrame(probs, columns=list(LABELS)).assign(image_id=run.val_ds.ids)[["image_id", *LABELS]]
    with atomic_path(out / f"oof_epoch{epoch:02d}.parquet") as tmp:
        oof.to_parquet(tmp, index=False)
    save_torch(run.model.state_dict(), checkpoint_path(out, epoch))
    with atomic_path(out / "history.csv") as tmp:
        pd.DataFrame(run.history).to_csv(tmp, index=False)
    # last.pt is the commit point: written after everything else of the epoch, so a run killed at any
    # moment resumes from an epoch whose history row, OOF and checkpoint are all on disk.
    save_torch({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch,
                "step": run.step, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None},
               out / "last.pt")
    writer = run.writer
    writer.add_scalar("val/loss", metrics.val_loss, run.step)
    writer.add_scalar("val/prior_loss", run.baseline, run.step)
    writer.add_scalar("train/epoch_loss", metrics.train_loss, run.step)
    for name in LABELS:
        writer.add_scalar(f"val_loss/{name}", metrics.loss[name], run.step)
        if not math.isnan(metrics.auc[name]):
            writer.add_scalar(f"val_auc/{name}", metrics.auc[name], run.step)
    writer.flush()


def _train(cfg: Config, rt: Runtime, progress: bool, stop_after_epochs: int = 0, on_epoch=None) -> TrainResult:
    with contextlib.ExitStack() as lock:
        return _train_run(_set_up(cfg, rt, lock), cfg, rt, progress, stop_after_epochs, on_epoch)


def _train_run(run: _Run, cfg: Config, rt: Runtime, progress: bool, stop_after_epochs: int, on_epoch) -> TrainResult:
    metrics: EpochMetrics | None = None
    stop_at = run.start_epoch + stop_after_epochs if stop_after_epochs else cfg.train.epochs
    try:
        for epoch in range(run.start_epoch, min(cfg.train.epochs, stop_at)):
            train_loss = _train_epoch(run, epoch, progress)
            result = _validate(run, epoch, train_loss, progress)
            if result is not None:
                metrics, probs = result
                _save_epoch(run, epoch, metrics, probs)
                if progress:
                    tqdm.write(f"fold {cfg.fold} epoch {epoch + 1}: train {metrics.train_loss:.4f}  "
                               f"val {metrics.val_loss:.4f}  (prior {run.baseline:.4f})  auc(any) "
                               f"{metrics.auc['any']:.3f}")
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
            if rt.distributed:
                dist.barrier()  # rank 0 has written the epoch's files before anyone goes on
    finally:
        if run.writer is not None:
            run.writer.close()
    return TrainResult(run_dir=run.out, rank=rt.rank, prior_loss=run.baseline, last=metrics)
