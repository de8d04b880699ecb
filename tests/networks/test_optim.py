"""Optimisers and schedules by name; the accumulation groups; the optimizer step with loss scaling."""

from __future__ import annotations

import pytest
import torch

from ichpipe.base.errors import InputError
from ichpipe.networks.optim import accumulation_groups, make_optimizer, make_schedule
from ichpipe.stages.train import OptimizerStep, micro_batch, restore_scaler


def _lrs(schedule: str, warmup: int, total: int) -> list[float]:
    opt = make_optimizer("adam", [torch.nn.Parameter(torch.zeros(1))], 2e-5, 0.0)
    sched = make_schedule(opt, schedule, warmup, total)
    out = []
    for step in range(1, total + 1):
        sched.step_update(step)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_the_2nd_place_schedule_is_constant_and_ours_warms_up_then_decays():
    assert _lrs("constant", 0, 50) == [2e-5] * 50  # Adam 2e-5, no scheduler (their trainorig.py)
    warm = _lrs("constant", 4, 20)
    assert warm[:3] == sorted(warm[:3]) and warm[0] < 2e-5 and warm[4:] == [2e-5] * 16
    cos = _lrs("cosine", 4, 20)
    assert max(cos) == pytest.approx(2e-5) and cos[-1] < 1e-6 and cos[5:] == sorted(cos[5:], reverse=True)
    opt = make_optimizer("adamw", [torch.nn.Parameter(torch.zeros(1))], 1e-3, 0.01)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.01
    assert type(make_optimizer("adam", [torch.nn.Parameter(torch.zeros(1))], 1e-3, 0.0)) is torch.optim.Adam


def test_a_partial_last_accumulation_group_is_averaged_over_its_own_size():
    assert accumulation_groups(7, 3) == [3, 3, 3, 3, 3, 3, 1]
    assert accumulation_groups(6, 3) == [3] * 6 and accumulation_groups(5, 1) == [1] * 5
    # Gradients summed over a group with each loss divided by the group's size = the gradient of the mean
    # loss of its micro-batches: the last update of 7 micro-batches in groups of 3 follows its one batch fully.
    w = torch.nn.Parameter(torch.tensor(1.0))
    xs = torch.arange(1.0, 8.0)
    groups = accumulation_groups(len(xs), 3)
    grads, acc = [], torch.zeros(())
    for i, x in enumerate(xs):
        w.grad = None
        ((w * x) / groups[i]).backward()
        acc = acc + w.grad
        if (i + 1) % 3 == 0 or i + 1 == len(xs):
            grads.append(float(acc))
            acc = torch.zeros(())
    assert grads == pytest.approx([2.0, 5.0, 7.0])  # means of (1, 2, 3), (4, 5, 6) and (7)


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    assert micro_batch(64, 1, 4) == 16 and micro_batch(64, 2, 2) == 16
    with pytest.raises(InputError, match=r"train.batch_size=64 does not split into train.accumulate=1 x 3 "
                                         r"process\(es\); "
                                         r"use a multiple of 3 \(e.g. 63, 66\)"):
        micro_batch(64, 1, 3)
    with pytest.raises(InputError, match="use a multiple of 8"):
        micro_batch(4, 2, 4)


def test_fp16_resumed_from_a_run_without_loss_scaling_starts_the_scaler_afresh():
    off, on = torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    saved_off = off.state_dict()
    assert saved_off == {}  # what a CPU (or bf16) run's last.pt holds
    restore_scaler(on, saved_off)  # torch's own load_state_dict raises on an empty state
    assert on.get_scale() == 1024.0
    with pytest.raises(RuntimeError):
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(saved_off)
    other = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0)
    restore_scaler(other, on.state_dict())
    assert other.get_scale() == 1024.0
    restore_scaler(off, on.state_dict())  # a scaled run resumed without scaling: nothing to keep
    assert not off.is_enabled()


def test_the_optimizer_step_reads_the_scale_once_and_reports_a_skipped_update(monkeypatch):
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=256.0)
    step = OptimizerStep(opt, scaler)
    calls = []
    real = scaler.get_scale
    monkeypatch.setattr(scaler, "get_scale", lambda: calls.append(1) or real())
    for _ in range(3):
        opt.zero_grad()
        scaler.scale((w * 2).sum()).backward()
        assert step()
    assert len(calls) == 4  # once before the first step, then once per step
    assert torch.allclose(w.detach(), torch.full((3,), 1 - 3 * 0.2))
    opt.zero_grad()
    scaler.scale((w * float("inf")).sum()).backward()
    before = w.detach().clone()
    assert not step()  # overflow: skipped, the scale backs off
    assert torch.equal(w.detach(), before) and scaler.get_scale() == 128.0
    plain = OptimizerStep(opt, torch.amp.GradScaler("cpu", enabled=False))
    opt.zero_grad()
    (w * 2).sum().backward()
    assert plain()
