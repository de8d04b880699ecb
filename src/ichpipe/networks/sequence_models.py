"""The sequence networks over a series' slices and running them: what stage 4 trains and `predict` runs (the
model kinds, the per-slice features they read, loading a saved bag, its mean prediction)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ichpipe.base.config import LstmConfig
from ichpipe.base.device import NO_AMP, Amp, autocast
from ichpipe.base.errors import InputError, first_line
from ichpipe.base.files import load_tensors
from ichpipe.base.labels import N_LABELS

KINDS = typing.get_args(LstmConfig.model_fields["kind"].annotation)  # the choices of lstm.kind


def z_encoding(z: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of slice positions in mm (B, T) → (B, T, dim): wavelengths from 2 mm to ~2 m."""
    half = dim // 2
    freq = 2 * torch.pi / (2.0 * 1000.0 ** (torch.arange(half, device=z.device, dtype=torch.float32) / max(half - 1,
                                                                                                           1)))
    angle = z[..., None].float() * freq
    enc = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
    return nn.functional.pad(enc, (0, dim - 2 * half))


def _packed(rnn: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A recurrent module over padded (B, T, F) inputs, packed so that padding never reaches it."""
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = rnn(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


class SequenceModel(nn.Module):
    """A sequence model over one series' slices.

    ``kind``: ``lstm`` (a stacked BiLSTM), ``gru`` (BiGRU), ``gru_attention`` (BiGRU, then multi-head
    self-attention over the series with a residual), or ``transformer`` (an encoder over the slices,
    positions from z in mm): their input per slice is [e, e - prev, e - next, CNN logits] and their
    output is added to the CNN logits (the head starts at zero: an untrained model predicts what the CNN
    did). ``lstm_2nd_place`` is the 2nd place's own network (darraghdog/rsna, scripts/trainlstm.py):
    input [e, e - prev, e - next] only, two single-layer BiLSTMs (``layers`` of them) whose outputs, a
    ReLU-linear map of each and the embedding (tiled to their width) are summed before the head, which
    starts as PyTorch initialises it. Padding is packed away (recurrent kinds) or masked (attention).

    ``blocks``: the widths of several CNNs' features side by side in ``emb`` (the ensemble's sequence model, the 1st
    place's: each CNN's embedding projected on its own to ``reduce_dim`` by Linear+ReLU, then concatenated).
    """

    def __init__(self, emb_dim: int, reduce_dim: int = 64, hidden: int = 64, layers: int = 2, dropout: float = 0.2,
                 kind: str = "lstm", heads: int = 4, blocks: tuple[int, ...] = ()):
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"lstm.kind={kind!r}: one of {', '.join(KINDS)}")
        self.kind = kind
        self.reverse_view = False  # predict_bag: also read each series backward (lstm.reverse_tta), set on loading
        self.blocks = tuple(int(b) for b in blocks)
        if self.blocks:
            if sum(self.blocks) != emb_dim or not reduce_dim:
                raise InputError(f"feature blocks {self.blocks} must add up to the width {emb_dim} and be projected "
                                 f"(reduce_dim > 0, got {reduce_dim})")
            self.reduces = nn.ModuleList(nn.Sequential(nn.Linear(b, reduce_dim), nn.ReLU()) for b in self.blocks)
            d = reduce_dim * len(self.blocks)
        else:
            self.reduce = nn.Sequential(nn.Linear(emb_dim, reduce_dim), nn.ReLU()) if reduce_dim else nn.Identity()
            d = reduce_dim or emb_dim
        width = 3 * d + N_LABELS
        if kind == "lstm_2nd_place":
            self.lstms = nn.ModuleList(nn.LSTM(3 * d if i == 0 else 2 * hidden, hidden, batch_first=True,
                                               bidirectional=True) for i in range(layers))
            self.linears = nn.ModuleList(nn.Linear(2 * hidden, 2 * hidden) for _ in range(layers))
        elif kind == "transformer":
            self.proj = nn.Linear(width, 2 * hidden)
            layer = nn.TransformerEncoderLayer(2 * hidden, heads, dim_feedforward=4 * hidden, dropout=dropout,
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        else:
            rnn = nn.LSTM if kind == "lstm" else nn.GRU
            self.lstm = rnn(width, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)
            if kind == "gru_attention":
                self.attention = nn.MultiheadAttention(2 * hidden, heads, dropout=dropout, batch_first=True)
                self.norm = nn.LayerNorm(2 * hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, N_LABELS)
        if kind != "lstm_2nd_place":
            nn.init.zeros_(self.head.weight)  # start as the CNN: the sequence model learns a correction
            nn.init.zeros_(self.head.bias)

    def forward(self, emb: torch.Tensor, logits: torch.Tensor, lengths: torch.Tensor,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) embeddings, (B, T, 6) CNN logits, (B,) lengths, (B, T) slice positions in mm from the
        series' first slice (transformer only; default 5 mm apart) → (B, T, 6) logits (padding: 0)."""
        if self.blocks:
            e = torch.cat([f(x) for f, x in zip(self.reduces, emb.split(self.blocks, dim=-1), strict=True)], dim=-1)
        else:
            e = self.reduce(emb)
        b, t, d = e.shape
        steps = torch.arange(t, device=e.device).expand(b, t)
        last = (lengths.to(e.device) - 1).clamp(min=0)[:, None]
        prev = e.gather(1, (steps - 1).clamp(min=0)[..., None].expand(b, t, d))  # first slice: itself
        nxt = e.gather(1, torch.minimum(steps + 1, last)[..., None].expand(b, t, d))  # last slice: itself
        valid = steps < lengths.to(e.device)[:, None]
        if self.kind == "lstm_2nd_place":
            h, hidden = torch.cat([e, e - prev, e - nxt], dim=-1), 0
            for rnn, linear in zip(self.lstms, self.linears, strict=True):
                h = _packed(rnn, h, lengths)
                hidden = hidden + h + torch.relu(linear(h))
            width = h.shape[-1]  # their h_embadd: the embedding repeated to the LSTMs' width
            hidden = hidden + e.repeat(1, 1, -(-width // d))[..., :width]
            return self.head(self.drop(hidden)) * valid.unsqueeze(-1)
        x = torch.cat([e, e - prev, e - nxt, logits], dim=-1)
        if self.kind == "transformer":
            pos = (z.to(e.device) if z is not None else steps * 5.0)
            h = self.proj(x)
            out = self.encoder(h + z_encoding(pos, h.shape[-1]), src_key_padding_mask=~valid)
        else:
            out = _packed(self.lstm, x, lengths)
            if self.kind == "gru_attention":
                attended, _ = self.attention(out, out, out, key_padding_mask=~valid, need_weights=False)
                out = self.norm(out + attended)
        return (logits + self.head(self.drop(out))) * valid.unsqueeze(-1)


@dataclass
class SliceFeatures:
    """Per-slice arrays of one set (OOF or test) in a common row order, plus the series that group them."""

    ids: np.ndarray  # (N,) image ids
    emb: np.ndarray  # (N, D)
    logits: np.ndarray  # (N, 6)
    labels: np.ndarray | None  # (N, 6) or None for the test set
    patients: np.ndarray  # (N,) PatientID
    series: list[np.ndarray]  # row indices of each series, in z order
    z: np.ndarray | None = None  # (N,) slice position in mm (metadata ``z``); None: 5 mm apart
    blocks: tuple[int, ...] = ()  # several CNNs' embeddings side by side in ``emb``: their widths (SequenceModel's)

    def batch(self, which: list[int], mean: np.ndarray, std: np.ndarray):
        """Padded tensors of the series ``which``: emb, logits, labels (or None), lengths, row indices, and z
        (mm from each series' first slice). One gather per array (a memory-mapped or float16 ``emb`` is read
        once, as float32), no loop over slices; padding is zero."""
        return self.batch_rows([self.series[i] for i in which], mean, std)

    def batch_rows(self, rows: list[np.ndarray], mean: np.ndarray, std: np.ndarray):
        """:meth:`batch` of explicit row sequences (a series, a window of one, or one reversed)."""
        lengths = np.array([len(r) for r in rows])
        t = int(lengths.max())
        valid = np.arange(t)[None, :] < lengths[:, None]  # (B, T)
        flat = np.concatenate(rows)  # the rows of the valid positions, series by series
        emb = np.zeros((len(rows), t, self.emb.shape[1]), np.float32)
        emb[valid] = (self.emb[flat] - mean) / std
        logits = np.zeros((len(rows), t, N_LABELS), np.float32)
        logits[valid] = self.logits[flat]
        labels = None
        if self.labels is not None:
            labels = np.zeros((len(rows), t, N_LABELS), np.float32)
            labels[valid] = self.labels[flat]
        z = np.zeros((len(rows), t), np.float32)
        if self.z is not None:
            z[valid] = np.abs(self.z[flat] - np.repeat(self.z[[r[0] for r in rows]], lengths))
        else:
            z[valid] = 5.0 * np.concatenate([np.arange(k) for k in lengths])
        return (torch.from_numpy(emb), torch.from_numpy(logits),
                torch.from_numpy(labels) if labels is not None else None,
                torch.from_numpy(lengths), rows, torch.from_numpy(z))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on ``device``: on a GPU through pinned memory without blocking (the copy overlaps the
    previous step's kernels), on the CPU as it is."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x


PREDICT_BATCH = 64  # series per prediction batch (no gradients: larger than the training batch)


def predict_rows(model: SequenceModel, feats: SliceFeatures, series: list[int], mean, std, batch_size: int,
                 device: torch.device, amp: Amp = NO_AMP, reverse_view: bool = False) -> np.ndarray:
    """(N, 6) probabilities for the rows of ``series`` (others stay NaN); with ``reverse_view`` the mean of the
    series read forward and read backward (the 1st place's test view)."""
    out = np.full((len(feats.ids), N_LABELS), np.nan, np.float32)
    model.eval()
    views = (False, True) if reverse_view else (False,)
    with torch.no_grad():
        for i in range(0, len(series), batch_size):
            for backward in views:
                rows = [feats.series[j][::-1] if backward else feats.series[j] for j in series[i:i + batch_size]]
                emb, logits, _, lengths, rows, z = feats.batch_rows(rows, mean, std)
                with autocast(device, amp):
                    lg = model(to_device(emb, device), to_device(logits, device), lengths, to_device(z, device))
                probs = torch.sigmoid(lg.float()).cpu().numpy()
                valid = np.arange(probs.shape[1])[None, :] < lengths.numpy()[:, None]
                flat = np.concatenate(rows)
                out[flat] = probs[valid] / len(views) if not backward else out[flat] + probs[valid] / len(views)
    return out


MODEL_KEYS = ("reduce_dim", "hidden", "layers", "dropout", "kind", "heads")  # what rebuilds a SequenceModel


def load_models(path: str | Path, device: torch.device | None = None) -> tuple[list[SequenceModel], np.ndarray,
                                                                               np.ndarray]:
    """The bagged models of a ``models.pt`` (weights only: safe to load from anyone) and their standardisation."""
    state = load_tensors(path)
    try:
        models = []
        for weights in state["bag"]:
            model = SequenceModel(state["emb_dim"], **state["lstm"], blocks=tuple(state.get("blocks", ())))
            model.load_state_dict(weights)
            model.reverse_view = bool(state.get("reverse_view", False))
            models.append(model.to(device or torch.device("cpu")).eval())
        return models, state["mean"].numpy(), state["std"].numpy()
    except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise InputError(f"{path}: not the sequence models stage 4 saves ({type(exc).__name__}: "
                         f"{first_line(exc, 120)})") from None


def predict_bag(models: list[SequenceModel], feats: SliceFeatures, mean, std, device=None, amp: Amp = NO_AMP
                ) -> np.ndarray:
    """(N, 6) mean probability of the bagged models over every series of ``feats`` (``amp``: as stage 4 ran; each
    series also read backward where the models were saved with ``lstm.reverse_tta``)."""
    series = list(range(len(feats.series)))
    return np.mean([predict_rows(m, feats, series, mean, std, PREDICT_BATCH, device or torch.device("cpu"), amp,
                                 m.reverse_view) for m in models], axis=0)


class ConcatColumns:
    """Several CNNs' per-slice arrays side by side, read lazily: row ``r`` is ``[a[maps[0][r]], a2[maps[1][r]], ...]``
    (each array in its own row order, often memory-mapped; never copied whole). What :class:`SliceFeatures` needs of
    an ``emb``: ``shape``, ``dtype`` and row indexing."""

    def __init__(self, arrays: list[np.ndarray], maps: list[np.ndarray]):
        self.arrays, self.maps = arrays, [np.asarray(m) for m in maps]
        self.widths = tuple(int(a.shape[1]) for a in arrays)
        self.shape = (len(self.maps[0]), sum(self.widths))
        self.dtype = np.result_type(*(a.dtype for a in arrays))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows)
        return np.concatenate([np.asarray(a[m[rows]], np.float32) for a, m in zip(self.arrays, self.maps,
                                                                                 strict=True)], axis=1)
