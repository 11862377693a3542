"""The registered op ``fastddpm::group_norm_silu`` (fastddpm/groupnorm.py) and its dispatch gate.

Each fused kernel (the C++ one for CPU; Triton, run here by the interpreter on CPU tensors) is compared
to float64 PyTorch: its max error must stay within 2x PyTorch's own float32 error. The op is checked
with ``torch.library.opcheck`` and traced by ``torch.compile(fullgraph=True)``, ``torch.jit.trace``,
``make_fx`` and ``FakeTensorMode``; autograd (reverse and forward mode) must get the plain composition.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD

import fastddpm.groupnorm as gnop
from fastddpm import dispatch
from fastddpm.backends import cpu
from fastddpm.groupnorm import group_norm_silu
from fastddpm.unet import UNet

OP = torch.ops.fastddpm.group_norm_silu.default
# Which backend can run is asked at test time, never at collection (asking the cpu backend builds it).
BACKENDS = ["cpu", "triton"]


def _require(backend: str) -> None:
    """Skip unless ``backend`` runs here (the cpu one: skip only without a compiler, as conftest's fixture)."""
    if backend == "cpu":
        ok, why = cpu.available("cpu")
    else:
        ok, why = dispatch.availability("triton", "cpu")  # the interpreter (tests/conftest.py)
    if not ok:
        pytest.skip(f"{backend} backend: {why}")


def _reference(x, weight, bias, groups, eps, add, silu):
    """float64 silu(group_norm(x + add)) on contiguous data (PyTorch's channels_last CPU path is inexact)."""
    h = x.double().contiguous()
    if add is not None:
        h = h + add.double()[:, :, None, None]
    y = F.group_norm(
        h, groups, None if weight is None else weight.double(), None if bias is None else bias.double(), eps
    )
    return F.silu(y) if silu else y


def _pytorch_float32(x, weight, bias, groups, eps, add, silu):
    """PyTorch's own float32 composition: the yardstick of the fused kernels' error."""
    h = x.contiguous() if add is None else x.contiguous() + add[:, :, None, None]
    y = F.group_norm(h, groups, weight, bias, eps)
    return F.silu(y) if silu else y


def _max_err(y, ref):
    return float((y.double() - ref).abs().max())


def _inputs(b, c, h, w, *, channels_last, affine, with_add):
    x = torch.randn(b, c, h, w) * 2.0 + 0.75  # mean away from 0: the variance must not cancel
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    add = torch.randn(b, c) if with_add else None
    return x, weight, bias, add


SHAPES = [(3, 12, 5, 7, 4), (2, 6, 1, 1, 3), (1, 16, 9, 3, 2)]  # (B, C, H, W, groups), odd sizes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last,with_add,silu", list(itertools.product([False, True], repeat=3)))
def test_op_error_within_twice_pytorch_float32(backend, shape, channels_last, with_add, silu):
    _require(backend)
    b, c, h, w, g = shape
    x, weight, bias, add = _inputs(b, c, h, w, channels_last=channels_last, affine=True, with_add=with_add)
    y = group_norm_silu(x, weight, bias, g, 1e-5, add=add, silu=silu, backend=backend)
    ref = _reference(x, weight, bias, g, 1e-5, add, silu)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    plain = _pytorch_float32(x, weight, bias, g, 1e-5, add, silu)
    # 2x PyTorch's own float32 max error, plus a floor of a few float32 ulps of the output's scale.
    assert _max_err(y, ref) <= 2 * _max_err(plain, ref) + 4 * torch.finfo(torch.float32).eps * float(ref.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_is_copied_not_misread(backend):
    """A layout that is neither contiguous nor channels_last goes through a contiguous copy."""
    _require(backend)
    base = torch.randn(2, 8, 10, 6)
    x = base[:, :, ::2, 1:]  # [2, 8, 5, 5], strided
    y = group_norm_silu(x, None, None, 4, 1e-5, backend=backend)
    ref = _reference(x, None, None, 4, 1e-5, None, True)
    assert _max_err(y, ref) <= 2 * _max_err(_pytorch_float32(x, None, None, 4, 1e-5, None, True), ref) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine,with_add", [(True, True), (False, False)])
def test_opcheck(backend, channels_last, affine, with_add):
    _require(backend)
    x, weight, bias, add = _inputs(2, 8, 3, 5, channels_last=channels_last, affine=affine, with_add=with_add)
    torch.library.opcheck(OP, (x, weight, bias, add, 4, 1e-5, True, backend))


@pytest.mark.usefixtures("cpu_extension")
def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv("FASTDDPM_FUSED_NORM", raising=False)
    cpu_dev = torch.device("cpu")
    resolve = dispatch.resolve_groupnorm_backend
    assert resolve(cpu_dev, torch.float32, "channels_last") == "cpu"
    assert resolve(cpu_dev, torch.float32, "contiguous") == "torch"  # PyTorch is as fast on NCHW
    assert resolve(cpu_dev, torch.float64, "channels_last") == "torch"
    assert resolve(cpu_dev, torch.bfloat16, "channels_last") == "torch"
    assert resolve(cpu_dev, torch.float32, "contiguous", "cpu") == "cpu"
    assert resolve(cpu_dev, torch.float32, "channels_last", "torch") == "torch"
    monkeypatch.setenv("FASTDDPM_FUSED_NORM", "0")
    assert resolve(cpu_dev, torch.float32, "channels_last") == "torch"
    assert resolve(cpu_dev, torch.float32, "channels_last", "cpu") == "cpu"  # a name beats the switch
    with pytest.raises(ValueError, match="unknown GroupNorm backend 'cuda'.*allowed"):
        resolve(cpu_dev, torch.float32, "contiguous", "cuda")
    with pytest.raises(ValueError, match="unknown layout"):
        resolve(cpu_dev, torch.float32, "nhwc")
    with pytest.raises(RuntimeError, match="'cpu'.*float32"):
        resolve(cpu_dev, torch.float16, "contiguous", "cpu")
    with pytest.raises(RuntimeError, match="'cpu' cannot run here"):
        resolve(torch.device("meta"), torch.float32, "contiguous", "cpu")


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm_silu(x, None, None, 3, 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        group_norm_silu(x, torch.ones(7), None, 4, 1e-5)
    with pytest.raises(ValueError, match=r"add must have shape \[2, 8\]"):
        group_norm_silu(x, None, None, 4, 1e-5, add=torch.ones(8))
    with pytest.raises(ValueError, match="x must be"):
        group_norm_silu(torch.randn(8), None, None, 4, 1e-5)
    with pytest.raises(ValueError, match="bias is on meta"):
        group_norm_silu(x, None, torch.ones(8, device="meta"), 4, 1e-5)


@pytest.fixture
def fused_everywhere(monkeypatch):
    """Dispatch picks the C++ kernel for every call (layout and dtype aside), and calls are counted."""
    _require("cpu")
    calls = []
    real = cpu.group_norm_silu
    monkeypatch.setattr(gnop, "resolve_groupnorm_backend", lambda *a, **k: "cpu")
    monkeypatch.setattr(cpu, "group_norm_silu", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_reverse_mode_autograd_gets_the_composition(fused_everywhere):
    """Any tensor argument that requires grad (with grad mode on) keeps the call differentiable."""
    x, weight, bias, add = _inputs(2, 8, 4, 4, channels_last=False, affine=True, with_add=True)
    for needs in ("x", "weight", "bias", "add"):
        args = {"x": x.clone(), "weight": weight.clone(), "bias": bias.clone(), "add": add.clone()}
        args[needs].requires_grad_()
        y = group_norm_silu(args["x"], args["weight"], args["bias"], 4, 1e-5, add=args["add"])
        grad = torch.autograd.grad(y.square().sum(), args[needs])[0]
        d = {k: v.detach().double().requires_grad_(k == needs) for k, v in args.items()}
        ref = torch.autograd.grad(
            _reference(d["x"], d["weight"], d["bias"], 4, 1e-5, d["add"], True).square().sum(), d[needs]
        )[0]
        assert float((grad.double() - ref).norm() / ref.norm()) < 1e-5, needs
    assert not fused_everywhere
    with torch.no_grad():  # grad mode off: the kernel runs even on parameters that require grad
        group_norm_silu(x, weight.requires_grad_(), bias, 4, 1e-5, add=add)
    assert len(fused_everywhere) == 1
    with pytest.raises(RuntimeError, match="no backward"):
        group_norm_silu(x.requires_grad_(), None, None, 4, 1e-5, backend="cpu")


def test_forward_mode_ad_gets_the_composition(fused_everywhere):
    """A forward-AD tangent (fwAD dual tensors, torch.func.jvp) must not be dropped by the opaque kernel."""
    x, weight, bias, add = _inputs(2, 8, 4, 4, channels_last=False, affine=True, with_add=True)
    tangent = torch.randn_like(x)
    xd, td = x.double().requires_grad_(), tangent.double()
    ref = torch.autograd.functional.jvp(lambda v: _reference(v, weight, bias, 4, 1e-5, add, True), xd, td)[1]
    with fwAD.dual_level():
        out = group_norm_silu(fwAD.make_dual(x, tangent), weight, bias, 4, 1e-5, add=add)
        got = fwAD.unpack_dual(out).tangent
    assert got is not None and float((got.double() - ref).norm() / ref.norm()) < 1e-5
    _, got = torch.func.jvp(lambda v: group_norm_silu(v, weight, bias, 4, 1e-5, add=add), (x,), (tangent,))
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-5
    assert not fused_everywhere


@pytest.mark.usefixtures("cpu_extension")
def test_make_fx_and_fake_tensors_see_the_op():
    """make_fx records one op node; FakeTensorMode runs the fake (right shape and channels_last strides)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x, weight, bias, add = _inputs(2, 8, 4, 4, channels_last=True, affine=True, with_add=True)
    gm = make_fx(lambda v, a: group_norm_silu(v, weight, bias, 4, 1e-5, add=a))(x, add)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [OP]
    ref = _reference(x, weight, bias, 4, 1e-5, add, True)
    plain = _pytorch_float32(x, weight, bias, 4, 1e-5, add, True)
    assert _max_err(gm(x, add), ref) <= 2 * _max_err(plain, ref) + 1e-6
    with FakeTensorMode() as mode:
        fx, fw, fb, fa = (mode.from_tensor(t) for t in (x, weight, bias, add))
        y = group_norm_silu(fx, fw, fb, 4, 1e-5, add=fa)
    assert isinstance(y, FakeTensor) and y.shape == x.shape and y.stride() == x.stride()


def _graph_recorder(seen: list):
    def backend(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    return backend


@pytest.mark.usefixtures("cpu_extension")
def test_compile_fullgraph_traces_through_the_op():
    """torch.compile(fullgraph=True) of the op alone (aot_eager: fake + functionalisation) and of the whole
    channels_last U-Net (no graph break; the GroupNorms are op nodes, not plain ops)."""
    torch._dynamo.reset()
    x, weight, bias, add = _inputs(2, 8, 4, 4, channels_last=True, affine=True, with_add=True)
    fn = torch.compile(
        lambda v, a: group_norm_silu(v, weight, bias, 4, 1e-5, add=a) * 2, fullgraph=True, backend="aot_eager"
    )
    ref = 2 * _reference(x, weight, bias, 4, 1e-5, add, True)
    plain = 2 * _pytorch_float32(x, weight, bias, 4, 1e-5, add, True)
    assert _max_err(fn(x, add), ref) <= 2 * _max_err(plain, ref) + 1e-6

    model = UNet.from_preset("digits").eval().to(memory_format=torch.channels_last)
    xs = torch.randn(3, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (3,))
    seen: list = []
    compiled = torch.compile(model, fullgraph=True, backend=_graph_recorder(seen))
    with torch.no_grad():
        out = compiled(xs, t)
        exact = model.double()(xs.double(), t)
        model.float()
        eager = model(xs, t)
    n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert seen.count(OP) == n_norms
    assert F.group_norm not in seen
    rel = lambda a: float((a.double() - exact).norm() / exact.norm())
    assert rel(out) <= 2 * rel(eager) + 1e-6
    torch._dynamo.reset()


@pytest.mark.usefixtures("cpu_extension")
def test_jit_trace_records_the_op():
    """jit.trace of the channels_last U-Net holds the op (not an empty output) and replays on new inputs."""
    model = UNet.from_preset("digits").eval().to(memory_format=torch.channels_last)
    x = torch.randn(3, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (3,))
    with torch.no_grad():
        traced = torch.jit.trace(model, (x, t), check_trace=False)
        assert "fastddpm::group_norm_silu" in str(traced.inlined_graph)
        x2 = torch.randn(3, 1, 8, 8).contiguous(memory_format=torch.channels_last)
        got, eager = traced(x2, t), model(x2, t)
        exact = model.double()(x2.double(), t)
    rel = lambda a: float((a.double() - exact).norm() / exact.norm())
    assert rel(got) <= 2 * rel(eager) + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_auto_runs_triton_within_twice_pytorch(dtype, channels_last):
    """On CUDA, "auto" picks the Triton kernel; its error against float64 stays within 2x PyTorch's own
    error in the same dtype (plus one rounding of the output), and the op passes opcheck there."""
    assert dispatch.resolve_groupnorm_backend(torch.device("cuda"), dtype, "contiguous") == "triton"
    x, weight, bias, add = (
        None if t is None else t.cuda()
        for t in _inputs(4, 64, 9, 7, channels_last=channels_last, affine=True, with_add=True)
    )
    x = x.to(dtype)
    y = group_norm_silu(x, weight, bias, 8, 1e-6, add=add)
    ref = _reference(x, weight, bias, 8, 1e-6, add, True)
    plain = F.silu(F.group_norm(x + add.to(dtype)[:, :, None, None], 8, weight.to(dtype), bias.to(dtype), 1e-6))
    assert y.dtype == dtype and y.stride() == x.stride()
    assert _max_err(y, ref) <= 2 * _max_err(plain, ref) + torch.finfo(dtype).eps * float(ref.abs().max())
    torch.library.opcheck(OP, (x, weight, bias, add, 8, 1e-6, True, "triton"))


def test_interpreted_kernel_is_never_launched_on_cuda_tensors():
    """Under TRITON_INTERPRET=1 (this suite) the GroupNorm kernel is interpreted: fine for CPU tensors, never
    for CUDA ones, where it would run in numpy on the host (gpu_check clears the variable)."""
    import importlib
    import types

    from triton.runtime.interpreter import InterpretedFunction

    gk = importlib.import_module("fastddpm.kernels.groupnorm")

    if not isinstance(gk._group_norm_silu_kernel, InterpretedFunction):
        pytest.skip("Triton compiles for the GPU here")
    fake_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"))
    assert not gk._kernel_can_run(fake_cuda)
    assert gk._kernel_can_run(torch.zeros(1))
