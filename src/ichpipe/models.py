"""Models: any timm backbone with six outputs, ImageNet weights by default, local files accepted."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from ichpipe.io import InputError
from ichpipe.labels import N_LABELS


class ModelError(InputError):
    """The model cannot be built as configured; one line that says how to continue."""


def create_model(backbone: str, pretrained: bool = True, weights: str = "", init_from: str = "",
                 drop_rate: float = 0.0) -> nn.Module:
    """A timm ``backbone`` with a 6-way head.

    Args:
        pretrained: load ImageNet weights through timm (downloads unless cached).
        weights: a local file of ImageNet weights for the backbone (implies pretrained); the
            classifier is re-initialised for six outputs.
        init_from: a checkpoint of a previous ichpipe run (e.g. the half-resolution model before
            full-size fine-tuning); loaded after construction, head included.
    """
    if backbone not in timm.list_models():
        raise ModelError(f"model.backbone: unknown timm model {backbone!r}")
    kwargs = {"num_classes": N_LABELS, "drop_rate": drop_rate}
    if weights:
        if not Path(weights).exists():
            raise ModelError(f"model.weights: {weights}: file not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        pretrained = True
    try:
        model = timm.create_model(backbone, pretrained=pretrained, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
        if not pretrained or weights:
            raise
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot load ImageNet weights for {backbone} (offline? {reason}); "
                         f"set model.pretrained=false or model.weights=PATH to a local weights file") from None
    if init_from:
        if not Path(init_from).exists():
            raise ModelError(f"model.init_from: {init_from}: file not found")
        state = torch.load(init_from, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))
    return model
