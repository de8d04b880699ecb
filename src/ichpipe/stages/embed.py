"""Stage 3: per-slice embeddings and logits from each bagged epoch checkpoint, with flip TTA.

For fold k and every checkpoint ``runs/<experiment>/fold<k>/checkpoints/epoch<NN>.pt``, writes
``runs/<experiment>/fold<k>/embeddings/epoch<NN>/``::

    oof_ids.csv, test_ids.csv    image_id per row (the row order of the arrays)
    oof_emb.npy, test_emb.npy    (N, D) pooled features, averaged over the TTA views (``embed.dtype``: float16)
    oof_logits.npy, test_logits.npy  (N, 6) float32 logits of the views' mean probability
    *_views.npy                  (V, N, D) and (V, N, 6) per view, with ``embed.keep_views=true``
    done                         written last: a folder without it is redone

"oof" rows are the fold's held-out patients: the model of fold k never saw them, which is what lets
the sequence model of fold k train on them without leakage. With ``embed.train=true`` the fold's
training patients are embedded too (``train_*``), for ``lstm.train_on=train`` or ``train_and_oof``. TTA views:
``none``, ``hflip`` (left-right) and ``transpose`` (rows <-> columns), applied to the uint8 batch on the device.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ichpipe.base.config import Config, describe_changes, may_replace, save_config
from ichpipe.base.device import amp_settings, init_runtime
from ichpipe.base.errors import InputError
from ichpipe.base.files import atomic_path, load_tensors, sweep_temp_files, write_text_atomic, writer_lock
from ichpipe.base.labels import N_LABELS
from ichpipe.base.paths import data_paths, epoch_number, read_metadata, run_dir
from ichpipe.networks.dataset import EvalInput, SliceDataset, image_cache, make_loader
from ichpipe.networks.inference import embed_loader
from ichpipe.networks.models import create_model, load_weights
from ichpipe.scoring.folds import check_fold_table

# The settings an embeddings folder depends on: a finished folder made with other values is kept and the stage
# stops (config.may_replace), unless replace=true redoes it.
EMBED_KEYS = ("seed", "model.backbone", "model.kwargs", "embed.tta", "embed.keep_views", "embed.train", "embed.dtype",
              "train.image_size", "train.crop_border", "train.amp", "preprocess.size", "preprocess.windows",
              "preprocess.mode", "preprocess.name")


def embed_fold(cfg: Config, progress: bool = True) -> list[str]:
    """Embed the OOF and test slices with every selected checkpoint of ``cfg.fold``; returns the folders."""
    out = run_dir(cfg)
    ckpts = sorted((out / "checkpoints").glob("epoch*.pt"))
    if not ckpts:
        raise InputError(f"{out}/checkpoints: no epoch checkpoints; run `make train fold={cfg.fold}` first")
    if cfg.embed.epochs:
        have = [epoch_number(c) for c in ckpts]
        missing = sorted(set(cfg.embed.epochs) - set(have))
        if missing:
            raise InputError(f"embed.epochs={cfg.embed.epochs}: no checkpoint of epoch(s) {missing} in "
                             f"{out}/checkpoints "
                             f"(it has {have}; epochs count from 0); train them first or choose from those")
        ckpts = [c for c in ckpts if epoch_number(c) in cfg.embed.epochs]
    with writer_lock(out, f"stage 3 (embed) of {cfg.experiment} fold {cfg.fold}"):
        return _embed(cfg, out, ckpts, progress)


def _embed(cfg: Config, out: Path, ckpts: list[Path], progress: bool) -> list[str]:
    paths = data_paths(cfg)
    meta = read_metadata(paths)
    check_fold_table(out, meta)
    png_dir = paths.pngs(cfg.preprocess)
    inp = EvalInput.of(cfg.train.image_size, cfg.train.crop_border, cfg.preprocess.mode)
    tf, crop, channels = inp.transform, inp.crop, inp.channels
    sets = {"oof": meta[meta.fold == cfg.fold], "test": meta[meta.split == "test"]}
    if cfg.embed.train:
        sets["train"] = meta[meta.fold.notna() & (meta.fold != cfg.fold)]
    rt = init_runtime(cfg.train.cudnn_benchmark)
    amp = amp_settings(cfg.train.amp, rt.device)
    emb_dtype = np.dtype(cfg.embed.dtype)
    model = create_model(cfg.model.backbone, pretrained=False, in_chans=channels, kwargs=cfg.model.kwargs).to(rt.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dim = getattr(model, "head_hidden_size", None) or model.num_features  # the width of forward_head(pre_logits)
    written = []
    for ckpt in ckpts:
        folder = out / "embeddings" / ckpt.stem
        if (folder / "done").exists():
            changed = may_replace(folder, cfg, EMBED_KEYS, "embeddings")
            if not changed and (folder / "done").stat().st_mtime >= ckpt.stat().st_mtime:
                continue
            reason = f"other settings: {describe_changes(changed)}" if changed else f"{ckpt.name} is newer"
            tqdm.write(f"fold {cfg.fold} {ckpt.stem}: redoing the embeddings ({reason})")
            (folder / "done").unlink()
        folder.mkdir(parents=True, exist_ok=True)
        sweep_temp_files(folder)  # a killed run's partial .npy files (GBs at real size)
        load_weights(model, load_tensors(ckpt), ckpt, cfg.model.backbone)
        for name, rows in sets.items():
            if rows.empty:
                raise InputError(f"{paths.metadata}: no {dict(oof='held-out', train='training').get(name, name)} "
                                 "images "
                                 f"for fold {cfg.fold}; run `make preprocess` with every DICOM in place")
            ds = SliceDataset(rows, png_dir, tf, cfg.seed, crop, channels=channels,
                              cache=image_cache(cfg.train.image_cache_mb))
            ds.check_files()
            loader = make_loader(ds, cfg.embed.batch_size, cfg.train.loader_workers, device=rt.device)
            n, v = len(ds), len(cfg.embed.tta)
            shapes = {"emb": (n, dim), "logits": (n, N_LABELS)}
            if cfg.embed.keep_views:
                shapes.update(emb_views=(v, n, dim), logits_views=(v, n, N_LABELS))
            with contextlib.ExitStack() as stack:  # every file appears (renamed) only when all are written
                arrays = {key: np.lib.format.open_memmap(stack.enter_context(atomic_path(folder / f"{name}_{key}.npy")),
                                                         mode="w+", dtype=emb_dtype if "emb" in key else np.float32,
                                                         shape=shape)
                          for key, shape in shapes.items()}
                embed_loader(model, loader, cfg.embed.tta, rt.device, amp, progress,
                             f"fold {cfg.fold} {ckpt.stem} {name}", arrays, cfg.train.channels_last)
                for a in arrays.values():
                    a.flush()
                del arrays
            with atomic_path(folder / f"{name}_ids.csv") as tmp:
                pd.DataFrame({"image_id": ds.ids}).to_csv(tmp, index=False)
        save_config(cfg, folder / "config.yaml")
        write_text_atomic(folder / "done", ",".join(cfg.embed.tta) + "\n")
        written.append(str(folder))
    return written
