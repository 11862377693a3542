import functools
import os
import shutil
import tempfile

# The Triton interpreter must be chosen before triton is first imported. On the CPU machine the
# kernels run in it (on CPU tensors); with FASTDDPM_TEST_DEVICE=cuda (benchmarks/gpu_check.py) they
# are compiled for the GPU instead, and the device-aware tests (test_ops, test_cuda_backend) run
# the cuda and triton backends on CUDA tensors.
TEST_DEVICE = os.environ.get("FASTDDPM_TEST_DEVICE", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "0" if TEST_DEVICE == "cuda" else "1")
# dtype="auto" caches its per-machine choices; the suite neither reads a user's cache nor writes to it.
os.environ["FASTDDPM_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastddpm-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


# --- the backend contract: tolerances (one place) and bitwise comparison ---------------------------
# Every fused result is compared with the float64 reference computed in the test. Its error may be
# at most TORCH_ERROR_FACTOR times the largest error plain PyTorch makes on the same inputs in
# float32 (the formulas of fastddpm.reference evaluated in float32; flash-attention bounds its
# kernels the same way), plus the rounding of the result to the output dtype: UNIT_ROUNDOFF[dtype]
# times its magnitude (half an ulp: 2**-24 for float32, 2**-11 for float16, 2**-8 for bfloat16).
TORCH_ERROR_FACTOR = 2.0
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def assert_within_torch_error(out: torch.Tensor, ref64: torch.Tensor, torch_f32: torch.Tensor, what: str) -> None:
    """``|out - ref64| <= TORCH_ERROR_FACTOR * max|torch_f32 - ref64| + UNIT_ROUNDOFF[out.dtype] * |ref64|``.

    ``out``: the fused result (float32/16/bf16); ``ref64``: the float64 reference; ``torch_f32``: plain
    PyTorch float32 arithmetic on the same inputs, rounded to ``out``'s dtype. Elements where the
    reference is not finite must be the same non-finite value (NaN where it is NaN).
    """
    ref = ref64.to(torch.float64).cpu()
    got = out.to(torch.float64).cpu()
    base = torch_f32.to(torch.float64).cpu()
    finite = torch.isfinite(ref)
    assert torch.equal(got[~finite].nan_to_num(), ref[~finite].nan_to_num()), f"{what}: non-finite elements differ"
    assert bool(torch.isnan(got[~finite]).eq(torch.isnan(ref[~finite])).all()), (
        f"{what}: NaN where the reference is not"
    )
    torch_err = (base[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    bound = TORCH_ERROR_FACTOR * torch_err + UNIT_ROUNDOFF[out.dtype] * ref[finite].abs()
    err = (got[finite] - ref[finite]).abs()
    worst = (err - bound).argmax() if err.numel() else None
    assert bool((err <= bound).all()), (
        f"{what}: error {err[worst].item():.3g} > bound {bound[worst].item():.3g} "
        f"(plain float32 torch error {torch_err:.3g}, |ref| {ref[finite][worst].abs().item():.3g})"
    )


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """The product's bitwise promise: same shape, dtype and bits (NaN payloads aside: both NaN is equal)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    both_nan = torch.isnan(a) & torch.isnan(b)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    differ = (a.view(ints) != b.view(ints)) & ~both_nan
    assert not bool(differ.any()), (
        f"{what}: {int(differ.sum())} of {a.numel()} elements differ, first at {differ.nonzero()[0].tolist()}: "
        f"{a[differ][0].item()!r} vs {b[differ][0].item()!r}"
    )


@pytest.fixture(scope="session")
def cpu_extension():
    """The cpu backend's C++ extension, built on first use by a test that needs it, never at collection
    (a module deselected with ``-k`` must not cost a build). Skips only where no C++ compiler exists at all;
    a compiler that fails to build it fails the test."""
    from fastddpm import _build
    from fastddpm.backends import cpu

    ok, why = cpu.available()
    if not ok:
        if shutil.which(_build._cxx()) is None:
            pytest.skip(why)
        pytest.fail(f"the CPU extension did not build: {why}")


@functools.cache
def backend_devices() -> dict[str, str]:
    """Each fused backend that runs here and the device its tensors go to (the reference and Triton on the
    test device, cpu on the CPU, cuda on CUDA). Call it at test time, never at collection: asking the cpu
    backend builds its C++ extension."""
    from fastddpm.backends import cpu as cpu_backend
    from fastddpm.backends import cuda as cuda_backend
    from fastddpm.backends import triton as triton_backend

    fused = "cuda" if TEST_DEVICE == "cuda" else "cpu"
    out = {"reference": fused}
    if cpu_backend.available()[0]:
        out["cpu"] = "cpu"
    if triton_backend.available(fused)[0]:
        out["triton"] = fused
    if torch.cuda.is_available() and cuda_backend.available()[0]:
        out["cuda"] = "cuda"
    return out
