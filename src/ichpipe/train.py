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

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ichpipe.config import Config, save_config
from ichpipe.data import DEFAULT_AUGMENT, SliceDataset, build_transform, normalize
from ichpipe.device import Runtime, amp_settings, autocast, close_runtime, init_runtime
from ichpipe.io import InputError, atomic_path
from ichpipe.labels import LABELS, WEIGHTS
from ichpipe.metrics import per_class_log_loss, weighted_log_loss
from ichpipe.models import create_model
from ichpipe.paths import DataPaths, read_metadata, run_dir
from ichpipe.preprocess import output_name


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


def make_loss(name: str, device: torch.device):
    weights = torch.tensor(WEIGHTS, dtype=torch.float32, device=device)
    if name == "weighted_bce":  # the competition metric as a loss: any x2
        def loss(logits, y):
            bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
            return (bce * weights).sum(dim=1).mean() / weights.sum()
    elif name == "mse":
        def loss(logits, y):
            return ((torch.sigmoid(logits.float()) - y) ** 2 * weights).sum(dim=1).mean() / weights.sum()
    else:
        raise InputError(f"train.loss: weighted_bce or mse, got {name!r}")
    return loss


def cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(y: np.ndarray, p: np.ndarray) -> dict:
    """Weighted log loss, per-class loss and AUC (NaN where a class has one value only)."""
    out = {"val_loss": weighted_log_loss(y, p)}
    for name, loss in per_class_log_loss(y, p).items():
        out[f"loss_{name}"] = loss
    for i, name in enumerate(LABELS):
        out[f"auc_{name}"] = roc_auc_score(y[:, i], p[:, i]) if 0 < y[:, i].sum() < len(y) else float("nan")
    return out


def prior_baseline(train_y: np.ndarray, val_y: np.ndarray) -> float:
    """Weighted log loss of predicting the training prevalence for every slice."""
    return weighted_log_loss(val_y, np.broadcast_to(train_y.mean(axis=0), val_y.shape))


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, rt: Runtime, amp: tuple, progress: bool = False) -> np.ndarray:
    model.eval()
    out = []
    for x, _, _ in tqdm(loader, desc="validate", leave=False, disable=not progress):
        x = normalize(x.to(rt.device, non_blocking=True))
        with autocast(rt.device, amp[0], amp[1]):
            out.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(LABELS)), np.float32)


def _loader(ds, batch_size, workers, sampler, device) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=False)


def load_fold(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    paths = DataPaths(cfg.data.root)
    meta = read_metadata(paths.root)
    labelled = meta[meta.fold.notna()]
    folds = sorted(labelled.fold.unique())
    if cfg.fold not in folds:
        raise InputError(f"fold={cfg.fold}: the metadata has folds {folds}")
    png_dir = paths.processed / output_name(cfg.preprocess)
    return labelled[labelled.fold != cfg.fold], labelled[labelled.fold == cfg.fold], png_dir


def _save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train_fold(cfg: Config, progress: bool = True) -> dict:
    """Train (or resume) the CNN of ``cfg.fold``; return the last epoch's validation metrics."""
    rt = init_runtime()
    try:
        return _train(cfg, rt, progress and rt.is_main)
    finally:
        close_runtime(rt)


def _train(cfg: Config, rt: Runtime, progress: bool) -> dict:
    tcfg = cfg.train
    torch.manual_seed(cfg.seed)
    train_meta, val_meta, png_dir = load_fold(cfg)
    out = run_dir(cfg)
    last = out / "last.pt"
    if last.exists() and not cfg.resume:
        raise InputError(f"{out}: a run exists; add resume=true to continue it, or set experiment=<new name>")
    if rt.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    augment = tcfg.augment or DEFAULT_AUGMENT
    train_ds = SliceDataset(train_meta, png_dir, build_transform(augment, tcfg.image_size, train=True), cfg.seed,
                            tcfg.crop_margin if tcfg.crop_border else None)
    val_ds = SliceDataset(val_meta, png_dir, build_transform([], tcfg.image_size, train=False), cfg.seed,
                          0.0 if tcfg.crop_border else None)
    micro = tcfg.batch_size // (tcfg.accumulate * rt.world_size)
    if micro < 1:
        raise InputError(f"train.batch_size={tcfg.batch_size} is smaller than accumulate x processes")
    sampler = EpochSampler(len(train_ds), cfg.seed, rt.rank, rt.world_size)
    train_loader = _loader(EpochDataset(train_ds), micro, tcfg.loader_workers, sampler, rt.device)
    val_loader = _loader(val_ds, micro * 2, tcfg.loader_workers, None, rt.device)

    model = create_model(cfg.model.backbone, cfg.model.pretrained, cfg.model.weights, cfg.model.init_from,
                         cfg.model.drop_rate).to(rt.device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    steps_per_epoch = math.ceil(len(sampler) / micro / tcfg.accumulate)
    scheduler = cosine_with_warmup(optimizer, tcfg.warmup_steps, steps_per_epoch * tcfg.epochs)
    amp = amp_settings(tcfg.amp, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp[2])
    start_epoch, step = 0, 0
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step = state["epoch"] + 1, state["step"]
    net = DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None) \
        if rt.distributed else model
    if tcfg.compile:
        net = torch.compile(net)
    loss_fn = make_loss(tcfg.loss, rt.device)
    writer = None
    if rt.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    history_path = out / "history.csv"
    history = pd.read_csv(history_path).to_dict("records") if history_path.exists() and start_epoch else []
    history = [h for h in history if h["epoch"] < start_epoch]
    val_y = val_ds.labels
    baseline = prior_baseline(train_ds.labels, val_y)
    metrics: dict = {"epoch": start_epoch - 1}
    stop_at = start_epoch + tcfg.stop_after_epochs if tcfg.stop_after_epochs else tcfg.epochs

    for epoch in range(start_epoch, min(tcfg.epochs, stop_at)):
        sampler.set_epoch(epoch)
        net.train()
        bar = tqdm(total=steps_per_epoch, desc=f"fold {cfg.fold} epoch {epoch + 1}/{tcfg.epochs}", disable=not progress)
        running, seen, tick, tick_images = 0.0, 0, time.perf_counter(), 0
        optimizer.zero_grad(set_to_none=True)
        for i, (x, y, _) in enumerate(train_loader):
            x = normalize(x.to(rt.device, non_blocking=True))
            if tcfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(rt.device, non_blocking=True)
            with autocast(rt.device, amp[0], amp[1]):
                loss = loss_fn(net(x), y)
            scaler.scale(loss / tcfg.accumulate).backward()
            running += loss.item() * len(x)
            seen += len(x)
            tick_images += len(x) * rt.world_size
            if (i + 1) % tcfg.accumulate and (i + 1) != len(train_loader):
                continue
            if tcfg.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / seen:.4f}")
            if writer is not None and step % tcfg.log_every == 0:
                elapsed = time.perf_counter() - tick
                writer.add_scalar("train/loss", running / seen, step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                writer.add_scalar("train/img_per_s", tick_images / elapsed, step)
                tick, tick_images = time.perf_counter(), 0
        bar.close()
        if rt.is_main:
            probs = predict(model, val_loader, rt, amp, progress)
            metrics = {"epoch": epoch, "step": step, "train_loss": running / max(seen, 1),
                       "prior_loss": baseline, **evaluate(val_y, probs)}
            history.append(metrics)
            oof = pd.DataFrame(probs, columns=list(LABELS)).assign(image_id=val_ds.ids)[["image_id", *LABELS]]
            with atomic_path(out / f"oof_epoch{epoch:02d}.parquet") as tmp:
                oof.to_parquet(tmp, index=False)
            _save(model.state_dict(), out / "checkpoints" / f"epoch{epoch:02d}.pt")
            _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "torch_rng": torch.get_rng_state()}, last)
            with atomic_path(history_path) as tmp:
                pd.DataFrame(history).to_csv(tmp, index=False)
            writer.add_scalar("val/loss", metrics["val_loss"], step)
            writer.add_scalar("val/prior_loss", baseline, step)
            writer.add_scalar("train/epoch_loss", metrics["train_loss"], step)
            for name in LABELS:
                writer.add_scalar(f"val_loss/{name}", metrics[f"loss_{name}"], step)
                if not math.isnan(metrics[f"auc_{name}"]):
                    writer.add_scalar(f"val_auc/{name}", metrics[f"auc_{name}"], step)
            writer.flush()
            if progress:
                tqdm.write(f"fold {cfg.fold} epoch {epoch + 1}: train {metrics['train_loss']:.4f}  "
                           f"val {metrics['val_loss']:.4f}  (prior {baseline:.4f})  auc(any) {metrics['auc_any']:.3f}")
        if rt.distributed:
            dist.barrier()
    if writer is not None:
        writer.close()
    metrics.update(run_dir=str(out), prior_loss=baseline, rank=rt.rank)
    return metrics
