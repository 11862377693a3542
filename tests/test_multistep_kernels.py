"""The fused multistep-solver step (``MS_*`` of fastddpm._layout) on every backend that runs here.

* every backend within float32 rounding bounds of the float64 reference (bounds derived per element
  from the terms of the formula, not tuned);
* reference-float32, cpu and triton bit for bit equal with caller noise or none (same op order, no FMA);
* in-kernel SDE noise keyed by (seed, sample_offset + b, tval[step], element, STREAM_SDE);
* the ring buffer over several steps equals the shifting-history spec of ``fastddpm.solvers``;
* the driver's two-pass dynamic thresholding; argument errors. (The C++ header's constants are
  checked against fastddpm._layout in test_cuda_compile.py.)
"""

from __future__ import annotations

import os

import pytest
import torch

from fastddpm import _layout as L
from fastddpm import driver
from fastddpm.backends import reference as ref_backend
from fastddpm.dispatch import availability, backend_module
from fastddpm.noise import philox_normal
from fastddpm.schedule import Schedule

EPS32 = 2.0**-24  # unit roundoff of float32
# With FASTDDPM_TEST_DEVICE=cuda (benchmarks/gpu_check.py) the fused backends run CUDA tensors; the spec stays on CPU.
DEVICE = torch.device(os.environ.get("FASTDDPM_TEST_DEVICE", "cpu"))
FUSED = ("cuda", "triton") if DEVICE.type == "cuda" else ("cpu", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NOISE_MODES = (L.NOISE_NONE, L.NOISE_TENSOR, L.NOISE_PHILOX)
CLIP_MODES = (L.CLIP_NONE, L.CLIP_RANGE, L.CLIP_THRESHOLD)
SHAPES = ((3, 37), (1, 1), (2, 5 * 7 * 3), (4, 257))


def _device(name: str) -> torch.device:
    return torch.device("cpu") if name == "reference" else DEVICE


def _runnable(name: str) -> bool:
    return name == "reference" or availability(name, DEVICE)[0]


def _launcher(name: str):
    """The backend's multistep launcher, running on the backend's device with CPU tensors in and out."""
    if not _runnable(name):
        pytest.skip(f"{name}: {availability(name, DEVICE)[1]}")
    launch, dev = backend_module(name).multistep, _device(name)
    if dev.type == "cpu":
        return launch

    def on_device(*args, **kw):
        moved = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
        launch(*moved, **kw)
        for a, b in zip(args, moved):
            if isinstance(a, torch.Tensor) and b is not a:
                a.copy_(b.cpu())

    return on_device


def _case(shape, dtype, steps=5, seed=0):
    """Random state, model output (``dtype``), coefficient table and indices of one launch."""
    g = torch.Generator().manual_seed(seed)
    b, n = shape
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    coef = r(steps, L.NMS) * 0.7
    coef[:, L.MS_PZ] = r(steps).abs() * 0.3
    return dict(
        x=r(b, n), m=r(b, n).to(dtype), xp=r(b, n), hist=r(L.MS_HIST, b, n), noise=r(b, n), coef=coef,
        tval=torch.randint(0, 1000, (steps,), generator=g), thresh=r(b).abs() + 0.5,
        rng=torch.tensor([int(torch.randint(0, 2**62, (1,), generator=g)), 11]),
    )  # fmt: skip


def _run(launch, c, step, *, clip, noise_mode, dtype=torch.float32, coef=None, x0_only=False):
    """Launch once on copies of the case's state (``dtype``: float32, or float64 for the spec)."""
    state = {k: c[k].clone().to(dtype) for k in ("x", "xp", "hist")}
    x0 = torch.full(c["x"].shape, float("nan"), dtype=dtype) if x0_only else None  # poisoned output
    m = c["m"].to(dtype) if dtype == torch.float64 else c["m"]
    noise = c["noise"].to(dtype) if noise_mode == L.NOISE_TENSOR else None
    launch(state["x"], m, state["xp"], state["hist"], noise, x0, c["coef"] if coef is None else coef, c["tval"],
           torch.tensor([step]), c["thresh"], c["rng"], clip_mode=clip, clip_range=0.9, noise_mode=noise_mode,
           x0_only=x0_only)  # fmt: skip
    return x0 if x0_only else state


def _bounds(c, step, clip):
    """Per-element float32 error bounds of (x', xc, D0) against exact arithmetic on the same inputs,
    propagated term by term: each product and sum adds at most one rounding of its magnitude."""
    k = c["coef"][step].double()
    x, xp, m = c["x"].double(), c["xp"].double(), c["m"].double()
    hist = c["hist"].double()
    d1, d2, d3 = (hist[(step - j) % L.MS_HIST] for j in (1, 2, 3))
    d0_terms = (k[L.MS_CX] * x).abs() + (k[L.MS_CM] * m).abs()
    e_d0 = 3 * EPS32 * d0_terms
    d0 = k[L.MS_CX] * x + k[L.MS_CM] * m
    if clip == L.CLIP_RANGE:
        d0 = d0.clamp(-0.9, 0.9)
    if clip == L.CLIP_THRESHOLD:
        s = c["thresh"].double()[:, None]
        d0 = torch.clamp(d0, -s, s) / s
        e_d0 = e_d0 / s + EPS32 * d0.abs()
    xc_terms = [k[L.MS_KX] * x, k[L.MS_KXP] * xp, k[L.MS_KD0] * d0, k[L.MS_KD1] * d1, k[L.MS_KD2] * d2,
                k[L.MS_KD3] * d3]  # fmt: skip
    xc = sum(xc_terms)
    e_xc = k[L.MS_KD0].abs() * e_d0 + 7 * EPS32 * sum(t.abs() for t in xc_terms)
    xn_terms = [k[L.MS_PX] * xc, k[L.MS_PD0] * d0, k[L.MS_PD1] * d1, k[L.MS_PD2] * d2, k[L.MS_PZ] * 6.0]
    e_xn = k[L.MS_PX].abs() * e_xc + k[L.MS_PD0].abs() * e_d0 + 7 * EPS32 * sum(t.abs() for t in xn_terms)
    # float32 Box-Muller against float64 on the same uniforms: a few ulps of |z| <= 5.6, plus the
    # absolute error of the polynomial sin/cos (fastddpm_math.h)
    e_xn = e_xn + k[L.MS_PZ].abs() * (64 * EPS32 * 6.0 + 1e-7)
    return e_xn, e_xc, e_d0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noise_mode", NOISE_MODES)
@pytest.mark.parametrize("clip", CLIP_MODES)
@pytest.mark.parametrize("backend", ("reference", *FUSED))
def test_fused_step_within_float32_bounds_of_the_float64_spec(backend, clip, noise_mode, dtype, shape):
    launch = _launcher(backend)
    c = _case(shape, dtype, seed=hash((clip, noise_mode, str(dtype), shape)) % 1000)
    step = int(torch.randint(0, 5, (1,)))
    spec = _run(ref_backend.multistep, c, step, clip=clip, noise_mode=noise_mode, dtype=torch.float64,
                coef=c["coef"].double())  # fmt: skip
    got = _run(launch, c, step, clip=clip, noise_mode=noise_mode)
    e_xn, e_xc, e_d0 = _bounds(c, step, clip)
    slot = step % L.MS_HIST
    for name, out, want, bound in (("x", got["x"], spec["x"], e_xn), ("xp", got["xp"], spec["xp"], e_xc),
                                   ("D0", got["hist"][slot], spec["hist"][slot], e_d0)):  # fmt: skip
        err = (out.double() - want).abs()
        assert torch.isfinite(out).all(), name
        assert (err <= bound + 1e-30).all(), f"{name}: max excess {(err - bound).max().item():.3g}"
    for j in (1, 2):  # the other ring slots are read, never written
        other = (step - j) % L.MS_HIST
        assert torch.equal(got["hist"][other], c["hist"][other])


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noise_mode", NOISE_MODES)
@pytest.mark.parametrize("clip", CLIP_MODES)
def test_reference_f32_cpu_cuda_triton_equal_bit_for_bit(clip, noise_mode, dtype, shape):
    """Same op order, every product and sum rounded once, no FMA: the product's bit-identity promise."""
    c = _case(shape, dtype, seed=7)
    for step in range(3):
        want = _run(ref_backend.multistep, c, step, clip=clip, noise_mode=noise_mode)
        for name in FUSED:
            if not _runnable(name):
                continue
            got = _run(_launcher(name), c, step, clip=clip, noise_mode=noise_mode)
            for key in ("x", "xp", "hist"):
                assert torch.equal(got[key], want[key]), (name, key, step)


@pytest.mark.parametrize("backend", ("reference", *FUSED))
def test_in_kernel_noise_is_the_sde_stream_keyed_by_sample_and_timestep(backend):
    """NOISE_PHILOX equals NOISE_TENSOR given philox_normal(seed, offset + b, tval[step], N, STREAM_SDE),
    bit for bit (every backend makes the normals with the same float32 operation sequence)."""
    launch = _launcher(backend)
    c = _case((3, 41), torch.float32, seed=3)
    step = 2
    seed, offset = c["rng"].tolist()
    z = philox_normal(seed, torch.arange(offset, offset + 3), c["tval"][step].expand(3), 41, L.STREAM_SDE)
    got = _run(launch, c, step, clip=L.CLIP_NONE, noise_mode=L.NOISE_PHILOX)
    want = _run(launch, dict(c, noise=z), step, clip=L.CLIP_NONE, noise_mode=L.NOISE_TENSOR)
    pz = float(c["coef"][step, L.MS_PZ])
    assert pz != 0
    assert torch.equal(got["x"], want["x"]) and torch.equal(got["xp"], want["xp"])
    # the noise term of global sample g does not depend on the batch it is in: shift the offset by one
    plain = _run(launch, c, step, clip=L.CLIP_NONE, noise_mode=L.NOISE_NONE)["x"]
    shifted = _run(launch, dict(c, rng=c["rng"] + torch.tensor([0, 1])), step, clip=L.CLIP_NONE,
                   noise_mode=L.NOISE_PHILOX)["x"]  # fmt: skip
    torch.testing.assert_close((shifted - plain)[:2], (got["x"] - plain)[1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("clip", (L.CLIP_NONE, L.CLIP_RANGE))
@pytest.mark.parametrize("backend", ("reference", *FUSED))
def test_x0_only_pass_writes_every_element_of_d0(backend, clip):
    launch = _launcher(backend)
    c = _case((3, 45), torch.bfloat16, seed=5)
    x0 = _run(launch, c, 1, clip=clip, noise_mode=L.NOISE_NONE, x0_only=True)
    want = _run(ref_backend.multistep, c, 1, clip=clip, noise_mode=L.NOISE_NONE, x0_only=True)
    assert torch.equal(x0, want)


def _shift_reference(c, steps, schedule, clip, dtype):
    """The contract's shifting history (fastddpm.solvers.reference_multistep_step), float64."""
    from fastddpm.solvers import MultistepState, reference_multistep_step

    b = c["x"].shape[0]
    st = MultistepState(c["x"].to(dtype), c["xp"].to(dtype), *(torch.zeros_like(c["x"], dtype=dtype),) * 3)
    for i in range(steps):
        m = c["ms"][i].to(dtype)
        st = reference_multistep_step(st, m, c["coef"][i].to(dtype), schedule, clip_mode=clip,
                                      noise=c["zs"][i].to(dtype))  # fmt: skip
    return st.x.reshape(b, -1)


@pytest.mark.parametrize("thresholding", (False, True))
@pytest.mark.parametrize("backend", ("reference", *FUSED))
def test_ring_buffer_over_steps_equals_the_shifting_history(backend, thresholding):
    """Five steps through :func:`fastddpm.driver.fused_multistep` (two passes with thresholding) equal
    the plain loop of the solvers' spec in float64, within float32 rounding."""
    pytest.importorskip("fastddpm.solvers")
    _launcher(backend)
    dev = _device(backend)
    schedule = Schedule(num_train_timesteps=100, thresholding=thresholding, sample_max_value=1.5)
    clip = L.CLIP_THRESHOLD if thresholding else L.CLIP_NONE
    S, b, n = 5, 3, 29
    c = _case((b, n), torch.float32, steps=S, seed=11)
    c["ms"] = [torch.randn(b, n) for _ in range(S)]
    c["zs"] = [torch.randn(b, n) for _ in range(S)]
    want = _shift_reference(c, S, schedule, clip, torch.float64)
    x, xp = c["x"].to(dev), c["xp"].to(dev)
    hist = torch.zeros(L.MS_HIST, b, n, device=dev)
    step = torch.zeros(1, dtype=torch.int64, device=dev)
    coef, tval, rng = c["coef"].to(dev), c["tval"].to(dev), c["rng"].to(dev)
    for i in range(S):
        driver.fused_multistep(backend, x, c["ms"][i].to(dev), xp, hist, c["zs"][i].to(dev), coef, tval, step, rng,
                               schedule=schedule, clip=clip, noise_mode=L.NOISE_TENSOR)  # fmt: skip
        step += 1
    x = x.cpu()
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(x.double(), want, atol=1e-4 * scale, rtol=0)


def test_cpu_backend_rejects_bad_arguments_by_name():
    if not availability("cpu", "cpu")[0]:
        pytest.skip(f"cpu: {availability('cpu', 'cpu')[1]}")
    launch = backend_module("cpu").multistep
    c = _case((2, 9), torch.float32)
    with pytest.raises(ValueError, match="coef"):
        _run(launch, c, 0, clip=L.CLIP_NONE, noise_mode=L.NOISE_NONE, coef=c["coef"][:, :5].contiguous())
    with pytest.raises(ValueError, match="hist"):
        launch(c["x"], c["m"], c["xp"], c["hist"][:2], None, None, c["coef"], c["tval"], torch.tensor([0]), None,
               c["rng"], clip_mode=0, clip_range=1.0, noise_mode=0, x0_only=False)  # fmt: skip
    with pytest.raises(IndexError, match="step"):
        _run(launch, c, 5, clip=L.CLIP_NONE, noise_mode=L.NOISE_NONE)
    empty = _case((0, 9), torch.float32)
    _run(launch, empty, 0, clip=L.CLIP_NONE, noise_mode=L.NOISE_PHILOX)  # nothing to do, no error


def test_solver_columns_equal_layout():
    solvers = pytest.importorskip("fastddpm.solvers")
    for name in (k for k in dir(L) if k.startswith("MS_") and k != "MS_HIST"):
        assert getattr(solvers, name) == getattr(L, name), name
    assert solvers.NMS == L.NMS
