import os

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
