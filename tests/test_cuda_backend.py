"""The GPU backends (fastddpm.backends.cuda and, compiled, fastddpm.backends.triton) against the
float64 contract references, on a GPU.

Skipped where no CUDA device (or no toolkit to build the extension) is present; the triton cases
also skip where Triton runs in the interpreter (tests/conftest.py leaves it off when
FASTDDPM_TEST_DEVICE=cuda, as benchmarks/gpu_check.py sets). The references and input builders are
those of tests/test_cpu_backend.py, so every backend is held to the same formulas; here they run
on CUDA tensors, through both the 16-byte vector path (aligned samples) and the element-wise path
(samples at an odd offset), and inside a captured CUDA graph.
"""

import pytest
import torch

from fastddpm import _layout as L
from fastddpm import noise as nz

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from test_cpu_backend import (  # noqa: E402
    CLIP_MODES,
    NOISE_MODES,
    VAR_MODES,
    _coef_table,
    _max_err,
    _philox_z,
    _plain_torch_step,
    _qs_table,
    _ref_step,
    _rng,
    _tval,
)

from fastddpm.backends import cuda as cuda_backend  # noqa: E402
from fastddpm.backends import triton as triton_backend  # noqa: E402

DEV = torch.device("cuda")
B, N = 3, 5 * 7 * 11
NAN = float("nan")


def _backend_module(name: str):
    if name == "cuda":
        ok, why = cuda_backend.available(DEV)
    else:
        ok, why = triton_backend.available(DEV)
        if ok and triton_backend._interpreted(triton_backend._kernels().step):
            ok, why = False, "Triton runs in the interpreter here (TRITON_INTERPRET=1)"
    if not ok:
        pytest.skip(f"{name}: {why}")
    return cuda_backend if name == "cuda" else triton_backend


@pytest.fixture(params=["cuda", "triton"])
def kern(request):
    """The backend module under test: same launcher signatures (see fastddpm.backends)."""
    return _backend_module(request.param)


def _bn(b: int, n: int, dtype: torch.dtype, aligned: bool) -> torch.Tensor:
    """[b, n] CUDA view: contiguous rows padded to 16 bytes (aligned) or at an odd element offset."""
    if aligned:
        width = (n + 7) // 8 * 8
        return torch.randn(b, width, device=DEV).to(dtype)[:, :n]
    return torch.randn(b, n + 5, device=DEV).to(dtype)[:, 3 : 3 + n]


def _step_case(kern, dtype, clip_mode, var_mode, noise_mode, aligned):
    model_out = _bn(B, 2 * N, dtype, aligned)
    inp = dict(
        x=_bn(B, N, dtype, aligned),
        m=model_out[:, :N],
        v=model_out[:, N:] if var_mode == L.VAR_LEARNED else None,
        noise=_bn(B, N, dtype, aligned) if noise_mode == L.NOISE_TENSOR else None,
        coef=_coef_table().to(DEV),
        tval=_tval().to(DEV),
        rows=torch.tensor([0, 1, 4], dtype=torch.int64, device=DEV),
        thresh=(1.0 + 2.0 * torch.rand(B)).to(DEV) if clip_mode == L.CLIP_THRESHOLD else None,
        rng=_rng().to(DEV),
    )
    prev = torch.full((B, N), NAN, dtype=dtype, device=DEV)
    x0 = torch.full((B, N), NAN, dtype=dtype, device=DEV)
    kern.step(inp["x"], inp["m"], inp["v"], inp["noise"], prev, x0, inp["coef"], inp["tval"], inp["rows"],
              inp["thresh"], inp["rng"], clip_mode=clip_mode, clip_range=1.5, var_mode=var_mode,
              noise_mode=noise_mode, x0_only=False)  # fmt: skip
    torch.cuda.synchronize()
    host = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    args = [host[k] for k in ("x", "m", "v", "noise", "coef", "tval", "rows", "thresh", "rng")]
    ref = _ref_step(*args, clip_mode, 1.5, var_mode, noise_mode, False)
    return prev.cpu(), x0.cpu(), ref, args


@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
@pytest.mark.parametrize("noise_mode", NOISE_MODES)
@pytest.mark.parametrize("var_mode", VAR_MODES)
@pytest.mark.parametrize("clip_mode", CLIP_MODES)
def test_cuda_step_float32(kern, clip_mode, var_mode, noise_mode, aligned):
    prev, x0, (ref_prev, ref_x0), _ = _step_case(kern, torch.float32, clip_mode, var_mode, noise_mode, aligned)
    torch.testing.assert_close(x0.double(), ref_x0, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(prev.double(), ref_prev, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
@pytest.mark.parametrize("noise_mode", NOISE_MODES)
@pytest.mark.parametrize("clip_mode", CLIP_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_step_low_precision(kern, dtype, clip_mode, noise_mode, aligned):
    prev, x0, (ref_prev, ref_x0), args = _step_case(kern, dtype, clip_mode, L.VAR_LEARNED, noise_mode, aligned)
    base_prev, base_x0 = _plain_torch_step(*args, clip_mode, 1.5, L.VAR_LEARNED, noise_mode)
    tiny = torch.finfo(dtype).eps * 1e-3
    assert _max_err(prev, ref_prev) <= 2 * _max_err(base_prev, ref_prev) + tiny
    assert _max_err(x0, ref_x0) <= 2 * _max_err(base_x0, ref_x0) + tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_randn_matches_spec_and_cpu(kern, dtype):
    b, n = 4, 1031
    t = torch.tensor([0, 5, 999, 2**33 + 1], dtype=torch.int64)
    rng = _rng()
    out = torch.full((b, n), NAN, dtype=dtype, device=DEV)
    kern.randn(out, t.to(DEV), rng.to(DEV), stream=L.STREAM_INIT)
    seed, offset = (int(v) for v in rng)
    ref = nz.philox_normal(seed, torch.arange(offset, offset + b), t, n, L.STREAM_INIT, dtype=torch.float64)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps * 6
    assert (out.cpu().double() - ref).abs().max().item() <= tol


def test_cuda_noise_is_independent_of_batch_composition(kern):
    seed = int(torch.randint(0, 2**62, ()))
    t = torch.randint(0, 1000, (6,), dtype=torch.int64, device=DEV)
    whole = torch.empty(6, 777, device=DEV)
    kern.randn(whole, t, torch.tensor([seed, 40], device=DEV), stream=L.STREAM_STEP)
    part = torch.empty(2, 777, device=DEV)
    kern.randn(part, t[2:4], torch.tensor([seed, 42], device=DEV), stream=L.STREAM_STEP)
    assert torch.equal(part, whole[2:4])


@pytest.mark.parametrize("noise_mode", [L.NOISE_TENSOR, L.NOISE_PHILOX])
def test_cuda_q_sample(kern, noise_mode):
    table = _qs_table()
    t = torch.tensor([30], dtype=torch.int64).expand(B)  # stride 0
    x0 = torch.randn(B, N)
    noise = torch.randn(B, N) if noise_mode == L.NOISE_TENSOR else None
    rng = _rng()
    out = torch.full((B, N), NAN, device=DEV)
    kern.q_sample(x0.to(DEV), None if noise is None else noise.to(DEV), out, table.to(DEV), t.to(DEV), rng.to(DEV),
                  noise_mode=noise_mode)  # fmt: skip
    z = noise.double() if noise is not None else _philox_z(rng, t, B, N, L.STREAM_QSAMPLE)
    ref = table[30, 0].double() * x0.double() + table[30, 1].double() * z
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-5, atol=2e-5)


def test_cuda_out_of_range_row_gives_nan_not_a_crash():
    """The CUDA kernel bounds-checks the device-resident row index (the Triton kernel trusts the
    launcher: rows come from validated timesteps), so this guard is the cuda backend's alone."""
    cuda = _backend_module("cuda")
    coef, tval = _coef_table().to(DEV), _tval().to(DEV)
    x = torch.randn(B, N, device=DEV)
    prev = torch.zeros(B, N, device=DEV)
    rows = torch.tensor([0, 99, 2], dtype=torch.int64, device=DEV)
    cuda.step(x, x, None, None, prev, None, coef, tval, rows, None, _rng().to(DEV), clip_mode=L.CLIP_NONE,
              clip_range=1.0, var_mode=L.VAR_FIXED, noise_mode=L.NOISE_PHILOX, x0_only=False)  # fmt: skip
    torch.cuda.synchronize()
    assert torch.isnan(prev[1]).all() and torch.isfinite(prev[[0, 2]]).all()


def test_cuda_step_replays_in_a_graph_with_new_rows_and_rng(kern):
    coef, tval = _coef_table().to(DEV), _tval().to(DEV)
    x = torch.randn(B, N, device=DEV)
    m = torch.randn(B, N, device=DEV)
    rows = torch.zeros(B, dtype=torch.int64, device=DEV)
    rng = torch.tensor([123, 0], dtype=torch.int64, device=DEV)
    prev = torch.empty(B, N, device=DEV)

    def launch(out):
        kern.step(x, m, None, None, out, None, coef, tval, rows, None, rng, clip_mode=L.CLIP_RANGE, clip_range=1.0,
                  var_mode=L.VAR_FIXED, noise_mode=L.NOISE_PHILOX, x0_only=False)  # fmt: skip

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch(prev)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(prev)
    rows.fill_(4)
    rng.copy_(torch.tensor([999, 7], device=DEV))
    graph.replay()
    expected = torch.empty(B, N, device=DEV)
    launch(expected)
    torch.cuda.synchronize()
    assert torch.equal(prev, expected)
