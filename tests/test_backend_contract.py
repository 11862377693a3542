"""The backend contract: every backend x dtype x op against the float64 reference, in one test.

For each case the fused result (``backend`` in ``reference``, ``cpu``, ``triton``, ``cuda`` where it
runs; inputs rounded to ``dtype``) is compared with the float64 reference of fastddpm.reference on
the same rounded inputs, with the tolerance of :func:`conftest.assert_within_torch_error`: at most
``TORCH_ERROR_FACTOR`` (2) times the error plain PyTorch float32 arithmetic makes on the same inputs
(the reference formulas evaluated in float32), plus the rounding of the result to ``dtype``. The
tolerances live in tests/conftest.py, each tied to that arithmetic; tests/test_bitwise.py checks
that the backends agree with one another bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_within_torch_error, backend_devices

import fastddpm
from fastddpm import Schedule, reference
from fastddpm import _layout as L
from fastddpm import noise as nz

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPE = (5, 3, 9, 7)  # 189 elements per sample: odd
T = torch.tensor([999, 750, 420, 3, 0])
PREV_T = torch.tensor([979, 700, 400, 1, -1])


# Every backend is a parameter; which can run here is asked at test time, never at collection (asking
# the cpu backend builds its C++ extension). test_bitwise.py asserts that reference, cpu and triton run.
ALL_BACKENDS = ("reference", "cpu", "triton", "cuda")


def _device_or_skip(backend: str) -> str:
    dev = backend_devices().get(backend)
    if dev is None:
        pytest.skip(f"the {backend} backend cannot run here")
    return dev


# --- the cases: each returns [(fused, float64 reference, plain float32 torch)] ------------------------


def _torch_f32_normals(seed: int, g: torch.Tensor, t: torch.Tensor, numel: int, stream: int) -> torch.Tensor:
    """The same Philox uniforms through torch's own float32 log / sqrt / cos / sin: the plain-PyTorch
    float32 Box-Muller, the baseline of the noise's error."""
    gg, tt = g.reshape(-1, 1), t.reshape(-1, 1).expand(g.shape[0], 1)
    groups = (numel + 3) // 4
    c0 = torch.arange(groups).reshape(1, -1).expand(g.shape[0], groups)
    r = nz.philox4x32(c0, (gg & 0xFFFFFFFF).expand_as(c0), (tt & 0xFFFFFFFF).expand_as(c0),
                      (stream | ((gg >> 32) << 8)).expand_as(c0), seed)  # fmt: skip
    u = [nz._uniform(ri) for ri in r]
    ra = torch.sqrt(-2.0 * torch.log(u[0].clamp(min=L.UNIFORM_MIN)))
    rb = torch.sqrt(-2.0 * torch.log(u[2].clamp(min=L.UNIFORM_MIN)))
    n = torch.stack([ra * torch.cos(L.TWO_PI * u[1]), ra * torch.sin(L.TWO_PI * u[1]),
                     rb * torch.cos(L.TWO_PI * u[3]), rb * torch.sin(L.TWO_PI * u[3])], dim=-1)  # fmt: skip
    return n.reshape(g.shape[0], groups * 4)[:, :numel]


def _randn(backend, dtype, dev):
    seed, offset, stream = 123456789, 2**32 - 2, L.STREAM_INIT
    t = torch.randint(0, 1000, (SHAPE[0],))
    out = fastddpm.randn(SHAPE, seed=seed, sample_offset=offset, t=t.to(dev), stream=stream, device=dev, dtype=dtype,
                         backend=backend)  # fmt: skip
    g = torch.arange(offset, offset + SHAPE[0])
    n = math.prod(SHAPE[1:])
    ref = nz.philox_normal(seed, g, t, n, stream, dtype=torch.float64).reshape(SHAPE)
    base = _torch_f32_normals(seed, g, t, n, stream).reshape(SHAPE).to(dtype)
    return [(out, ref, base)]


def _q_sample(backend, dtype, dev):
    schedule = Schedule(beta_schedule="squaredcos_cap_v2")
    x0 = torch.randn(SHAPE).to(dtype)
    out = fastddpm.q_sample(x0.to(dev), T.to(dev), schedule, seed=5, backend=backend)
    ref = reference.q_sample(x0.double(), T, schedule, None, 5)
    base = reference.q_sample(x0, T, schedule, None, 5, compute_dtype=torch.float32)
    return [(out, ref, base)]


def _ddpm(**config):
    def case(backend, dtype, dev):
        schedule = Schedule(**config)
        c = SHAPE[1] * (2 if schedule.variance_type in ("learned", "learned_range") else 1)
        x = torch.randn(SHAPE).to(dtype)
        m = torch.randn(SHAPE[0], c, *SHAPE[2:]).to(dtype)
        out = fastddpm.ddpm_step(m.to(dev), T.to(dev), x.to(dev), schedule, prev_t=PREV_T.to(dev), seed=7,
                                 backend=backend)  # fmt: skip
        ref = reference.ddpm_step(m.double(), T, x.double(), schedule, PREV_T, None, 7)
        base = reference.ddpm_step(m, T, x, schedule, PREV_T, None, 7, compute_dtype=torch.float32)
        return list(zip(out, ref, base, strict=True))

    return case


def _ddim(eta, clipped, **config):
    def case(backend, dtype, dev):
        schedule = Schedule(**config)
        x = torch.randn(SHAPE).to(dtype)
        m = torch.randn(SHAPE).to(dtype)
        noise = torch.randn(SHAPE).to(dtype)
        out = fastddpm.ddim_step(m.to(dev), T.to(dev), x.to(dev), schedule, prev_t=PREV_T.to(dev), eta=eta,
                                 use_clipped_model_output=clipped, noise=noise.to(dev), backend=backend)  # fmt: skip
        ref = reference.ddim_step(m.double(), T, x.double(), schedule, PREV_T, eta, clipped, noise.double(), None)
        base = reference.ddim_step(m, T, x, schedule, PREV_T, eta, clipped, noise, None, compute_dtype=torch.float32)
        return list(zip(out, ref, base, strict=True))

    return case


CASES = {
    "randn": _randn,
    "q_sample": _q_sample,
    "ddpm/epsilon/fixed_small/clip": _ddpm(clip_sample=True),
    "ddpm/v_prediction/learned_range/threshold": _ddpm(
        prediction_type="v_prediction", variance_type="learned_range", thresholding=True, sample_max_value=3.0
    ),  # fmt: skip
    "ddpm/sample/fixed_large/no_clip": _ddpm(prediction_type="sample", variance_type="fixed_large", clip_sample=False),
    "ddpm/epsilon/learned/no_clip": _ddpm(variance_type="learned", clip_sample=False),
    "ddim/epsilon/eta0/clip": _ddim(0.0, False, clip_sample=True),
    "ddim/v_prediction/eta0.8/clipped_eps": _ddim(0.8, True, prediction_type="v_prediction", clip_sample=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_backend_contract(backend, dtype, case):
    results = CASES[case](backend, dtype, _device_or_skip(backend))
    for k, (out, ref64, torch_f32) in enumerate(results):
        assert out.dtype == dtype and out.shape == ref64.shape, (out.dtype, out.shape)
        assert_within_torch_error(out, ref64, torch_f32, f"{backend} {dtype} {case} output {k}")


# --- the launchers: empty batches and empty samples ----------------------------------------------------


def _launchers(backend: str):
    from fastddpm.dispatch import backend_module

    return backend_module(backend)


@pytest.mark.parametrize("shape", [(0, 12), (3, 0)], ids=["B=0", "N=0"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_launchers_accept_empty_inputs(backend, shape):
    """``step``, ``q_sample`` and ``randn`` of every backend take B = 0 or N = 0 and launch nothing."""
    dev = _device_or_skip(backend)
    be = _launchers(backend)
    b, n = shape
    x = torch.empty(shape, device=dev)
    coef = torch.zeros(2, L.NCOEF, device=dev)
    tval = torch.zeros(2, dtype=torch.int64, device=dev)
    rows = torch.zeros(b, dtype=torch.int64, device=dev)
    rng = torch.tensor([1, 0], dtype=torch.int64, device=dev)
    prev, x0 = torch.empty(shape, device=dev), torch.empty(shape, device=dev)
    be.step(x, x, None, None, prev, x0, coef, tval, rows, None, rng, clip_mode=L.CLIP_RANGE, clip_range=1.0,
            var_mode=L.VAR_FIXED, noise_mode=L.NOISE_PHILOX, x0_only=False)  # fmt: skip
    be.q_sample(x, None, prev, torch.zeros(10, 2, device=dev), rows, rng, noise_mode=L.NOISE_PHILOX)
    be.randn(prev, rows, rng, stream=L.STREAM_INIT)
    assert prev.shape == shape and x0.shape == shape
