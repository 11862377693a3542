"""pytest-benchmark suite of the CPU step rows of ``benchmarks/step_cpu.py``.

Run (not part of ``pytest tests``)::

    pytest benchmarks/test_bench_step_cpu.py                        # B = 16 x 3 x 32 x 32
    FASTDDPM_BENCH_FULL=1 pytest benchmarks/test_bench_step_cpu.py  # B = 512 (the reference size)

Rows share one pytest-benchmark ``group`` per kind (step, noise, transcendental yardsticks), so the
fused kernel is printed next to diffusers' step and the eager formula. ``step_cpu.py`` gives the same
rows timed round-robin with ratios, percentiles and a JSON file.
"""

from __future__ import annotations

import math
import os

import pytest
import step_cpu
import torch

from fastddpm.backends import cpu

FULL = os.environ.get("FASTDDPM_BENCH_FULL", "") not in ("", "0")
BATCH = 512 if FULL else 16

pytest.importorskip("diffusers")

GROUPS = {
    "fused step (cpu backend, Philox in kernel)": "step",
    "diffusers DDPMScheduler.step": "step",
    "eager formula + torch.randn": "step",
    "noise: fastddpm cpu randn": "noise",
    "noise: torch.randn": "noise",
    "torch.log (same numel)": "transcendental",
    "torch.sin (same numel)": "transcendental",
    "torch.exp (same numel)": "transcendental",
}


@pytest.fixture(scope="module")
def rows():
    ok, why = cpu.available()
    if not ok:
        pytest.skip(why)
    timed, checks = step_cpu.make_rows(BATCH)
    # the fused step is diffusers' step: same result with the same noise
    assert checks["max_abs_diff_fused_vs_diffusers_same_noise"] < 1e-5
    return timed


@pytest.mark.parametrize("name", list(GROUPS), ids=lambda n: n.split(" (")[0].replace(" ", "-").replace(":", ""))
def test_step_cpu_speed(benchmark, rows, name):
    benchmark.group = f"{GROUPS[name]} B={BATCH}"
    benchmark.extra_info.update(
        batch=BATCH, numel=BATCH * math.prod(step_cpu.SHAPE), threads=torch.get_num_threads(), row=name
    )
    benchmark.pedantic(rows[name], rounds=20 if FULL else 50, warmup_rounds=2)
