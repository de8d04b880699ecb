"""Models: any timm backbone with six outputs, ImageNet weights by default, local files accepted."""

from __future__ import annotations

from pathlib import Path

import timm
from timm.models import is_model_pretrained
from torch import nn

from ichpipe.base.errors import InputError, first_line, quote
from ichpipe.base.files import load_tensors
from ichpipe.base.labels import N_LABELS


class ModelError(InputError):
    """The model cannot be built as configured; one line that says how to continue."""


def create_model(backbone: str, pretrained: bool = True, weights: str = "", init_from: str = "",
                 drop_rate: float = 0.0, in_chans: int = 3, kwargs: dict | None = None) -> nn.Module:
    """A timm ``backbone`` with a 6-way head.

    Args:
        pretrained: load ImageNet weights through timm (downloads unless cached).
        weights: a local file of ImageNet weights for the backbone (implies pretrained); the
            classifier is re-initialised for six outputs.
        init_from: a checkpoint of a previous ichpipe run (e.g. the half-resolution model before
            full-size fine-tuning); loaded after construction, head included.
        in_chans: input channels (9 for 3 slices x 3 windows); timm adapts the pretrained first
            convolution (its RGB filters repeated and rescaled).
        kwargs: more arguments of ``timm.create_model`` (``model.kwargs``: e.g. a resnet's ``channels``).
    """
    # is_model takes timm's tagged names (resnext101_32x8d.fb_wsl_ig1b_ft_in1k), which list_models() leaves out.
    if not timm.is_model(backbone):
        raise ModelError(f"model.backbone: unknown timm model {quote(backbone)}")
    if "." in backbone and not is_model_pretrained(backbone):
        tags = ", ".join(timm.list_pretrained(backbone.split(".")[0] + ".*")[:8]) or "none"
        raise ModelError(f"model.backbone: timm has no pretrained weights tagged {quote(backbone)} (known: {tags})")
    kwargs = {**(kwargs or {}), "num_classes": N_LABELS, "drop_rate": drop_rate, "in_chans": in_chans}
    if weights:
        if not Path(weights).exists():
            raise ModelError(f"model.weights: {weights}: file not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        pretrained = True
    try:
        model = timm.create_model(backbone, pretrained=pretrained, **kwargs)
    except OSError as exc:  # a download that failed (requests', urllib's and the hub client's errors are OSErrors)
        if not pretrained or weights:
            raise
        reason = first_line(exc, 160)
        raise ModelError(f"cannot load ImageNet weights for {backbone} (offline? {reason}); "
                         f"set model.pretrained=false or model.weights=PATH to a local weights file") from None
    except TypeError as exc:  # an argument the architecture does not take (model.kwargs)
        raise ModelError(f"model.kwargs: {backbone} does not take {first_line(exc)}") from None
    except RuntimeError as exc:  # e.g. a local weights file of another architecture
        source = f"model.weights {weights}" if weights else f"timm's weights for {backbone}"
        raise ModelError(f"cannot build {backbone} from {source}: {first_line(exc)}") from None
    if init_from:
        if not Path(init_from).exists():
            raise ModelError(f"model.init_from: {init_from}: file not found")
        state = load_tensors(init_from)
        load_weights(model, state.get("model", state), init_from, backbone)
    return model


def load_weights(model: nn.Module, state: dict, source: str | Path, backbone: str) -> None:
    """Load an ichpipe checkpoint into ``model``; a checkpoint of another architecture is a one-line error."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        missing = [k for k in model.state_dict() if k not in state]
        extra = [k for k in state if k not in model.state_dict()]
        detail = (f"{len(missing)} weights missing (e.g. {missing[0]}), {len(extra)} unexpected (e.g. {extra[0]})"
                  if missing or extra else str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)[:200])
        raise ModelError(f"{source}: not a checkpoint of model.backbone={backbone} ({detail}); "
                         f"use the backbone it was trained with") from None


def load_checkpoint(path: str | Path, backbone: str, in_chans: int = 3, kwargs: dict | None = None) -> nn.Module:
    """A CNN of ``backbone`` (in eval mode, on the CPU) with the weights of the ichpipe checkpoint ``path``; floating
    weights as float32 (an fp16 bundle's are stored as float16)."""
    model = create_model(backbone, pretrained=False, in_chans=in_chans, kwargs=kwargs)
    state = load_tensors(path)
    load_weights(model, {n: t.float() if t.is_floating_point() else t for n, t in state.items()}, path, backbone)
    return model.eval()
