"""Same inputs, same bits: the noise and the step on every backend (the "Bitwise rules" of _layout.py).

Every backend evaluates the same float32 operation sequence, so ``randn``, ``q_sample``, ``ddpm_step``
and ``ddim_step`` must return identical bits on ``reference`` (float32/16/bf16 inputs), ``cpu``,
``triton`` (the interpreter here, the GPU compiler under ``FASTDDPM_TEST_DEVICE=cuda``) and ``cuda``
(when there is a GPU): compared with :func:`conftest.assert_same_bits`, never a tolerance. The
inputs are made once on the CPU and copied to each backend's device. How close the common result
is to the float64 reference is tests/test_backend_contract.py's job.

Also here: the compiled forms keep the rules (no FMA contraction, no approximate division, root or
transcendental in the PTX of the Triton kernels), and the checks that made bitwise identity fail
before (0 * inf in unused terms, torch's float32 sqrt).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_bits, backend_devices

import fastddpm
from fastddpm import Schedule
from fastddpm import _layout as L
from fastddpm import noise as nz

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
VARIANCES = ["fixed_small", "fixed_large", "learned", "learned_range"]
CLIPS = {"none": dict(clip_sample=False), "range": dict(clip_sample=True, clip_sample_range=1.5),
         "threshold": dict(thresholding=True, sample_max_value=2.5)}  # fmt: skip
SHAPE = (4, 3, 5, 7)  # 105 elements per sample: odd, not a multiple of 4
T = torch.tensor([999, 613, 1, 0])  # t = 0: no noise is added (gate 0)
PREV_T = torch.tensor([899, 400, 0, -1])  # skipped steps, as after set_timesteps


def test_at_least_three_backends_are_compared():
    assert {"reference", "cpu", "triton"} <= set(backend_devices()), backend_devices()


def _on_every_backend(fn, *tensors) -> dict[str, object]:
    """``fn(backend, *tensors_on_its_device)`` for every backend; outputs brought back to the CPU."""
    results = {}
    for name, dev in backend_devices().items():
        moved = [t.to(dev) if isinstance(t, torch.Tensor) else t for t in tensors]
        out = fn(name, *moved)
        results[name] = tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return results


def _assert_all_same(results: dict[str, object], what: str) -> None:
    names = list(results)
    first = results[names[0]]
    for name in names[1:]:
        got = results[name]
        pairs = zip(first, got, strict=True) if isinstance(first, tuple) else [(first, got)]
        for k, (a, b) in enumerate(pairs):
            assert_same_bits(a, b, f"{what}: {names[0]} vs {name} (output {k})")


# --- noise -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stream", [L.STREAM_STEP, L.STREAM_QSAMPLE, L.STREAM_INIT])
def test_randn_is_the_same_bits_on_every_backend(stream, dtype):
    seed = int(torch.randint(-(2**63), 2**63 - 1, ()))
    offset = 2**32 - 2  # samples straddle 2**32: the high word of g in the counter changes
    t = torch.randint(0, 1000, (3,))
    res = _on_every_backend(
        lambda be, tt: fastddpm.randn((3, 5, 9, 13), seed=seed, sample_offset=offset, t=tt, stream=stream,
                                      device=tt.device, dtype=dtype, backend=be),
        t,
    )  # fmt: skip
    _assert_all_same(res, f"randn stream {stream} {dtype}")


def test_randn_large_draw_is_the_same_bits_on_every_backend():
    """The case of the issue: 64 CIFAR-sized samples, 196,608 normals."""
    res = _on_every_backend(
        lambda be, t: fastddpm.randn((64, 3, 32, 32), seed=7, t=t, device=t.device, backend=be), torch.tensor(500)
    )
    _assert_all_same(res, "randn 64x3x32x32")


def test_float32_transcendentals_are_within_an_ulp_and_sqrt_is_correctly_rounded():
    """The spec's polynomials (fastddpm.noise, the same as the kernels') against float64 libm: log and
    exp within 2 units of 2**-24 relative (Cephes: about 1 ulp), sin/cos within 2**-23 + 2**-24
    absolute (1 ulp at 1 plus the float32 rounding of 2 pi); the root is the correctly rounded one
    (torch's own float32 sqrt is not, on CPU)."""
    u = torch.rand(200_000).clamp(min=L.UNIFORM_MIN)
    ref = u.double().log()
    assert bool(((nz.log_f32(u).double() - ref).abs() <= 2 * 2**-24 * ref.abs()).all())
    s, c = nz.sincos_2pi_f32(u)
    two_pi_u = 2 * torch.pi * u.double()
    assert (s.double() - two_pi_u.sin()).abs().max() <= 2**-23 + 2**-24
    assert (c.double() - two_pi_u.cos()).abs().max() <= 2**-23 + 2**-24
    x = (torch.rand(200_000) - 0.5) * 170
    ref = x.double().exp()
    assert bool(((nz.exp_f32(x).double() - ref).abs() <= 2 * 2**-24 * ref).all())
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 200.0, -200.0, 0.0])
    got = nz.exp_f32(special)
    assert torch.isnan(got[0]) and got[1:].tolist() == [float("inf"), 0.0, float("inf"), 0.0, 1.0]
    r = torch.rand(200_000) * 50
    assert torch.equal(nz.sqrt_f32(r), torch.sqrt(r.double()).float())  # one rounding of the float64 root


# --- q_sample --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise_kind", ["philox", "float32", "float64"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_is_the_same_bits_on_every_backend(dtype, noise_kind):
    schedule = Schedule()
    x0 = torch.randn(SHAPE).to(dtype)
    t = T.clone()
    noise = None if noise_kind == "philox" else torch.randn(SHAPE, dtype=getattr(torch, noise_kind))
    res = _on_every_backend(
        lambda be, x, tt, n: fastddpm.q_sample(x, tt, schedule, n, seed=11, sample_offset=5, backend=be),
        x0, t, noise,
    )  # fmt: skip
    _assert_all_same(res, f"q_sample {dtype} {noise_kind}")


# --- ddpm_step -------------------------------------------------------------------------------------------


def _model_output(schedule: Schedule, dtype: torch.dtype) -> torch.Tensor:
    c = SHAPE[1] * (2 if schedule.variance_type in ("learned", "learned_range") else 1)
    m = torch.randn(SHAPE[0], c, *SHAPE[2:])
    if schedule.variance_type == "learned":
        m[:, SHAPE[1] :] = m[:, SHAPE[1] :] * 2 - 6  # log variances around exp(-3)
    return m.to(dtype)


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddpm_step_is_the_same_bits_on_every_backend(prediction, variance, clip):
    schedule = Schedule(prediction_type=prediction, variance_type=variance, **CLIPS[clip])
    for dtype, noise_kind in itertools.product(DTYPES, ["philox", "tensor"]):
        x = (torch.randn(SHAPE) * 1.5).to(dtype)
        m = _model_output(schedule, dtype)
        noise = torch.randn(SHAPE).to(dtype) if noise_kind == "tensor" else None
        res = _on_every_backend(
            lambda be, mm, xx, t, p, n: fastddpm.ddpm_step(mm, t, xx, schedule, prev_t=p, noise=n, seed=3,
                                                           sample_offset=2**33, backend=be),
            m, x, T, PREV_T, noise,
        )  # fmt: skip
        _assert_all_same(res, f"ddpm_step {prediction}/{variance}/{clip} {dtype} {noise_kind}")


def test_ddpm_step_int_timesteps_are_the_same_bits_as_tensor_timesteps():
    """The cached int-timestep row and the per-sample table are the same float32 coefficients."""
    schedule = Schedule(clip_sample=True)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    for be, dev in backend_devices().items():
        a = fastddpm.ddpm_step(m.to(dev), 500, x.to(dev), schedule, seed=1, backend=be)
        b = fastddpm.ddpm_step(m.to(dev), torch.full((SHAPE[0],), 500, device=dev), x.to(dev), schedule, seed=1,
                               backend=be)  # fmt: skip
        for k in range(2):
            assert_same_bits(a[k], b[k], f"{be}: int vs tensor t (output {k})")


# --- ddim_step -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_step_is_the_same_bits_on_every_backend(prediction, clip, eta, use_clipped):
    schedule = Schedule(prediction_type=prediction, set_alpha_to_one=False, **CLIPS[clip])
    kinds = ["philox", "tensor"] if eta > 0 else ["none"]
    for dtype, noise_kind in itertools.product(DTYPES, kinds):
        x = (torch.randn(SHAPE) * 1.5).to(dtype)
        m = torch.randn(SHAPE).to(dtype)
        noise = torch.randn(SHAPE).to(dtype) if noise_kind == "tensor" else None
        res = _on_every_backend(
            lambda be, mm, xx, t, p, n: fastddpm.ddim_step(mm, t, xx, schedule, prev_t=p, eta=eta,
                                                           use_clipped_model_output=use_clipped, noise=n, seed=9,
                                                           backend=be),
            m, x, T, PREV_T, noise,
        )  # fmt: skip
        _assert_all_same(res, f"ddim_step {prediction}/{clip} eta={eta} clipped={use_clipped} {dtype} {noise_kind}")


# --- non-finite model outputs ------------------------------------------------------------------------------


@pytest.mark.filterwarnings(
    "ignore::RuntimeWarning"
)  # numpy (the interpreter) warns on inf * 0 in a select's unused side
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_infinite_model_output_removed_by_clipping_gives_the_float64_result(prediction):
    """An infinite model output that clip_sample takes out of x0 (and that a DDPM step never uses
    through eps) leaves a finite result on every backend, as the float64 reference gives: a term
    with a zero coefficient contributes 0, never 0 * inf = NaN."""
    schedule = Schedule(prediction_type=prediction, clip_sample=True)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    m[0, 0, 0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    m[2, 1, 2, 2] = float("inf")
    res = _on_every_backend(
        lambda be, mm, xx, t, p: fastddpm.ddpm_step(mm, t, xx, schedule, prev_t=p, seed=4, backend=be),
        m, x, T, PREV_T,
    )  # fmt: skip
    _assert_all_same(res, f"ddpm_step with inf ({prediction})")
    ref64, _ = fastddpm.ddpm_step(m.double(), T, x.double(), schedule, prev_t=PREV_T, seed=4, backend="reference")
    prev = res["cpu" if "cpu" in res else "reference"][0]
    assert torch.equal(torch.isfinite(prev), torch.isfinite(ref64))
    assert bool(torch.isfinite(prev[0, 0, 0, :2]).all()) and bool(torch.isfinite(prev[2, 1, 2, 2]))
    assert torch.isnan(prev[0, 0, 0, 2])  # a NaN output stays NaN


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_and_inf_samples_agree_on_every_backend():
    """Non-finite samples and noise propagate the same way everywhere (NaN payloads aside)."""
    schedule = Schedule(clip_sample=False, variance_type="learned_range")
    x = torch.randn(SHAPE)
    x[1, 0, 0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    m = torch.randn(SHAPE[0], 2 * SHAPE[1], *SHAPE[2:])
    m[3, 4, 1, 1] = float("inf")  # a learned variance of +inf
    res = _on_every_backend(
        lambda be, mm, xx, t, p: fastddpm.ddpm_step(mm, t, xx, schedule, prev_t=p, seed=4, backend=be),
        m, x, T, PREV_T,
    )  # fmt: skip
    _assert_all_same(res, "ddpm_step with non-finite sample")


# --- batch composition --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_sample_has_the_same_bits_in_any_batch(dtype):
    """Sample g of a batch equals sample g computed alone (sample_offset = g), on every backend."""
    schedule = Schedule(thresholding=True, sample_max_value=2.0)
    x, m = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
    for be, dev in backend_devices().items():
        whole = fastddpm.ddpm_step(m.to(dev), T.to(dev), x.to(dev), schedule, prev_t=PREV_T.to(dev), seed=8,
                                   sample_offset=10, backend=be)  # fmt: skip
        for g in range(SHAPE[0]):
            part = fastddpm.ddpm_step(m[g : g + 1].to(dev), T[g : g + 1].to(dev), x[g : g + 1].to(dev), schedule,
                                      prev_t=PREV_T[g : g + 1].to(dev), seed=8, sample_offset=10 + g, backend=be)  # fmt: skip
            for k in range(2):
                assert_same_bits(whole[k][g : g + 1], part[k], f"{be} {dtype}: sample {g} (output {k})")


# --- the compiled forms keep the rules ------------------------------------------------------------------------

_PTX_PROBE = r"""
import json, re, sys
sys.path[:0] = [sys.argv[1]]
import triton_aot
report = {}
for name, go, *_ in triton_aot._variants():
    if not name.startswith(("step/", "q_sample/", "randn/", "multistep/")):
        continue
    with triton_aot.CompileOnly(90) as ctx:
        go()
    for _, kernel in ctx.compiled:
        ptx = kernel.asm["ptx"]
        report[name] = dict(
            fma=re.findall(r"\bfma\.[\w.]*f32\b", ptx),
            approx=sorted(set(re.findall(r"\b(?:div|sqrt|rsqrt|rcp|ex2|lg2|sin|cos|tanh)\.(?:approx|full)[\w.]*", ptx))),
            fusion=bool(kernel.metadata.enable_fp_fusion),
        )
print(json.dumps(report))
"""


def test_triton_kernels_compile_without_fma_or_approximations(tmp_path):
    """The GPU compile (sm_90, no GPU needed) of every step / q_sample / randn variant: launched with
    enable_fp_fusion=False (Triton then also passes --fmad=false to ptxas), and no fma or
    approximate div / sqrt / exp / log / sin / cos in the PTX."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    tests_dir = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", _PTX_PROBE, str(tests_dir)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) >= 10, report
    for name, r in report.items():
        assert r["fusion"] is False, name
        assert r["fma"] == [], (name, r["fma"][:5])
        assert r["approx"] == [], (name, r["approx"])
