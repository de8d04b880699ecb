"""Stage 3: per-slice embeddings and logits from each bagged epoch checkpoint, with flip TTA.

For fold k and every checkpoint ``runs/<experiment>/fold<k>/checkpoints/epoch<NN>.pt``, writes
``runs/<experiment>/fold<k>/embeddings/epoch<NN>/``::

    oof_ids.csv, test_ids.csv    image_id per row (the row order of the arrays)
    oof_emb.npy, test_emb.npy    (N, D) float32 pooled features, averaged over the TTA views
    oof_logits.npy, test_logits.npy  (N, 6) float32 logits, averaged over the TTA views
    *_views.npy                  (V, N, D) and (V, N, 6) per view, with ``embed.keep_views=true``
    done                         written last: a folder without it is redone

"oof" rows are the fold's held-out patients: the model of fold k never saw them, which is what lets
the sequence model of fold k train on them without leakage. TTA views: ``none``, ``hflip``
(left-right) and ``transpose`` (rows <-> columns), applied to the uint8 batch on the device.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ichpipe.config import Config, save_config
from ichpipe.data import SliceDataset, build_transform, normalize
from ichpipe.device import amp_settings, autocast, init_runtime
from ichpipe.io import InputError, atomic_path, write_text_atomic
from ichpipe.models import create_model
from ichpipe.paths import DataPaths, epoch_number, read_metadata, run_dir
from ichpipe.preprocess import output_name

VIEWS = {"none": lambda x: x, "hflip": lambda x: x.flip(-1), "transpose": lambda x: x.transpose(-1, -2)}


@torch.no_grad()
def embed_loader(model, loader: DataLoader, views: list[str], device, amp, progress: bool, desc: str):
    """(V, N, D) embeddings and (V, N, 6) logits for every batch of ``loader`` under each view."""
    model.eval()
    classifier = model.get_classifier()
    embs, logits = [], []
    for x, _, _ in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x = normalize(x.to(device, non_blocking=True))
        e_views, l_views = [], []
        for view in views:
            with autocast(device, amp[0], amp[1]):
                pooled = model.forward_head(model.forward_features(VIEWS[view](x).contiguous()), pre_logits=True)
                e_views.append(pooled.float())
                l_views.append(classifier(pooled).float())
        embs.append(torch.stack(e_views).cpu())
        logits.append(torch.stack(l_views).cpu())
    return torch.cat(embs, dim=1).numpy(), torch.cat(logits, dim=1).numpy()


def _save_npy(path, array) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=np.float32))


def embed_fold(cfg: Config, progress: bool = True) -> list[str]:
    """Embed the OOF and test slices with every selected checkpoint of ``cfg.fold``; returns the folders."""
    for view in cfg.embed.tta:
        if view not in VIEWS:
            raise InputError(f"embed.tta: unknown view {view!r}; choose from {', '.join(VIEWS)}")
    out = run_dir(cfg)
    ckpts = sorted((out / "checkpoints").glob("epoch*.pt"))
    if not ckpts:
        raise InputError(f"{out}/checkpoints: no epoch checkpoints; run `make train fold={cfg.fold}` first")
    if cfg.embed.epochs:
        ckpts = [c for c in ckpts if epoch_number(c) in cfg.embed.epochs]
    paths = DataPaths(cfg.data.root)
    meta = read_metadata(paths.root)
    png_dir = paths.processed / output_name(cfg.preprocess)
    tf = build_transform([], cfg.train.image_size, train=False)
    crop = 0.0 if cfg.train.crop_border else None
    sets = {"oof": meta[meta.fold == cfg.fold], "test": meta[meta.split == "test"]}
    rt = init_runtime()
    amp = amp_settings(cfg.train.amp, rt.device)
    model = create_model(cfg.model.backbone, pretrained=False).to(rt.device)
    written = []
    for ckpt in ckpts:
        folder = out / "embeddings" / ckpt.stem
        if (folder / "done").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        for name, rows in sets.items():
            ds = SliceDataset(rows, png_dir, tf, cfg.seed, crop)
            loader = DataLoader(ds, batch_size=cfg.embed.batch_size, num_workers=cfg.train.loader_workers,
                                pin_memory=rt.device.type == "cuda")
            emb, logits = embed_loader(model, loader, cfg.embed.tta, rt.device, amp, progress,
                                       f"fold {cfg.fold} {ckpt.stem} {name}")
            with atomic_path(folder / f"{name}_ids.csv") as tmp:
                pd.DataFrame({"image_id": ds.ids}).to_csv(tmp, index=False)
            _save_npy(folder / f"{name}_emb.npy", emb.mean(axis=0))
            _save_npy(folder / f"{name}_logits.npy", logits.mean(axis=0))
            if cfg.embed.keep_views:
                _save_npy(folder / f"{name}_emb_views.npy", emb)
                _save_npy(folder / f"{name}_logits_views.npy", logits)
        save_config(cfg, folder / "config.yaml")
        write_text_atomic(folder / "done", ",".join(cfg.embed.tta) + "\n")
        written.append(str(folder))
    return written
