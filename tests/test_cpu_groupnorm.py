"""The fused CPU GroupNorm (+ time-embedding add) (+ SiLU) of csrc/cpu_groupnorm.cpp against float64
PyTorch, and its use by the U-Net on channels_last CPU activations."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastddpm.backends import cpu
from fastddpm.unet import UNet, _norm_act

pytestmark = pytest.mark.usefixtures("cpu_extension")  # tests/conftest.py: built on first use, not at import


def _reference(x, weight, bias, groups, eps, add, silu):
    h = x.double().contiguous()  # PyTorch's channels_last CPU group_norm is inexact for |mean| >> std, even in float64
    if add is not None:
        h = h + add.double()[:, :, None, None]
    y = F.group_norm(
        h, groups, None if weight is None else weight.double(), None if bias is None else bias.double(), eps
    )
    return F.silu(y) if silu else y


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


SHAPES = [(3, 12, 5, 7, 4), (2, 64, 8, 8, 32), (1, 96, 17, 3, 32), (4, 6, 1, 1, 3), (2, 8, 40, 40, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last,with_add,silu,affine", list(itertools.product([False, True], repeat=4)))
def test_matches_float64(shape, channels_last, with_add, silu, affine):
    b, c, h, w, g = shape
    x = torch.randn(b, c, h, w) * 3.0 + 1.5  # a mean far from 0: the variance must not cancel badly
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    add = torch.randn(b, c) * 2.0 if with_add else None
    y = cpu.group_norm_silu(x, weight, bias, g, 1e-5, add=add, silu=silu)
    ref = _reference(x, weight, bias, g, 1e-5, add, silu)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y, ref) < 1e-5
    plain = F.group_norm(x if add is None else x + add[:, :, None, None], g, weight, bias, 1e-5)
    plain = F.silu(plain) if silu else plain  # PyTorch's own float32 composition
    assert float((y.double() - ref).abs().max()) <= 2 * float((plain.double() - ref).abs().max()) + 1e-6


def test_add_of_another_dtype_and_strides_is_accepted():
    x = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last)
    add = torch.randn(16, 2, dtype=torch.float64).t()  # [B, C], not contiguous, float64
    y = cpu.group_norm_silu(x, None, None, 4, 1e-6, add=add)
    assert _rel(y, _reference(x, None, None, 4, 1e-6, add, True)) < 1e-5


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: cpu.group_norm_silu(x.double(), None, None, 4, 1e-5), "float32"),
        (lambda x: cpu.group_norm_silu(x, None, None, 5, 1e-5), "must divide"),
        (lambda x: cpu.group_norm_silu(x[:, :, ::2], None, None, 4, 1e-5), "contiguous or channels_last"),
        (lambda x: cpu.group_norm_silu(x, torch.ones(7), None, 4, 1e-5), r"\[C\]"),
        (lambda x: cpu.group_norm_silu(x, None, None, 4, 1e-5, add=torch.ones(2, 7)), r"\[B, C\]"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 8, 6, 6))


def test_unet_uses_it_on_channels_last_cpu_and_matches(monkeypatch):
    """``_norm_act`` routes float32 channels_last CPU activations to the fused kernel (not NCHW ones,
    where PyTorch is as fast), and the U-Net output matches the plain path to float32 rounding."""
    calls = []
    real = cpu.group_norm_silu
    monkeypatch.setattr(cpu, "group_norm_silu", lambda *a, **k: calls.append(1) or real(*a, **k))
    norm = torch.nn.GroupNorm(4, 12)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    h = torch.randn(3, 12, 5, 7)
    add = torch.randn(3, 12)
    with torch.no_grad():
        a = _norm_act(norm, h.to(memory_format=torch.channels_last), add=add)
        assert len(calls) == 1
        _norm_act(norm, h, add=add)  # NCHW: PyTorch
        assert len(calls) == 1
        monkeypatch.setenv("FASTDDPM_FUSED_NORM", "0")
        _norm_act(norm, h.to(memory_format=torch.channels_last), add=add)
        assert len(calls) == 1
    ref = _reference(h, norm.weight.detach(), norm.bias.detach(), 4, norm.eps, add, True)
    assert _rel(a, ref) < 1e-5

    monkeypatch.delenv("FASTDDPM_FUSED_NORM")
    torch.manual_seed(0)
    model = UNet.from_preset("digits").eval()
    x, t = torch.randn(5, 1, 8, 8), torch.randint(0, 1000, (5,))
    with torch.no_grad():
        exact = model.double()(x.double(), t)
        model.float()
        cl = model.to(memory_format=torch.channels_last)
        calls.clear()
        fused = cl(x.contiguous(memory_format=torch.channels_last), t)
        assert len(calls) > 10  # every res block's two norms (and the output norm)
        monkeypatch.setenv("FASTDDPM_FUSED_NORM", "0")
        plain = cl(x.contiguous(memory_format=torch.channels_last), t)
    assert _rel(fused, exact) <= max(2 * _rel(plain, exact), 1e-6)


def test_training_keeps_autograd():
    """With gradients needed, _norm_act stays on differentiable PyTorch ops."""
    norm = torch.nn.GroupNorm(2, 8)
    h = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    _norm_act(norm, h, add=torch.randn(2, 8)).sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("outlier", [50.0, 1000.0])
def test_an_outlier_at_the_pivot_does_not_cost_precision(channels_last, outlier):
    """The statistics pivot on one element of the group; an outlier there must not make E[d^2] - E[d]^2
    cancel (within 2x PyTorch's float32 error, both layouts)."""
    x = torch.randn(2, 64, 32, 32)
    x[:, ::8, 0, 0] = outlier  # the first position of every group's first channel
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = cpu.group_norm_silu(x, None, None, 8, 1e-5, silu=False)
    ref = _reference(x, None, None, 8, 1e-5, None, False)
    plain = F.group_norm(x.contiguous(), 8, None, None, 1e-5)
    assert float((y.double() - ref).abs().max()) <= 2 * float((plain.double() - ref).abs().max()) + 1e-6


def test_bias_only_fine_tuning_keeps_its_gradient(monkeypatch):
    """A norm whose bias alone needs a gradient stays on differentiable PyTorch ops.

    (The backward itself is run on NCHW input: PyTorch 2.13's CPU group_norm backward crashes with a
    segmentation fault on channels_last input when only the bias requires grad -- a PyTorch bug, seen
    here with plain ``F.group_norm``, not a path of ours.)"""
    calls = []
    monkeypatch.setattr(cpu, "group_norm_silu", lambda *a, **k: calls.append(1))
    norm = torch.nn.GroupNorm(2, 8)
    norm.weight.requires_grad_(False)
    h = torch.randn(2, 8, 4, 4)  # no grad upstream
    assert _norm_act(norm, h.to(memory_format=torch.channels_last)).requires_grad and not calls
    _norm_act(norm, h).sum().backward()
    assert norm.bias.grad is not None and torch.isfinite(norm.bias.grad).all()
    monkeypatch.undo()
    plain = torch.nn.GroupNorm(2, 8, affine=False)
    cl = h.to(memory_format=torch.channels_last)
    assert _rel(_norm_act(plain, cl), _reference(cl, None, None, 2, plain.eps, None, True)) < 1e-5  # no parameters
