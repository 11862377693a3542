"""Every fused backend that can run here against the float64 reference, through the public ops.

On the CPU machine the fused backends are ``cpu`` and ``triton`` (run by the Triton interpreter:
tests/conftest.py sets TRITON_INTERPRET=1) on CPU tensors. With ``FASTDDPM_TEST_DEVICE=cuda``
(benchmarks/gpu_check.py sets it) they are ``cuda`` and ``triton`` compiled for the GPU, on CUDA
tensors; the float64 reference always runs on CPU.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import fastddpm
from fastddpm import Schedule
from fastddpm import _layout as L
from fastddpm.dispatch import availability

DEVICE = torch.device(os.environ.get("FASTDDPM_TEST_DEVICE", "cpu"))
FUSED = ["cuda", "triton"] if DEVICE.type == "cuda" else ["cpu", "triton"]


def _backend(name: str, device: torch.device | str = DEVICE) -> str:
    ok, why = availability(name, device)
    if not ok:
        pytest.skip(f"{name} backend unavailable on {device}: {why}")
    return name


def _dev(*tensors):
    """The tensors on the test device (the fused backends' inputs)."""
    out = tuple(t.to(DEVICE) for t in tensors)
    return out if len(out) > 1 else out[0]


def _host(out):
    """A fused op's output (tensor or tuple of tensors) back on CPU for the comparison."""
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


@pytest.fixture(params=FUSED)
def backend(request):
    return _backend(request.param)


PRED = ["epsilon", "sample", "v_prediction"]
VAR = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
CLIP = ["none", "clip", "threshold"]
CLIP_CFG = {
    "none": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0),
}
SHAPE = (3, 5, 7, 11)  # odd, N = 385 is not a multiple of 4


def _inputs(schedule: Schedule, shape=SHAPE, dtype=torch.float32, strided=False):
    b, c = shape[:2]
    mc = 2 * c if schedule.variance_type in ("learned", "learned_range") else c
    x = torch.randn(shape, dtype=torch.float64) * 1.3
    m = torch.randn((b, mc, *shape[2:]), dtype=torch.float64)
    if schedule.variance_type == "learned_range":
        m[:, c:] = torch.rand_like(m[:, c:]) * 2 - 1
    if strided:  # every other element along the last dim: non-contiguous views of bigger buffers
        x = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
        m = torch.repeat_interleave(m, 2, dim=-1)[..., ::2]
        assert not x.is_contiguous()
    return x.to(dtype), m.to(dtype)


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max())


@pytest.mark.parametrize("pred,var,clip", list(itertools.product(PRED, VAR, CLIP)))
def test_ddpm_step_vs_float64_reference(backend, pred, var, clip):
    schedule = Schedule(prediction_type=pred, variance_type=var, **CLIP_CFG[clip])
    x, m = _inputs(schedule, strided=(pred == "epsilon"))
    z = torch.randn(SHAPE)
    t = torch.tensor([999, 400, 1])
    prev_t = torch.tensor([980, 37, 0])
    ref = fastddpm.ddpm_step(m.double(), t, x.double(), schedule, prev_t=prev_t, noise=z.double(), backend="reference")
    out = _host(fastddpm.ddpm_step(*_dev(m, t, x), schedule, prev_t=_dev(prev_t), noise=_dev(z), backend=backend))
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape
        scale = 1.0 + r.abs()
        assert float(((o.double() - r).abs() / scale).max()) < 2e-5
    # in-kernel noise: same numbers as the reference generator
    ref_s = fastddpm.ddpm_step(
        m.double(), t, x.double(), schedule, prev_t=prev_t, seed=7, sample_offset=5, backend="reference"
    )
    out_s = _host(fastddpm.ddpm_step(*_dev(m, t, x), schedule, prev_t=_dev(prev_t), seed=7, sample_offset=5,
                                     backend=backend))  # fmt: skip
    assert float(((out_s[0].double() - ref_s[0]).abs() / (1 + ref_s[0].abs())).max()) < 2e-5


@pytest.mark.parametrize("pred,clip", list(itertools.product(PRED, CLIP)))
@pytest.mark.parametrize("eta,use_clipped", [(0.0, False), (0.5, True), (1.0, False)])
def test_ddim_step_vs_float64_reference(backend, pred, clip, eta, use_clipped):
    schedule = Schedule(prediction_type=pred, set_alpha_to_one=clip != "none", **CLIP_CFG[clip])
    x, m = _inputs(schedule)
    z = torch.randn(SHAPE)
    t, prev_t = torch.tensor([999, 500, 20]), torch.tensor([979, 480, -1])
    kw = dict(prev_t=prev_t, eta=eta, use_clipped_model_output=use_clipped)
    ref = fastddpm.ddim_step(m.double(), t, x.double(), schedule, noise=z.double(), backend="reference", **kw)
    kw_dev = dict(kw, prev_t=_dev(prev_t))
    out = _host(fastddpm.ddim_step(*_dev(m, t, x), schedule, noise=_dev(z), backend=backend, **kw_dev))
    for o, r in zip(out, ref):
        assert float(((o.double() - r).abs() / (1 + r.abs())).max()) < 2e-5
    ref_s = fastddpm.ddim_step(m.double(), t, x.double(), schedule, seed=3, backend="reference", **kw)
    out_s = _host(fastddpm.ddim_step(*_dev(m, t, x), schedule, seed=3, backend=backend, **kw_dev))
    assert float(((out_s[0].double() - ref_s[0]).abs() / (1 + ref_s[0].abs())).max()) < 2e-5


def test_q_sample_vs_float64_reference(backend):
    schedule = Schedule(beta_schedule="squaredcos_cap_v2")
    x0 = torch.randn(SHAPE)[:, :, ::2]  # strided
    z = torch.randn(x0.shape)
    t = torch.tensor([0, 311, 999])
    ref = fastddpm.q_sample(x0.double(), t, schedule, z.double(), backend="reference")
    assert _err(_host(fastddpm.q_sample(*_dev(x0, t), schedule, _dev(z), backend=backend)), ref) < 1e-5
    ref_s = fastddpm.q_sample(x0.double(), t, schedule, seed=11, sample_offset=2, backend="reference")
    fused_s = fastddpm.q_sample(*_dev(x0, t), schedule, seed=11, sample_offset=2, backend=backend)
    assert _err(_host(fused_s), ref_s) < 2e-5
    target = fastddpm.randn(x0.shape, seed=11, sample_offset=2, t=_dev(t), stream=fastddpm.STREAM_QSAMPLE,
                            device=DEVICE, backend=backend).cpu()  # fmt: skip
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ref_s, a.sqrt() * x0.double() + (1 - a).sqrt() * target.double(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_2x_of_plain_torch(backend, dtype):
    """Fused fp16/bf16 (fp32 math) must be no worse than ~2x a plain eager formula computed in that dtype."""
    schedule = Schedule(variance_type="fixed_large")
    x, m = _inputs(schedule, shape=(4, 3, 16, 16))
    z = torch.randn(x.shape, dtype=torch.float64)
    t = torch.tensor([999, 600, 50, 3])
    ref, ref_x0 = fastddpm.ddpm_step(m, t, x, schedule, noise=z, backend="reference")
    xl, ml, zl = x.to(dtype), m.to(dtype), z.to(dtype)
    out, out_x0 = _host(fastddpm.ddpm_step(*_dev(ml, t, xl), schedule, noise=_dev(zl), backend=backend))
    assert out.dtype == dtype
    # plain torch in the low dtype, diffusers style: coefficients cast to the data dtype
    s = schedule.step_terms(t, t - 1)
    c = lambda v: v.to(dtype).reshape(-1, 1, 1, 1)
    x0 = ((xl - c((1 - s.abar_t).sqrt()) * ml) / c(s.abar_t.sqrt())).clamp(-1, 1)
    plain = c(s.mean_coef_x0) * x0 + c(s.mean_coef_xt) * xl + c(s.beta_t.sqrt()) * zl
    # compare against the float64 reference on the same (rounded) inputs
    ref, _ = fastddpm.ddpm_step(ml.double(), t, xl.double(), schedule, noise=zl.double(), backend="reference")
    assert _err(out, ref) <= 2 * _err(plain, ref) + 1e-3


def test_noise_identity_and_batch_independence(backend):
    """Sample g's noise depends on (seed, g, t, e, stream) only: not on batch size, offset or backend."""
    shape = (6, 3, 5, 7)
    t = torch.tensor([5, 5, 9, 9, 100, 0])
    kw = dict(seed=123, stream=fastddpm.STREAM_STEP, device=DEVICE, backend=backend)
    full = fastddpm.randn(shape, t=_dev(t), **kw).cpu()
    ref = fastddpm.randn(shape, seed=123, t=t, stream=fastddpm.STREAM_STEP, backend="reference")
    # Same Philox words; Box-Muller in each backend's own float32 transcendentals today. Issue 13 makes the
    # noise bitwise identical across backends (torch.equal tests in their own file): tighten this with it.
    assert _err(full, ref.double()) < 1e-5
    part = fastddpm.randn((3, 3, 5, 7), sample_offset=2, t=_dev(t[2:5]), **kw).cpu()
    assert torch.equal(part, full[2:5])
    other_stream = fastddpm.randn(shape, t=_dev(t), **dict(kw, stream=fastddpm.STREAM_INIT)).cpu()
    assert not torch.allclose(other_stream, full)


def test_noise_statistics():
    z = fastddpm.randn((64, 4096), seed=1, t=10, stream=fastddpm.STREAM_STEP).double()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    assert abs(float((z.abs() < 1).double().mean()) - 0.682689) < 0.01
    assert abs(float((z.abs() > 3).double().mean()) - 0.0026998) < 0.001

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).mean() / (a.std() * b.std()))

    lim = 5 / n**0.5
    assert abs(corr(z[:, 1:], z[:, :-1])) < lim * 1.5  # neighbouring elements (incl. Box-Muller pairs)
    assert abs(corr(z[:, 0::2], z[:, 1::2])) < lim * 1.5  # the cos/sin pair of one Box-Muller draw
    assert abs(corr(z[1:], z[:-1])) < lim * 1.5  # neighbouring samples
    z2 = fastddpm.randn((64, 4096), seed=1, t=11, stream=fastddpm.STREAM_STEP).double()
    assert abs(corr(z, z2)) < lim  # consecutive steps
    z3 = fastddpm.randn((64, 4096), seed=2, t=10, stream=fastddpm.STREAM_STEP).double()
    assert abs(corr(z, z3)) < lim  # seeds


def test_noise_added_only_where_t_positive(backend):
    schedule = Schedule()
    x, m = _dev(*_inputs(schedule))
    a, _ = fastddpm.ddpm_step(m, _dev(torch.tensor([0, 0, 0])), x, schedule, prev_t=-1, seed=1, backend=backend)
    b, _ = fastddpm.ddpm_step(m, 0, x, schedule, prev_t=-1, seed=2, backend=backend)
    assert torch.equal(a, b)


def test_auto_backend_and_env_override(monkeypatch):
    schedule = Schedule()
    x, m = _inputs(schedule)
    monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    ref = fastddpm.ddpm_step(m, 10, x, schedule, seed=0)
    monkeypatch.setenv("FASTDDPM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTDDPM_BACKEND"):
        fastddpm.ddpm_step(m, 10, x, schedule, seed=0)
    monkeypatch.delenv("FASTDDPM_BACKEND")
    auto = fastddpm.ddpm_step(m, 10, x, schedule, seed=0)
    torch.testing.assert_close(auto, ref, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bad input
BAD = Schedule()


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, m: fastddpm.ddpm_step(m[:, :2], 5, x, BAD), ValueError, r"expects \(3, 5, 7, 11\)"),
        (
            lambda x, m: fastddpm.ddpm_step(m, 5, x, Schedule(variance_type="learned_range")),
            ValueError,
            "needs 2C = 10",
        ),
        (lambda x, m: fastddpm.ddpm_step(m, 1000, x, BAD), ValueError, r"out of range \[0, 1000\)"),
        (lambda x, m: fastddpm.ddpm_step(m, -1, x, BAD), ValueError, "out of range"),
        (lambda x, m: fastddpm.ddpm_step(m, torch.tensor([5, 6, 1000]), x, BAD), ValueError, "out of range"),
        (lambda x, m: fastddpm.ddpm_step(m, 5, x, BAD, prev_t=5), ValueError, "smaller than t"),
        (lambda x, m: fastddpm.ddpm_step(m, 5, x, BAD, prev_t=-2), ValueError, "out of range"),
        (lambda x, m: fastddpm.ddim_step(m, 5, x, BAD, prev_t=9), ValueError, "smaller than t"),
        (lambda x, m: fastddpm.ddpm_step(m, 5.0, x, BAD), TypeError, "float"),
        (lambda x, m: fastddpm.ddpm_step(m, torch.tensor([5.0, 1.0, 2.0]), x, BAD), TypeError, "integer tensor"),
        (lambda x, m: fastddpm.ddpm_step(m, torch.tensor([5, 6]), x, BAD), ValueError, r"shape \[\] or \[3\]"),
        (lambda x, m: fastddpm.ddpm_step(m, torch.tensor([5, 6, 7], device="meta"), x, BAD), ValueError, "same device"),
        (lambda x, m: fastddpm.ddpm_step(m.to("meta"), 5, x, BAD), ValueError, "model_output is on meta"),
        (lambda x, m: fastddpm.ddpm_step(m.int(), 5, x.int(), BAD), TypeError, "floating-point"),
        (lambda x, m: fastddpm.ddpm_step(m.double(), 5, x.double(), BAD, backend="cpu"), TypeError, "float64"),
        (lambda x, m: fastddpm.ddpm_step(m, 5, x, BAD, backend="gpu"), ValueError, "allowed: 'auto'"),
        (lambda x, m: fastddpm.ddpm_step(m, 5, x, BAD, noise=torch.randn(3, 5)), ValueError, "noise has shape"),
        (lambda x, m: fastddpm.ddim_step(m, 5, x, BAD, prev_t=1, eta=-1.0), ValueError, "eta"),
        (lambda x, m: fastddpm.q_sample(x, 1000, BAD), ValueError, "out of range"),
        (
            lambda x, m: fastddpm.ddpm_step(m, 999, x, Schedule(rescale_betas_zero_snr=True), backend="cpu"),
            ValueError,
            "not finite",
        ),  # fmt: skip
    ],
)
def test_bad_input_gives_clear_error(call, exc, match):
    schedule = Schedule()
    x, m = _inputs(schedule)
    if "float64" in match or "not finite" in match:  # the cases that name backend="cpu"
        _backend("cpu", "cpu")
    with pytest.raises(exc, match=match):
        call(x, m)


def test_zero_snr_epsilon_last_step_is_rejected_on_fused_backends(backend):
    schedule = Schedule(rescale_betas_zero_snr=True)
    x, m = _dev(*_inputs(schedule))
    with pytest.raises(ValueError, match="not finite"):
        fastddpm.ddpm_step(m, 999, x, schedule, seed=0, backend=backend)
    fastddpm.ddpm_step(m, 998, x, schedule, seed=0, backend=backend)  # fine elsewhere


def test_float64_goes_to_reference_under_auto():
    schedule = Schedule()
    x, m = _inputs(schedule)
    out = fastddpm.ddpm_step(m.double(), 10, x.double(), schedule, seed=0)
    assert out[0].dtype == torch.float64


# --------------------------------------------------------------------------- torch.library
def test_opcheck(backend):
    b, n = 3, 35
    x, m, v = _dev(torch.randn(b, n), torch.randn(b, n), torch.rand(b, n))
    coef = _dev(torch.rand(b, L.NCOEF))
    tval = _dev(torch.tensor([3, 2, 1]))
    rows = _dev(torch.arange(b))
    rng = _dev(torch.tensor([5, 0]))
    args = (
        x,
        m,
        v,
        None,
        coef,
        tval,
        rows,
        None,
        rng,
        L.CLIP_RANGE,
        1.0,
        L.VAR_LEARNED,
        L.NOISE_PHILOX,
        True,
        False,
        backend,
    )
    torch.library.opcheck(torch.ops.fastddpm.fused_step.default, args)
    torch.library.opcheck(
        torch.ops.fastddpm.fused_q_sample.default,
        (x, None, Schedule().table("q_sample", DEVICE), tval, rng, L.NOISE_PHILOX, backend),
    )
    torch.library.opcheck(torch.ops.fastddpm.fused_randn.default, (tval, rng, b, n, 0, torch.float32, backend))


def test_torch_compile_fullgraph_traces_a_sampling_step():
    backend = _backend("cpu", "cpu")
    schedule = Schedule()
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    def step(x, t):
        eps = net(x)
        return fastddpm.ddpm_step(eps, t, x, schedule, seed=0, backend=backend)[0]

    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([500, 500])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), step(x, t))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_int_timesteps_take_the_cached_row_and_match_the_tensor_path(backend, sampler):
    """``step(eps, 500, x)`` with Python ints uses one cached coefficient row (no per-call float64
    math); it must give bit-identical results to the same step given as tensors."""
    from fastddpm.ops import _cached_step_row

    schedule = Schedule(variance_type="fixed_large", prediction_type="v_prediction", clip_sample=True)
    x, m = _dev(*_inputs(schedule))
    step = fastddpm.ddpm_step if sampler == "ddpm" else fastddpm.ddim_step
    kw = dict(eta=0.7) if sampler == "ddim" else {}
    for t, prev in ((731, 700), (1, 0), (0, -1)):
        _cached_step_row.cache_clear()
        a = step(m, t, x, schedule, prev_t=prev, seed=5, sample_offset=3, backend=backend, **kw)
        assert _cached_step_row.cache_info().currsize == 1
        a2 = step(m, t, x, schedule, prev_t=prev, seed=5, sample_offset=3, backend=backend, **kw)
        assert _cached_step_row.cache_info().hits == 1
        tt, pt = _dev(torch.tensor([t] * x.shape[0]), torch.tensor([prev] * x.shape[0]))
        b = step(m, tt, x, schedule, prev_t=pt, seed=5, sample_offset=3, backend=backend, **kw)
        for u, u2, w in zip(a, a2, b):
            assert torch.equal(u, w) and torch.equal(u, u2)
    if sampler == "ddpm":  # prev_t omitted: t - 1
        assert torch.equal(step(m, 9, x, schedule, seed=1, backend=backend)[0],
                           step(m, 9, x, schedule, prev_t=8, seed=1, backend=backend)[0])  # fmt: skip


@pytest.mark.parametrize("form", ["0-d", "[1]", "expanded [B]"])
def test_one_tensor_timestep_for_the_whole_batch(backend, form):
    """A 0-d / [1] tensor t (what a diffusers-style loop passes) reaches the kernels as a stride-0 [B]
    view; every sample must read its own noise counter from it, as the reference does."""
    schedule = Schedule()
    x, m = _inputs(schedule, shape=(4, 3, 5, 7))
    t = {"0-d": torch.tensor(500), "[1]": torch.tensor([500]), "expanded [B]": torch.tensor([500]).expand(4)}[form]
    ref = fastddpm.ddpm_step(m.double(), t, x.double(), schedule, seed=9, sample_offset=2, backend="reference")
    out = _host(fastddpm.ddpm_step(*_dev(m, t, x), schedule, seed=9, sample_offset=2, backend=backend))
    for o, r in zip(out, ref):
        assert float(((o.double() - r).abs() / (1 + r.abs())).max()) < 2e-5
    ref_q = fastddpm.q_sample(x.double(), t, schedule, seed=9, backend="reference")
    assert _err(_host(fastddpm.q_sample(*_dev(x, t), schedule, seed=9, backend=backend)), ref_q) < 2e-5


def test_ddim_with_int_t_still_requires_prev_t():
    schedule = Schedule()
    x, m = _inputs(schedule)
    for backend in ("reference", *[b for b in FUSED if availability(b, "cpu")[0]]):
        with pytest.raises(TypeError, match="prev_t"):
            fastddpm.ddim_step(m, 500, x, schedule, prev_t=None, backend=backend)
