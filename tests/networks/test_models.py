"""The CNNs: timm names, ImageNet weights offline or from a file, checkpoints of another backbone."""

from __future__ import annotations

import pytest
import timm
import torch

from ichpipe.base.config import load_config
from ichpipe.networks.models import ModelError, create_model
from tests.conftest import REPO


def test_offline_pretrained_fails_with_advice(monkeypatch):
    import huggingface_hub.constants

    # no network in tests: the hub client reads HF_HUB_OFFLINE at import, so patch its constant
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"cannot load ImageNet weights for resnet18 .*model.pretrained=false or "
                                         r"model.weights=PATH"):
        create_model("resnet18", pretrained=True)


def test_local_weights_file_is_accepted(tmp_path):
    donor = timm.create_model("test_resnet", num_classes=1000)
    torch.save(donor.state_dict(), tmp_path / "imagenet.pth")
    model = create_model("test_resnet", weights=str(tmp_path / "imagenet.pth"))
    got, want = model.state_dict(), donor.state_dict()
    backbone = [k for k in want if not k.startswith("fc.")]
    assert backbone and all(torch.equal(got[k], want[k]) for k in backbone)
    assert got["fc.weight"].shape[0] == 6  # a fresh six-way head
    with pytest.raises(ModelError, match="model.weights: .*missing.pth: file not found"):
        create_model("test_resnet", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ModelError, match="unknown timm model 'resnet_nope'"):
        create_model("resnet_nope", pretrained=False)


def test_timm_tagged_names_are_models():
    # the 2nd place's weights are a tag of resnext101_32x8d; list_models() leaves tagged names out
    model = create_model("resnext101_32x8d.fb_wsl_ig1b_ft_in1k", pretrained=False)
    assert model.pretrained_cfg["tag"] == "fb_wsl_ig1b_ft_in1k" and model.fc.out_features == 6
    with pytest.raises(ModelError, match=r"no pretrained weights tagged 'resnext101_32x8d.nope' \(known: .*fb_wsl"):
        create_model("resnext101_32x8d.nope", pretrained=False)

    assert load_config(REPO / "configs" / "real" / "resnext101_384.yaml").model.backbone == \
        "resnext101_32x8d.fb_wsl_ig1b_ft_in1k"


def test_only_a_download_failure_is_called_offline(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(timm, "create_model", refuse)
    with pytest.raises(ModelError, match="offline"):
        create_model("resnet18", pretrained=True)

    def broken(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for ResNet: size mismatch for conv1.weight")

    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(ModelError,
                       match="cannot build resnet18 from timm's weights for resnet18: Error.s. in loading") \
            as info:
        create_model("resnet18", pretrained=True)
    assert "offline" not in str(info.value)

    def bug(*args, **kwargs):
        raise KeyError("a bug, not the network")

    monkeypatch.setattr(timm, "create_model", bug)
    with pytest.raises(KeyError):  # neither a download failure nor a config error: not disguised
        create_model("resnet18", pretrained=True)


def test_a_checkpoint_of_another_backbone_is_one_line(tmp_path):
    torch.save(timm.create_model("test_efficientnet", num_classes=6).state_dict(), tmp_path / "effnet.pt")
    with pytest.raises(ModelError, match=r"effnet.pt: not a checkpoint of model.backbone=test_resnet \(\d+ weights "
                                         r"missing \(e.g. .*\), \d+ unexpected"):
        create_model("test_resnet", pretrained=False, init_from=str(tmp_path / "effnet.pt"))
