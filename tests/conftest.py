import os
import shutil

# The Triton interpreter must be chosen before triton is first imported. On the CPU machine the
# kernels run in it (on CPU tensors); with FASTDDPM_TEST_DEVICE=cuda (benchmarks/gpu_check.py) they
# are compiled for the GPU instead, and the device-aware tests (test_ops, test_cuda_backend) run
# the cuda and triton backends on CUDA tensors.
TEST_DEVICE = os.environ.get("FASTDDPM_TEST_DEVICE", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "0" if TEST_DEVICE == "cuda" else "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


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
