"""What the public ops accept and refuse, and what they leave alone, on every backend.

Rows of issue 10 (items 2 and 5) and issue 13 (items 3 and 5): the global random stream is drawn from
only when noise is made; empty batches; the seed and sample-offset ranges; numpy integers; inputs
that require grad; calls under a CUDA graph capture; the ``Schedule`` constructor's checks.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import Schedule
from fastddpm.dispatch import availability
from fastddpm.noise import SAMPLE_INDEX_LIMIT, SEED_LIMIT, seed_word

DEVICE = torch.device(os.environ.get("FASTDDPM_TEST_DEVICE", "cpu"))
BACKENDS = ["reference", "cuda", "triton"] if DEVICE.type == "cuda" else ["reference", "cpu", "triton"]
SHAPE = (3, 2, 5, 7)  # odd sizes; N = 70 is not a multiple of 4


@pytest.fixture(params=BACKENDS)
def backend(request):
    ok, why = availability(request.param, DEVICE)
    if not ok:
        pytest.skip(f"{request.param} backend unavailable on {DEVICE}: {why}")
    return request.param


def _xm(shape=SHAPE, dtype=torch.float32, channels_mult=1):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    m = torch.randn((shape[0], shape[1] * channels_mult, *shape[2:]), dtype=dtype, device=DEVICE)
    return x, m


def _dev_t(*values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


# --------------------------------------------------------------------------- the global random stream
def _no_noise_calls():
    """(label, call(backend)) of op calls that make no noise in the kernel: each must leave torch's
    global generator untouched, with seed=None."""
    s, thr = Schedule(), Schedule(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    lrn = Schedule(variance_type="learned_range")
    x, m = _xm()
    _, m2 = _xm(channels_mult=2)
    z = torch.randn_like(x)
    x0, m0 = _xm((0, 2, 5, 7))
    t3 = _dev_t(7, 3, 9)
    return [
        ("ddpm noise=", lambda be: fastddpm.ddpm_step(m, 9, x, s, noise=z, backend=be)),
        ("ddpm noise= tensor t", lambda be: fastddpm.ddpm_step(m, t3, x, s, noise=z, backend=be)),
        ("ddpm int t=0", lambda be: fastddpm.ddpm_step(m, 0, x, s, prev_t=-1, backend=be)),
        ("ddpm np t=0", lambda be: fastddpm.ddpm_step(m, np.int64(0), x, s, prev_t=np.int64(-1), backend=be)),
        ("ddpm learned t=0", lambda be: fastddpm.ddpm_step(m2, 0, x, lrn, backend=be)),
        ("ddpm thresholding noise=", lambda be: fastddpm.ddpm_step(m, 9, x, thr, noise=z, backend=be)),
        ("ddim eta=0", lambda be: fastddpm.ddim_step(m, 9, x, s, prev_t=4, backend=be)),
        ("ddim eta=0 tensor t", lambda be: fastddpm.ddim_step(m, t3, x, s, prev_t=t3 - 1, backend=be)),
        ("ddim eta=0 thresholding", lambda be: fastddpm.ddim_step(m, 9, x, thr, prev_t=-1, backend=be)),
        ("ddim eta=1 noise=", lambda be: fastddpm.ddim_step(m, 9, x, s, prev_t=4, eta=1.0, noise=z, backend=be)),
        ("q_sample noise=", lambda be: fastddpm.q_sample(x, 9, s, z, backend=be)),
        ("q_sample noise= tensor t", lambda be: fastddpm.q_sample(x, t3, s, z, backend=be)),
        ("ddpm empty batch", lambda be: fastddpm.ddpm_step(m0, 9, x0, s, backend=be)),
        ("ddim empty batch", lambda be: fastddpm.ddim_step(m0, 9, x0, s, prev_t=4, eta=1.0, backend=be)),
        ("q_sample empty batch", lambda be: fastddpm.q_sample(x0, 9, s, backend=be)),
        ("randn empty", lambda be: fastddpm.randn((0, 4), seed=None, device=DEVICE, backend=be)),
    ]


NO_NOISE = [label for label, _ in _no_noise_calls()]


@pytest.mark.parametrize("label", NO_NOISE)
def test_a_call_that_makes_no_noise_leaves_the_global_generator_alone(backend, label):
    call = dict(_no_noise_calls())[label]
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    call(backend)
    assert torch.equal(torch.get_rng_state(), before)


def _noise_calls():
    """Calls that make noise with seed=None: each draws exactly one seed from the global generator."""
    s = Schedule()
    x, m = _xm()
    return [
        ("ddpm int t", lambda be, **k: fastddpm.ddpm_step(m, 9, x, s, backend=be, **k)[0]),
        # a tensor t counts as making noise even when all its values are 0 (no device read decides it)
        ("ddpm tensor t=0", lambda be, **k: fastddpm.ddpm_step(m, _dev_t(0, 0, 0), x, s, prev_t=-1, backend=be, **k)[0]),
        ("ddim eta>0", lambda be, **k: fastddpm.ddim_step(m, 9, x, s, prev_t=4, eta=0.5, backend=be, **k)[0]),
        ("q_sample", lambda be, **k: fastddpm.q_sample(x, 9, s, backend=be, **k)),
        ("randn", lambda be, **k: fastddpm.randn(SHAPE, t=3, device=DEVICE, backend=be, **({"seed": None} | k))),
    ]  # fmt: skip


@pytest.mark.parametrize("label", [label for label, _ in _noise_calls()])
def test_a_call_that_makes_noise_draws_one_seed(backend, label):
    """seed=None takes exactly one 62-bit draw, the same on every backend, and is the seed then used."""
    call = dict(_noise_calls())[label]
    torch.manual_seed(99)
    drawn = int(torch.randint(0, 2**62, (1,)).item())
    after_one_draw = torch.get_rng_state()
    torch.manual_seed(99)
    out = call(backend)
    assert torch.equal(torch.get_rng_state(), after_one_draw)
    assert torch.equal(out, call(backend, seed=drawn))  # same backend, same key: the same bits


# --------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 2, 5, 7), (0, 3), (2, 0, 5)])
def test_empty_batch_returns_an_empty_result(backend, dtype, shape):
    s = Schedule()
    x, m = _xm(shape, dtype)
    outs = {
        "ddpm": fastddpm.ddpm_step(m, 9, x, s, seed=1, backend=backend),
        "ddpm tensor t": fastddpm.ddpm_step(m, _dev_t(*[9] * shape[0]), x, s, seed=1, backend=backend),
        "ddim": fastddpm.ddim_step(m, 9, x, s, prev_t=4, eta=1.0, seed=1, backend=backend),
        "q_sample": (fastddpm.q_sample(x, 9, s, seed=1, backend=backend),),
        "randn": (fastddpm.randn(shape, seed=1, device=DEVICE, dtype=dtype, backend=backend),),
    }
    for name, tensors in outs.items():
        for out in tensors:
            assert out.shape == shape and out.dtype == dtype and out.device == x.device, name


# --------------------------------------------------------------------------- seed and sample_offset
def _every_op(backend, xm=None, **kw):
    """One call of each public op on inputs ``xm = (x, m)`` (fresh ones by default), with ``kw``
    (seed / sample_offset / t) passed through."""
    s = Schedule()
    x, m = _xm() if xm is None else xm
    t = kw.pop("t", 9)
    return {
        "ddpm_step": lambda: fastddpm.ddpm_step(m, t, x, s, backend=backend, **kw),
        "ddim_step": lambda: fastddpm.ddim_step(m, t, x, s, prev_t=2, eta=1.0, backend=backend, **kw),
        "q_sample": lambda: fastddpm.q_sample(x, t, s, backend=backend, **kw),
        "randn": lambda: fastddpm.randn(SHAPE, t=t, device=DEVICE, backend=backend, **({"seed": 0} | kw)),
    }


@pytest.mark.parametrize(
    "seed,exc,match",
    [
        (-1, ValueError, r"seed=-1 is out of range \[0, 2\*\*64\)"),
        (2**64, ValueError, r"seed=18446744073709551616 is out of range \[0, 2\*\*64\)"),
        (2**65, ValueError, r"seed=.* is out of range \[0, 2\*\*64\)"),
        (True, TypeError, r"seed must be an int in \[0, 2\*\*64\), got True"),
        (1.0, TypeError, r"seed must be an int .*got 1.0 \(float\)"),
        ("7", TypeError, r"seed must be an int .*got '7' \(str\)"),
        (torch.tensor(7), TypeError, r"seed must be an int .*got Tensor"),
        (np.float64(3), TypeError, r"seed must be an int"),
    ],
)
def test_bad_seed_is_refused_by_every_op(seed, exc, match):
    for call in _every_op("reference", seed=seed).values():
        with pytest.raises(exc, match=match):
            call()


def test_seed_edges_and_numpy_seeds_key_the_same_noise(backend):
    """The ends of [0, 2**64) are valid; numpy integers are the same seeds as Python ints; 2**64 - 1
    and 2**63 are distinct keys (nothing wraps)."""
    xm = _xm()
    calls_int = _every_op(backend, xm, seed=SEED_LIMIT - 1)
    calls_np = _every_op(backend, xm, seed=np.uint64(SEED_LIMIT - 1))
    calls_other = _every_op(backend, xm, seed=2**63)
    for name in calls_int:
        a, b, c = calls_int[name](), calls_np[name](), calls_other[name]()
        a, b, c = (v[0] if isinstance(v, tuple) else v for v in (a, b, c))
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name


def test_seed_word_is_the_int64_bit_pattern():
    assert seed_word(0) == 0
    assert seed_word(2**63 - 1) == 2**63 - 1
    assert seed_word(2**63) == -(2**63)
    assert seed_word(2**64 - 1) == -1
    assert seed_word(np.int64(5)) == 5
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            seed_word(bad)


def test_trajectory_reset_uses_the_same_seed_rule():
    from fastddpm.sampling import Trajectory, make_plan

    s = Schedule(num_train_timesteps=20)
    plan = make_plan(s, "ddpm", 4, "leading", 0.0, torch.device("cpu"))
    traj = Trajectory(lambda x, t: torch.zeros_like(x), s, plan, 2, (1, 2, 3), torch.device("cpu"), "reference", None)
    x = torch.randn(2, 1, 2, 3)
    traj.reset(x, 2**64 - 1, 7)
    assert traj.rng.tolist() == [-1, 7]
    traj.reset(x, np.uint64(2**63), 0)
    assert traj.rng.tolist() == [-(2**63), 0]
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed=.* out of range \[0, 2\*\*64\)"):
            traj.reset(x, bad, 0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\), got -1"):
        fastddpm.sample(lambda x, t: torch.zeros_like(x), s, 1, num_inference_steps=2, shape=(1, 2, 2),
                        seed=-1, progress=False, device="cpu", backend="reference")  # fmt: skip


@pytest.mark.parametrize(
    "offset,exc,match",
    [
        (-1, ValueError, r"sample_offset=-1 is out of range \[0, 2\*\*56\)"),
        (SAMPLE_INDEX_LIMIT, ValueError, r"sample_offset=72057594037927936 is out of range \[0, 2\*\*56\)"),
        (SAMPLE_INDEX_LIMIT - 2, ValueError, r"sample_offset=72057594037927934 with a batch of 3 .* 2\*\*56"),
        (True, TypeError, "sample_offset must be an int >= 0, got True"),
        (2.0, TypeError, r"sample_offset must be an int >= 0, got 2.0 \(float\)"),
        (None, TypeError, "sample_offset must be an int >= 0, got NoneType"),
    ],
)
def test_bad_sample_offset_is_refused_by_every_op(offset, exc, match):
    for call in _every_op("reference", seed=1, sample_offset=offset).values():
        with pytest.raises(exc, match=match):
            call()


def test_largest_sample_offset_is_valid_and_numpy_offsets_match(backend):
    top = SAMPLE_INDEX_LIMIT - SHAPE[0]  # the batch's last index is 2**56 - 1
    xm = _xm()
    a = _every_op(backend, xm, seed=3, sample_offset=top)
    b = _every_op(backend, xm, seed=3, sample_offset=np.int64(top))
    for name in a:
        va, vb = a[name](), b[name]()
        va, vb = (v[0] if isinstance(v, tuple) else v for v in (va, vb))
        assert torch.isfinite(va).all() and torch.equal(va, vb), name
    ref = fastddpm.randn(SHAPE, seed=3, sample_offset=top, t=9, device=DEVICE, backend="reference")
    fused = fastddpm.randn(SHAPE, seed=3, sample_offset=top, t=9, device=DEVICE, backend=backend)
    # index 2**56 - 1 keeps its high bits in c3: the backends agree there (to float32 rounding of
    # the transcendentals), which an offset taken mod 2**56 or 2**32 would not.
    assert float((ref.double() - fused.double()).abs().max()) < 1e-5


# --------------------------------------------------------------------------- numpy integers and bools
def test_numpy_timesteps_equal_python_ints(backend):
    s = Schedule()
    x, m = _xm()
    for t_np, p_np in [(np.int64(9), np.int32(4)), (np.int16(9), np.uint8(4))]:
        assert torch.equal(
            fastddpm.ddpm_step(m, t_np, x, s, prev_t=p_np, seed=2, backend=backend)[0],
            fastddpm.ddpm_step(m, 9, x, s, prev_t=4, seed=2, backend=backend)[0],
        )
        assert torch.equal(
            fastddpm.ddim_step(m, t_np, x, s, prev_t=p_np, eta=0.3, seed=2, backend=backend)[0],
            fastddpm.ddim_step(m, 9, x, s, prev_t=4, eta=0.3, seed=2, backend=backend)[0],
        )
        assert torch.equal(
            fastddpm.q_sample(x, t_np, s, seed=2, backend=backend), fastddpm.q_sample(x, 9, s, seed=2, backend=backend)
        )
        assert torch.equal(
            fastddpm.randn(SHAPE, seed=2, t=t_np, device=DEVICE, backend=backend),
            fastddpm.randn(SHAPE, seed=2, t=9, device=DEVICE, backend=backend),
        )


BAD_T = [
    (1000, ValueError, r"t=1000 is out of range \[0, 1000\)"),
    (np.int64(1000), ValueError, r"t=1000 is out of range \[0, 1000\)"),
    (-1, ValueError, r"t=-1 is out of range \[0, 1000\)"),
    (True, TypeError, r"t must be an int or an integer tensor, got True \(bool\)"),
    (np.bool_(True), TypeError, r"t must be an int or an integer tensor, got bool"),
    (5.0, TypeError, "t must be an int or an integer tensor, got the float 5.0"),
    (np.float64(5), TypeError, "t must be an int or an integer tensor, got the float 5.0"),
    (np.float32(5), TypeError, "t must be an int or an integer tensor, got float32"),
    ("5", TypeError, r"t must be an int or an integer tensor, got '5' \(str\)"),
    (None, TypeError, "t must be an int or an integer tensor, got None"),
]


@pytest.mark.parametrize("t,exc,match", BAD_T)
@pytest.mark.parametrize("op", ["ddpm", "ddim"])
def test_bad_t_gives_the_same_error_on_the_int_and_the_tensor_path(t, exc, match, op):
    """An int prev_t takes the cached int-pair path, a tensor prev_t the tensor path: same errors."""
    s = Schedule()
    x, m = _xm()
    step = fastddpm.ddpm_step if op == "ddpm" else fastddpm.ddim_step
    for prev_t in (2, np.int64(2), _dev_t(2, 2, 2)):
        for be in ("reference", "auto"):
            with pytest.raises(exc, match=match):
                step(m, t, x, s, prev_t=prev_t, seed=0, backend=be)
    if t is not None:  # q_sample and randn take t alone (randn's range is [0, 2**31))
        with pytest.raises(exc, match=match):
            fastddpm.q_sample(x, t, s, seed=0)


BAD_PREV = [
    (True, TypeError, "prev_t must be an int or an integer tensor, got True"),
    (np.int64(9), ValueError, "prev_t must be smaller than t"),
    (np.int64(-2), ValueError, r"prev_t=-2 is out of range \[-1, 1000\)"),
    (3.0, TypeError, "prev_t must be an int or an integer tensor, got the float 3.0"),
]


@pytest.mark.parametrize("prev_t,exc,match", BAD_PREV)
def test_bad_prev_t_gives_the_same_error_on_the_int_and_the_tensor_path(prev_t, exc, match):
    s = Schedule()
    x, m = _xm()
    for t in (9, np.int64(9), _dev_t(9, 9, 9)):  # the int pair path, then the tensor path
        with pytest.raises(exc, match=match):
            fastddpm.ddpm_step(m, t, x, s, prev_t=prev_t, seed=0)
        with pytest.raises(exc, match=match):
            fastddpm.ddim_step(m, t, x, s, prev_t=prev_t, seed=0)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fastddpm.randn((2.5, 3), seed=0), TypeError, r"shape must be a sequence of ints >= 0, got 2.5"),
        (lambda: fastddpm.randn((-1, 3), seed=0), ValueError, r"shape=-1 is out of range"),
        (lambda: fastddpm.randn((True, 3), seed=0), TypeError, "shape must be"),
        (lambda: fastddpm.randn(4, seed=0), TypeError, "shape must be a sequence"),
        (lambda: fastddpm.randn((), seed=0), ValueError, "batch dimension"),
        (lambda: fastddpm.randn((2, 3), seed=0, stream=True), ValueError, "unknown stream True"),
        (lambda: fastddpm.randn((2, 3), seed=0, t=2**31), ValueError, r"t=2147483648 is out of range \[0, 2\*\*31\)"),
    ],
)
def test_bad_randn_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "eta,exc,match",
    [
        (-0.5, ValueError, "eta must be >= 0, got -0.5"),
        (math.nan, ValueError, "eta must be finite, got nan"),
        (math.inf, ValueError, "eta must be finite, got inf"),
        ("1", TypeError, r"eta must be a real number, got '1' \(str\)"),
        (True, TypeError, "eta must be a real number, got True"),
    ],
)
def test_bad_eta(eta, exc, match):
    x, m = _xm()
    with pytest.raises(exc, match=match):
        fastddpm.ddim_step(m, 9, x, Schedule(), prev_t=4, eta=eta, seed=0)


def test_numpy_eta_equals_float(backend):
    x, m = _xm()
    s = Schedule()
    a = fastddpm.ddim_step(m, 9, x, s, prev_t=4, eta=np.float32(0.5), seed=0, backend=backend)[0]
    assert torch.equal(a, fastddpm.ddim_step(m, 9, x, s, prev_t=4, eta=0.5, seed=0, backend=backend)[0])


def test_numpy_shape_is_accepted():
    a = fastddpm.randn(np.array([2, 3]), seed=4, backend="reference")
    assert a.shape == (2, 3) and torch.equal(a, fastddpm.randn((2, 3), seed=4, backend="reference"))


# --------------------------------------------------------------------------- requires_grad
def _f64_grads(fn, *inputs):
    """Gradients of sum(fn(*inputs) * w) for fixed random w, in float64 on the reference backend."""
    leaves = [v.detach().double().requires_grad_(True) for v in inputs]
    out = fn(*leaves, backend="reference")
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(out.device)
    (out * w).sum().backward()
    return [v.grad for v in leaves], w


@pytest.mark.parametrize("op", ["ddpm", "ddim", "q_sample"])
def test_inputs_that_require_grad_get_a_working_backward(backend, op):
    s = Schedule(clip_sample=False)
    x, m = _xm()
    z = torch.randn_like(x)
    fn = {
        "ddpm": lambda m_, x_, z_, backend: fastddpm.ddpm_step(m_, 9, x_, s, noise=z_, backend=backend)[0],
        "ddim": lambda m_, x_, z_, backend: fastddpm.ddim_step(
            m_, 9, x_, s, prev_t=3, eta=0.7, noise=z_, backend=backend
        )[0],  # fmt: skip
        "q_sample": lambda m_, x_, z_, backend: fastddpm.q_sample(x_, 9, s, z_, backend=backend) + 0 * m_,
    }[op]
    want, w = _f64_grads(fn, m, x, z)
    leaves = [v.clone().requires_grad_(True) for v in (m, x, z)]
    out = fn(*leaves, backend=backend)
    assert out.requires_grad and out.dtype == torch.float32
    (out * w.float()).sum().backward()
    for got, ref in zip((v.grad for v in leaves), want, strict=True):
        # the gradient is a product of O(1) float64 coefficients: float32 rounding of one multiply-add
        assert float((got.double() - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_requires_grad_under_no_grad_keeps_the_fused_path(backend, monkeypatch):
    if backend == "reference":
        pytest.skip("the reference backend is the differentiable path itself")
    import fastddpm.reference

    def refuse(*args, **kwargs):
        raise AssertionError("routed to the reference math although no grad is recorded")

    for name in ("ddpm_step", "ddim_step", "q_sample"):
        monkeypatch.setattr(fastddpm.reference, name, refuse)
    s = Schedule()
    x, m = _xm()
    m.requires_grad_(True)
    x.requires_grad_(True)
    with torch.no_grad():
        outs = [*fastddpm.ddpm_step(m, 9, x, s, seed=1, backend=backend),
                *fastddpm.ddim_step(m, 9, x, s, prev_t=3, eta=1.0, seed=1, backend=backend),
                fastddpm.q_sample(x, 9, s, seed=1, backend=backend)]  # fmt: skip
    assert not any(o.requires_grad for o in outs)


# --------------------------------------------------------------------------- CUDA graph capture
@pytest.mark.parametrize("op", ["ddpm_step", "ddim_step", "q_sample", "randn"])
def test_ops_refuse_to_run_under_a_users_cuda_graph_capture(monkeypatch, op):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    call = _every_op("reference", seed=None)[op]
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match=rf"fastddpm.{op} cannot run inside a CUDA graph capture.*fastddpm.sample"):
        call()
    assert torch.equal(torch.get_rng_state(), before)  # refused before any seed was drawn


def test_ops_run_when_cuda_is_there_but_not_capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for name, call in _every_op("reference", seed=1).items():
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(out).all(), name


def test_op_docstrings_state_the_rules():
    for op in (fastddpm.ddpm_step, fastddpm.ddim_step, fastddpm.q_sample, fastddpm.randn):
        doc = op.__doc__
        assert "CUDA graph" in doc and "2**64" in doc and "2**56" in doc and "get_rng_state" in doc


# --------------------------------------------------------------------------- Schedule constructor
@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(clip_sample="false"), TypeError, r"clip_sample must be True or False, got 'false' \(str\)"),
        (dict(clip_sample=1), TypeError, "clip_sample must be True or False, got 1"),
        (dict(thresholding="yes"), TypeError, "thresholding must be True or False"),
        (dict(rescale_betas_zero_snr=None), TypeError, "rescale_betas_zero_snr must be True or False"),
        (dict(set_alpha_to_one=np.bool_(True)), TypeError, "set_alpha_to_one must be True or False"),
        (dict(clip_sample_range=math.nan), ValueError, "clip_sample_range must be finite, got nan"),
        (dict(clip_sample_range=math.inf), ValueError, "clip_sample_range must be finite, got inf"),
        (dict(clip_sample_range=-1.0), ValueError, "clip_sample_range must be > 0, got -1.0"),
        (dict(clip_sample_range=0), ValueError, "clip_sample_range must be > 0"),
        (dict(clip_sample_range="1.0"), TypeError, "clip_sample_range must be a real number"),
        (dict(clip_sample_range=True), TypeError, "clip_sample_range must be a real number"),
        (dict(num_train_timesteps=True), TypeError, r"num_train_timesteps must be an int, got True \(bool\)"),
        (dict(num_train_timesteps=1000.0), TypeError, "num_train_timesteps must be an int, got 1000.0"),
        (dict(num_train_timesteps=0), ValueError, r"num_train_timesteps=0 is out of range \[1, 2\*\*31\)"),
        (dict(num_train_timesteps=2**31), ValueError, r"num_train_timesteps=2147483648 is out of range"),
        (dict(beta_start=math.nan), ValueError, "beta_start must be finite"),
        (dict(beta_end=math.inf), ValueError, "beta_end must be finite"),
        (dict(beta_end="0.02"), TypeError, "beta_end must be a real number"),
        (dict(beta_start=-0.1), ValueError, "beta_start and beta_end must be >= 0"),
        (dict(beta_end=2.0), ValueError, r"betas must be finite and in \[0, 1\]"),
        (dict(dynamic_thresholding_ratio=math.nan), ValueError, "dynamic_thresholding_ratio must be finite"),
        (dict(dynamic_thresholding_ratio=1.5), ValueError, r"dynamic_thresholding_ratio must be in \(0, 1\]"),
        (dict(sample_max_value=0.5), ValueError, "sample_max_value must be >= 1"),
        (dict(sample_max_value=math.nan), ValueError, "sample_max_value must be finite"),
        (dict(steps_offset=-1), ValueError, r"steps_offset=-1 is out of range \[0, 1000\)"),
        (dict(steps_offset=1000), ValueError, r"steps_offset=1000 is out of range \[0, 1000\)"),
        (dict(steps_offset=1.5), TypeError, "steps_offset must be an int"),
        (dict(steps_offset=False), TypeError, "steps_offset must be an int"),
        (dict(beta_schedule=["linear"]), ValueError, "unknown beta_schedule"),
        (dict(variance_type=None), ValueError, "unknown variance_type None"),
        (dict(prediction_type="eps"), ValueError, "unknown prediction_type 'eps'; allowed: 'epsilon'"),
        (dict(timestep_spacing=1), ValueError, "unknown timestep_spacing 1"),
        (dict(num_train_timesteps=3, trained_betas="0.1"), TypeError, "trained_betas must be a sequence"),
        (dict(num_train_timesteps=2, trained_betas=[0.1, "0.2"]), TypeError, r"trained_betas\[1\] must be a real"),
        (dict(num_train_timesteps=2, trained_betas=[0.1, math.nan]), ValueError, r"trained_betas\[1\] must be finite"),
        (dict(num_train_timesteps=2, trained_betas=[0.1, -0.2]), ValueError, r"betas must be finite and in \[0, 1\]"),
        (dict(num_train_timesteps=3, trained_betas=[0.1, 0.2]), ValueError, "trained_betas has 2 values"),
    ],
)
def test_schedule_refuses_bad_fields(kw, exc, match):
    with pytest.raises(exc, match=match):
        Schedule(**kw)


def test_schedule_normalises_numpy_and_int_fields():
    a = Schedule(
        num_train_timesteps=np.int64(50), beta_end=np.float32(0.02), clip_sample_range=2, steps_offset=np.int8(1)
    )
    b = Schedule(num_train_timesteps=50, beta_end=float(np.float32(0.02)), clip_sample_range=2.0, steps_offset=1)
    assert a == b and hash(a) == hash(b)
    assert type(a.num_train_timesteps) is int and type(a.clip_sample_range) is float and type(a.steps_offset) is int
    betas = np.linspace(1e-4, 0.02, 50)
    for tb in (betas, torch.from_numpy(betas), list(betas)):
        c = Schedule(num_train_timesteps=50, trained_betas=tb)
        assert c.trained_betas == tuple(float(v) for v in betas)
        assert all(type(v) is float for v in c.trained_betas)


def test_schedule_from_diffusers_keeps_the_checks():
    assert Schedule.from_diffusers({"num_train_timesteps": 100.0}).num_train_timesteps == 100
    with pytest.raises(TypeError, match="num_train_timesteps must be an int"):
        Schedule.from_diffusers({"num_train_timesteps": True})
    with pytest.raises(TypeError, match="clip_sample must be True or False"):
        Schedule.from_diffusers({"clip_sample": "false"})
    with pytest.raises(TypeError, match="num_train_timesteps must be an int"):
        Schedule.from_diffusers({"num_train_timesteps": 100.5})


def test_schedule_timesteps_takes_whole_step_counts():
    s = Schedule(num_train_timesteps=100)
    assert torch.equal(s.timesteps(np.int64(10), "trailing"), s.timesteps(10, "trailing"))
    for bad, exc, match in [
        (True, TypeError, "num_inference_steps must be an int, got True"),
        (10.5, TypeError, r"num_inference_steps must be an int, got 10.5 \(float\)"),
        (0, ValueError, r"num_inference_steps must be in \[1, 100\], got 0"),
        (101, ValueError, r"num_inference_steps must be in \[1, 100\], got 101"),
    ]:
        with pytest.raises(exc, match=match):
            s.timesteps(bad, "leading")
