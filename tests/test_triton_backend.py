"""Triton backend (fastddpm.backends.triton) against float64 references built from the contract.

Runs the kernels on CPU tensors through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). The references below are written straight from
the formulas in fastddpm/_layout.py; noise references come from fastddpm.noise (the plain-torch
Philox spec).
"""

import pytest
import torch

from fastddpm import _layout as L
from fastddpm import noise as nz

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fastddpm.kernels.philox import philox_bits  # noqa: E402

from fastddpm.backends import triton as tb  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """Asked when a test runs, not at import: collection stays free of backend probes."""
    ok, why = tb.available("cpu")
    if not ok:
        pytest.skip(why)


B, C, H, W = 3, 5, 7, 11
N = C * H * W  # 385: odd, not a multiple of 4
R = 6  # rows of the coefficient table
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN = float("nan")


# --- inputs -------------------------------------------------------------------------------------


def _coef_table() -> torch.Tensor:
    """Random per-step coefficients [R, NCOEF] with DDPM-like magnitudes; row 1 has GATE = 0."""
    c = torch.empty(R, L.NCOEF, dtype=torch.float64)
    c[:, L.COEF_CX] = 1.0 + 2.0 * torch.rand(R)  # 1/sqrt(abar)
    c[:, L.COEF_CM] = -(0.1 + 2.0 * torch.rand(R))  # -sqrt(1/abar - 1)
    c[:, L.COEF_EX] = 0.5 + torch.rand(R)
    c[:, L.COEF_EM] = torch.randn(R) * 0.3
    c[:, L.COEF_E0] = -(0.2 + torch.rand(R))
    c[:, L.COEF_P0] = torch.rand(R)
    c[:, L.COEF_PX] = 0.5 + 0.5 * torch.rand(R)
    c[:, L.COEF_PE] = torch.randn(R) * 0.5
    c[:, L.COEF_STD] = 0.05 + 0.3 * torch.rand(R)
    c[:, L.COEF_LVA] = 0.2 + 0.5 * torch.rand(R)
    c[:, L.COEF_LVB] = -(1.0 + 4.0 * torch.rand(R))
    c[:, L.COEF_GATE] = (torch.arange(R) != 1).double()
    return c.float()


def _rng(seed: int | None = None, offset: int | None = None) -> torch.Tensor:
    if seed is None:
        seed = int(torch.randint(-(2**62), 2**62, ()))
    if offset is None:
        offset = int(torch.randint(0, 2**40, ()))
    return torch.tensor([seed, offset], dtype=torch.int64)


def _strided(shape: tuple[int, int], dtype: torch.dtype, pad: int = 3, fill: float | None = None) -> torch.Tensor:
    """A [B, N] view with per-sample stride N + pad (columns 1..N of a wider buffer)."""
    buf = (
        torch.randn(shape[0], shape[1] + pad).to(dtype)
        if fill is None
        else torch.full((shape[0], shape[1] + pad), fill, dtype=dtype)
    )
    return buf[:, 1 : shape[1] + 1]


def _pad_untouched(view: torch.Tensor) -> bool:
    """Columns of the wider buffer around a `_strided` view still hold NaN."""
    buf = torch.as_strided(view, (view.shape[0], view.stride(0)), (view.stride(0), 1), view.storage_offset() - 1)
    keep = torch.ones(view.stride(0), dtype=torch.bool)
    keep[1 : view.shape[1] + 1] = False
    return bool(torch.isnan(buf[:, keep]).all())


# --- references ---------------------------------------------------------------------------------


def _step_formula(x, m, v, z, coef, rows, thresh, *, clip_mode, clip_range, var_mode, noise_mode, x0_only, dtype):
    """The update of fastddpm/_layout.py with every operand cast to `dtype` (float64: the reference;
    a low-precision dtype: what plain torch computes in that dtype). Returns (prev, x0)."""
    c = coef.to(dtype)[rows.long()]

    def col(k):
        return c[:, k : k + 1]

    x, m = x.to(dtype), m.to(dtype)
    x0 = col(L.COEF_CX) * x + col(L.COEF_CM) * m
    if clip_mode == L.CLIP_RANGE:
        x0 = x0.clamp(-clip_range, clip_range)
    if x0_only:
        return None, x0
    if clip_mode == L.CLIP_THRESHOLD:
        s = thresh.to(dtype)[:, None]
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    eps = col(L.COEF_EX) * x + col(L.COEF_EM) * m + col(L.COEF_E0) * x0
    mean = col(L.COEF_P0) * x0 + col(L.COEF_PX) * x + col(L.COEF_PE) * eps
    if noise_mode == L.NOISE_NONE:
        return mean, x0
    if var_mode == L.VAR_LEARNED:
        std = torch.exp(0.5 * (col(L.COEF_LVA) * v.to(dtype) + col(L.COEF_LVB)))
    else:
        std = col(L.COEF_STD)
    return torch.where(col(L.COEF_GATE) != 0, mean + std * z.to(dtype), mean), x0


def _assert_matches(out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor | None, what: str) -> None:
    """fp32 outputs: close to the float64 reference. fp16/bf16: error at most 2x plain torch's."""
    assert not torch.isnan(out).any(), f"{what}: NaN left in the output (element not written)"
    if out.dtype == torch.float32 or baseline is None:
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5, msg=what)
        return
    err = (out.double() - ref).abs().max().item()
    err_torch = (baseline.double() - ref).abs().max().item()
    slack = 1e-6
    assert err <= 2.0 * err_torch + slack, (
        f"{what}: fused error {err:.3g} > 2x plain-torch {out.dtype} error {err_torch:.3g} (+ {slack:.3g})"
    )


# --- step ---------------------------------------------------------------------------------------


def _run_step(dtype, clip_mode, var_mode, noise_mode, *, x0_only=False, write_x0=True, rows=None, rng=None):
    """Make fresh inputs (strided, 2C model output), run the triton step, return everything."""
    x = _strided((B, N), dtype)
    model_out = torch.randn(B, 2 * C if var_mode == L.VAR_LEARNED else C, H, W).mul(2.0).to(dtype)
    m = model_out[:, :C].reshape(B, N)  # per-sample stride 2N when the variance channels follow
    v = model_out[:, C:].reshape(B, N) if var_mode == L.VAR_LEARNED else None
    coef = _coef_table()
    tval = torch.randint(1, 1000, (R,), dtype=torch.int64)
    rows = torch.tensor([2, 1, 0], dtype=torch.int64) if rows is None else rows
    thresh = (1.0 + 2.0 * torch.rand(B)) if clip_mode == L.CLIP_THRESHOLD and not x0_only else None
    rng = _rng() if rng is None else rng
    noise = None
    if noise_mode == L.NOISE_TENSOR:
        noise = _strided((B, N), dtype, pad=2)
        noise[coef[rows, L.COEF_GATE] == 0] = NAN  # never read where the step adds no noise
    prev = None if x0_only else _strided((B, N), dtype, fill=NAN)
    x0_out = None
    if x0_only:
        x0_out = torch.full((B, N), NAN, dtype=torch.float32)
    elif write_x0:
        x0_out = torch.full((B, N), NAN, dtype=dtype)
    clip_range = 1.5
    tb.step(
        x, m, v, noise, prev, x0_out, coef, tval, rows, thresh, rng,
        clip_mode=clip_mode, clip_range=clip_range, var_mode=var_mode, noise_mode=noise_mode, x0_only=x0_only,
    )  # fmt: skip
    if noise_mode == L.NOISE_PHILOX:
        g = rng[1] + torch.arange(B)
        noise = nz.philox_normal(int(rng[0]), g, tval[rows], N, L.STREAM_STEP, dtype=torch.float64)
    kw = dict(clip_mode=clip_mode, clip_range=clip_range, var_mode=var_mode, noise_mode=noise_mode, x0_only=x0_only)
    ref = _step_formula(x, m, v, noise, coef, rows, thresh, dtype=torch.float64, **kw)
    base = None
    if dtype != torch.float32 and not x0_only:
        base = _step_formula(x, m, v, noise, coef, rows, thresh, dtype=dtype, **kw)
    return prev, x0_out, ref, base


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noise_mode", [L.NOISE_NONE, L.NOISE_TENSOR, L.NOISE_PHILOX], ids=["none", "tensor", "philox"])
@pytest.mark.parametrize("var_mode", [L.VAR_FIXED, L.VAR_LEARNED], ids=["fixed", "learned"])
@pytest.mark.parametrize("clip_mode", [L.CLIP_NONE, L.CLIP_RANGE, L.CLIP_THRESHOLD], ids=["noclip", "range", "thresh"])
def test_step_matches_reference(clip_mode, var_mode, noise_mode, dtype):
    prev, x0_out, (ref_prev, ref_x0), base = _run_step(dtype, clip_mode, var_mode, noise_mode)
    _assert_matches(prev, ref_prev, None if base is None else base[0], "prev")
    _assert_matches(x0_out, ref_x0, None if base is None else base[1], "x0")
    assert _pad_untouched(prev), "the step wrote outside prev_out's [B, N] view"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip_mode", [L.CLIP_NONE, L.CLIP_RANGE, L.CLIP_THRESHOLD], ids=["noclip", "range", "thresh"])
def test_step_x0_only_writes_clipped_unthresholded_fp32_x0(clip_mode, dtype):
    prev, x0_out, (_, ref_x0), _ = _run_step(dtype, clip_mode, L.VAR_FIXED, L.NOISE_PHILOX, x0_only=True)
    assert prev is None and x0_out.dtype == torch.float32
    _assert_matches(x0_out, ref_x0, None, "x0 (x0_only)")


def test_step_without_x0_out_writes_prev_only():
    prev, _, (ref_prev, _), _ = _run_step(torch.float32, L.CLIP_RANGE, L.VAR_FIXED, L.NOISE_PHILOX, write_x0=False)
    _assert_matches(prev, ref_prev, None, "prev")


def test_step_rows_with_stride_zero():
    rows = torch.tensor([4], dtype=torch.int64).expand(B)  # a device-resident step counter
    assert rows.stride(0) == 0
    prev, x0_out, (ref_prev, ref_x0), _ = _run_step(
        torch.float32, L.CLIP_THRESHOLD, L.VAR_LEARNED, L.NOISE_PHILOX, rows=rows
    )
    _assert_matches(prev, ref_prev, None, "prev")
    _assert_matches(x0_out, ref_x0, None, "x0")


def test_step_noise_does_not_depend_on_batch_composition():
    """Sample 1 of a batch of 3 equals the same sample stepped alone with sample_offset + 1."""
    coef, tval = _coef_table(), torch.randint(1, 1000, (R,), dtype=torch.int64)
    coef[:, L.COEF_GATE] = 1.0
    x, m = torch.randn(B, N), torch.randn(B, N)
    rows = torch.tensor([3, 0, 5], dtype=torch.int64)
    rng = _rng(offset=2**32 - 2)  # sample 1 is g = 2**32 - 1, sample 2 crosses into c3's high bits
    kw = dict(clip_mode=L.CLIP_NONE, clip_range=1.0, var_mode=L.VAR_FIXED, noise_mode=L.NOISE_PHILOX, x0_only=False)
    prev = torch.full((B, N), NAN)
    tb.step(x, m, None, None, prev, None, coef, tval, rows, None, rng, **kw)
    for b in range(B):
        one = torch.full((1, N), NAN)
        rng_b = torch.tensor([int(rng[0]), int(rng[1]) + b], dtype=torch.int64)
        tb.step(x[b : b + 1], m[b : b + 1], None, None, one, None, coef, tval, rows[b : b + 1], None, rng_b, **kw)
        assert torch.equal(one[0], prev[b]), f"sample {b} changed with the batch it was stepped in"


# --- noise --------------------------------------------------------------------------------------


@triton.jit
def _philox_bits_kernel(out_ptr, seed_ptr, g_ptr, t_ptr, NG, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    # out_ptr: [4, NG] int64 receiving r0..r3 of groups 0..NG-1; seed/g/t: int64 scalars in memory.
    q = tl.arange(0, BLOCK)
    r0, r1, r2, r3 = philox_bits(tl.load(seed_ptr), q, tl.load(g_ptr), tl.load(t_ptr), STREAM)
    mask = q < NG
    tl.store(out_ptr + q, r0.to(tl.int64), mask=mask)
    tl.store(out_ptr + NG + q, r1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 2 * NG + q, r2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 3 * NG + q, r3.to(tl.int64), mask=mask)


@pytest.mark.parametrize(
    ("seed", "g", "t", "stream"),
    [
        (0, 0, 0, L.STREAM_STEP),
        (-7, 2**32 + 3, 999, L.STREAM_QSAMPLE),  # negative seed; g past 32 bits
        (2**63 - 25, 12345, 2**32 + 17, L.STREAM_INIT),  # t wraps to its low 32 bits
    ],
)
def test_philox_bits_are_exact(seed, g, t, stream):
    ng = 37
    out = torch.full((4, ng), -1, dtype=torch.int64)
    scalars = [torch.tensor([v], dtype=torch.int64) for v in (seed, g, t)]
    _philox_bits_kernel[(1,)](out, *scalars, ng, STREAM=stream, BLOCK=64)
    mask = 0xFFFFFFFF
    c0 = torch.arange(ng, dtype=torch.int64)  # counter layout of fastddpm/_layout.py
    c1 = torch.full_like(c0, g & mask)
    c2 = torch.full_like(c0, t & mask)
    c3 = torch.full_like(c0, stream | (g >> 32) << 8)
    ref = torch.stack(nz.philox4x32(c0, c1, c2, c3, seed))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("stream", [L.STREAM_STEP, L.STREAM_QSAMPLE, L.STREAM_INIT])
def test_randn_matches_philox_normal(stream, dtype):
    rng = _rng()
    t = torch.randint(0, 2000, (B,), dtype=torch.int64)
    out = _strided((B, N), dtype, fill=NAN)
    tb.randn(out, t, rng, stream=stream)
    ref = nz.philox_normal(int(rng[0]), rng[1] + torch.arange(B), t, N, stream, dtype=torch.float64)
    assert not torch.isnan(out).any()
    # One bf16 ulp: the interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest).
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=2e-5)
    assert _pad_untouched(out)


def test_randn_timestep_stride_zero_and_batch_independence():
    rng = _rng(offset=2**32 + 11)
    t = torch.tensor([1000], dtype=torch.int64).expand(5)
    full = torch.full((5, N), NAN)
    tb.randn(full, t, rng, stream=L.STREAM_INIT)
    one = torch.full((1, N), NAN)
    tb.randn(one, t[:1], torch.tensor([int(rng[0]), int(rng[1]) + 3]), stream=L.STREAM_INIT)
    assert torch.equal(one[0], full[3])
    # Different streams and timesteps give different noise for the same sample.
    other = torch.full((5, N), NAN)
    tb.randn(other, t, rng, stream=L.STREAM_STEP)
    assert (other - full).abs().max() > 1.0


# --- q_sample -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noise_mode", [L.NOISE_TENSOR, L.NOISE_PHILOX], ids=["tensor", "philox"])
@pytest.mark.parametrize("t_expanded", [False, True], ids=["t_per_sample", "t_stride0"])
def test_q_sample_matches_reference(noise_mode, dtype, t_expanded):
    abar = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    table = torch.stack([abar.sqrt(), (1.0 - abar).sqrt()], dim=1).float()
    t = torch.tensor([int(torch.randint(0, 1000, ()))]).expand(B) if t_expanded else torch.randint(0, 1000, (B,))
    x0 = _strided((B, N), dtype)
    noise = _strided((B, N), dtype, pad=1) if noise_mode == L.NOISE_TENSOR else None
    out = _strided((B, N), dtype, fill=NAN)
    rng = _rng()
    tb.q_sample(x0, noise, out, table, t, rng, noise_mode=noise_mode)
    if noise_mode == L.NOISE_PHILOX:
        noise = nz.philox_normal(int(rng[0]), rng[1] + torch.arange(B), t, N, L.STREAM_QSAMPLE, dtype=torch.float64)

    def formula(d):
        coef = table.to(d)[t]
        return coef[:, :1] * x0.to(d) + coef[:, 1:] * noise.to(d)

    _assert_matches(out, formula(torch.float64), formula(dtype), "q_sample")
    assert _pad_untouched(out)


# --- dispatch and argument checks ---------------------------------------------------------------


def test_available_reports_device_support():
    ok, reason = tb.available("cpu")
    assert ok and "interpreter" in reason
    ok, reason = tb.available("meta")
    assert not ok and "meta" in reason


def test_step_rejects_bad_arguments():
    x, m = torch.randn(B, N), torch.randn(B, N)
    coef, tval, rows, rng = _coef_table(), torch.zeros(R, dtype=torch.int64), torch.zeros(B, dtype=torch.int64), _rng()
    prev = torch.empty(B, N)
    kw = dict(clip_mode=L.CLIP_NONE, clip_range=1.0, var_mode=L.VAR_FIXED, noise_mode=L.NOISE_TENSOR, x0_only=False)
    with pytest.raises(ValueError, match="noise"):
        tb.step(x, m, None, None, prev, None, coef, tval, rows, None, rng, **kw)
    with pytest.raises(ValueError, match="unit stride"):
        tb.step(x, torch.randn(N, B).t(), None, x, prev, None, coef, tval, rows, None, rng, **kw)
    with pytest.raises(ValueError, match="rows"):
        tb.step(x, m, None, x, prev, None, coef, tval, rows.int(), None, rng, **kw)
    with pytest.raises(ValueError, match="clip_mode"):
        tb.step(x, m, None, x, prev, None, coef, tval, rows, None, rng, **{**kw, "clip_mode": 7})


# --- device-side index checks: a bad row or timestep poisons its sample, never reads out of bounds -----


@pytest.mark.parametrize("bad_row", [-1, R, 2**40])
def test_step_bad_row_index_gives_nan_for_that_sample_only(bad_row):
    """As the CUDA kernel: the row is clamped for the loads and the sample's outputs are NaN (the CPU
    backend raises instead; a GPU kernel cannot, and must not read out of bounds inside a graph)."""
    x, mo = torch.randn(B, N), torch.randn(B, 2 * N)
    coef, tval, rng = _coef_table(), torch.randint(1, 1000, (R,)), _rng()

    def run(rows):
        prev, x0 = torch.full((B, N), NAN), torch.full((B, N), NAN)
        tb.step(x, mo[:, :N], mo[:, N:], None, prev, x0, coef, tval, rows, None, rng, clip_mode=L.CLIP_RANGE,
                clip_range=1.5, var_mode=L.VAR_LEARNED, noise_mode=L.NOISE_PHILOX, x0_only=False)  # fmt: skip
        return prev, x0

    good = torch.tensor([2, 0, 3], dtype=torch.int64)
    prev_ok, x0_ok = run(good)
    assert not bool(torch.isnan(prev_ok).any())
    bad = good.clone()
    bad[1] = bad_row
    prev, x0 = run(bad)
    assert bool(torch.isnan(prev[1]).all()) and bool(torch.isnan(x0[1]).all())
    for b in (0, 2):
        assert torch.equal(prev[b], prev_ok[b]) and torch.equal(x0[b], x0_ok[b])


@pytest.mark.parametrize("bad_t", [-3, 50, 2**33])
def test_q_sample_bad_timestep_gives_nan_for_that_sample_only(bad_t):
    table = torch.rand(50, 2)
    x0 = torch.randn(B, N)
    rng = _rng()
    t = torch.tensor([4, 7, 49], dtype=torch.int64)
    ok = torch.empty(B, N)
    tb.q_sample(x0, None, ok, table, t, rng, noise_mode=L.NOISE_PHILOX)
    t[0] = bad_t
    out = torch.empty(B, N)
    tb.q_sample(x0, None, out, table, t, rng, noise_mode=L.NOISE_PHILOX)
    assert bool(torch.isnan(out[0]).all())
    assert torch.equal(out[1:], ok[1:])
