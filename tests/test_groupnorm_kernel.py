"""Fused GroupNorm (+ add) (+ SiLU) Triton kernel against torch.nn.functional, in the interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so the kernel runs on CPU.
The reference is F.silu(F.group_norm(x + add[..., None, None])) computed in float64.
"""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fastddpm.kernels import groupnorm as gn  # noqa: E402

NAN = float("nan")


@pytest.fixture
def kernel_only(monkeypatch):
    """Fail if the call falls back to the torch composition instead of running the kernel, and
    make the output buffer it allocates start NaN-filled, so unwritten elements fail."""
    if not gn._kernel_can_run(torch.empty(0)):
        pytest.skip("the Triton interpreter is not active (TRITON_INTERPRET=1 before importing triton)")

    def no_fallback(*args, **kwargs):
        raise AssertionError("group_norm_silu fell back to torch instead of running the Triton kernel")

    empty_like = torch.empty_like
    monkeypatch.setattr(gn, "_torch_group_norm_silu", no_fallback)
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(NAN))


@triton.jit
def _store_kernel(in_ptr, out_ptr):
    # out_ptr[0] = in_ptr[0] converted by a plain store (the conversion every kernel's store uses).
    tl.store(out_ptr, tl.load(in_ptr).to(out_ptr.dtype.element_ty))


def _store_truncates_bf16() -> bool:
    """Whether float32 -> bfloat16 stores truncate here (the Triton interpreter does; GPUs round
    to nearest even), which can double the rounding error of a bf16 output."""
    out = torch.zeros(1, dtype=torch.bfloat16)
    _store_kernel[(1,)](torch.tensor([1.0 + 3 * 2.0**-9]), out)
    return out.item() == 1.0


def _reference(x, weight, bias, groups, eps, add, silu, dtype):
    """silu(group_norm(x + add)) with every operand cast to dtype (float64: the reference)."""
    h = x.to(dtype)
    if add is not None:
        h = h + add.to(dtype)[:, :, None, None]
    y = F.group_norm(
        h, groups, None if weight is None else weight.to(dtype), None if bias is None else bias.to(dtype), eps
    )
    return F.silu(y) if silu else y


def _check(y, x, weight, bias, groups, eps, add, silu):
    ref = _reference(x, weight, bias, groups, eps, add, silu, torch.float64)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.isnan(y).any(), "NaN in the output"
    if x.dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        return
    err = (y.double() - ref).abs().max().item()
    err_torch = (_reference(x, weight, bias, groups, eps, add, silu, x.dtype).double() - ref).abs().max().item()
    slack = 1e-6
    if x.dtype == torch.bfloat16 and _store_truncates_bf16():
        slack += 2.0 ** (torch.frexp(ref.abs().max()).exponent.item() - 9)  # half a bf16 ulp at max |ref|
    assert err <= 2.0 * err_torch + slack, f"fused error {err:.3g} > 2x plain-torch {x.dtype} error {err_torch:.3g}"


def _inputs(shape, groups, dtype, *, channels_last=False, with_add=True, param_dtype=torch.float32):
    b, c = shape[:2]
    # An offset mean and a non-unit scale, so centring and variance both matter.
    x = (3.0 + 2.0 * torch.randn(shape)).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = (1.0 + 0.5 * torch.randn(c)).to(param_dtype)
    bias = (0.5 * torch.randn(c)).to(param_dtype)
    add = torch.randn(b, 2 * c)[:, ::2] if with_add else None  # strided [B, C] view
    return x, weight, bias, add


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_add", [False, True], ids=["noadd", "add"])
@pytest.mark.parametrize("silu", [False, True], ids=["nosilu", "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_torch(dtype, with_add, silu, channels_last, kernel_only):
    groups, eps = 4, 1e-6
    x, weight, bias, add = _inputs((2, 12, 5, 7), groups, dtype, channels_last=channels_last, with_add=with_add)
    y = gn.group_norm_silu(x, weight, bias, groups, eps, add=add, silu=silu)
    _check(y, x, weight, bias, groups, eps, add, silu)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_tile_groups(dtype, channels_last, kernel_only, monkeypatch):
    """Groups larger than one tile take the two-sweep path with merged statistics."""
    monkeypatch.setattr(gn, "_MAX_TILE", 16)  # 3 channels per group -> BLOCK_S = 4, 9 tiles of 35 positions
    groups, eps = 2, 1e-5
    x, weight, bias, add = _inputs((3, 6, 5, 7), groups, dtype, channels_last=channels_last)
    y = gn.group_norm_silu(x, weight, bias, groups, eps, add=add, silu=True)
    _check(y, x, weight, bias, groups, eps, add, True)


def test_params_in_x_dtype_and_no_affine(kernel_only):
    groups, eps = 3, 1e-6
    x, weight, bias, add = _inputs((2, 9, 4, 3), groups, torch.bfloat16, param_dtype=torch.bfloat16)
    _check(gn.group_norm_silu(x, weight, bias, groups, eps, add=add), x, weight, bias, groups, eps, add, True)
    _check(gn.group_norm_silu(x, None, None, groups, eps, add=add), x, None, None, groups, eps, add, True)


def test_non_mergeable_layout_and_one_channel_groups(kernel_only):
    x = torch.randn(2, 4, 6, 10)[:, :, :, ::2]  # spatial dims can't be flattened without a copy
    weight, bias = torch.randn(4), torch.randn(4)
    y = gn.group_norm_silu(x, weight, bias, 4, 1e-5, silu=False)
    _check(y, x, weight, bias, 4, 1e-5, None, False)


def test_grad_falls_back_to_differentiable_torch():
    x, weight, bias, add = _inputs((2, 8, 3, 5), 4, torch.float32)
    x.requires_grad_(True)
    y = gn.group_norm_silu(x, weight, bias, 4, 1e-6, add=add)
    assert y.requires_grad
    (g,) = torch.autograd.grad(y.square().sum(), x)
    x_ref = x.detach().double().requires_grad_(True)
    y_ref = _reference(x_ref, weight, bias, 4, 1e-6, add, True, torch.float64)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-5)


def test_inference_mode_with_requires_grad_params_uses_kernel(kernel_only):
    x, weight, bias, add = _inputs((2, 8, 3, 5), 2, torch.float32)
    weight.requires_grad_(True)
    with torch.no_grad():
        y = gn.group_norm_silu(x, weight, bias, 2, 1e-6, add=add)
    _check(y, x, weight.detach(), bias, 2, 1e-6, add, True)


def test_rejects_bad_arguments():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="divide"):
        gn.group_norm_silu(x, None, None, 4, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        gn.group_norm_silu(x, torch.ones(5), None, 3, 1e-5)
    with pytest.raises(ValueError, match="add"):
        gn.group_norm_silu(x, None, None, 3, 1e-5, add=torch.zeros(2, 6, 1))
