"""pytest-benchmark suite of the sampling rows of ``benchmarks/harness.py``.

Run (not part of ``pytest tests``)::

    pytest benchmarks/test_bench_sampling.py                       # small sizes, CPU or GPU
    FASTDDPM_BENCH_FULL=1 pytest benchmarks/test_bench_sampling.py  # the full GPU cases (batch 1, 16, 256)
    pytest benchmarks/test_bench_sampling.py --benchmark-compare    # against a saved run

Each benchmark round is one timed run of ``steps`` sampling steps (``extra_info["steps"]``; divide the
times by it for ms/step); on CUDA the round ends with ``torch.cuda.synchronize()`` so the host timer
covers the GPU work. Rows of one case share a ``group`` so pytest-benchmark prints them side by side.
``fastddpm bench`` gives the same rows with ratios, percentiles and projections in JSON/CSV/PNG.
"""

from __future__ import annotations

import os

import harness as H
import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("FASTDDPM_BENCH_FULL", "") not in ("", "0")
CUDA = DEVICE.type == "cuda"

if FULL:
    CASES = H.default_cases(DEVICE.type)
elif CUDA:
    CASES = [H.Case("ddpm-cifar10", 16), H.Case("digits", 64)]
else:
    CASES = [H.Case("digits", 16)]
CFG = H.default_config(str(DEVICE), steps=20 if CUDA else 2)
ROWS = [H.Row("B0b"), H.Row("B0a"), H.Row("F1"), H.Row("F2"), H.Row("F3", steps_per_graph=10 if CUDA else 2)]
if CUDA:
    ROWS += [H.Row("F2", H.Variant(dtype="bf16", channels_last=True))]
ROUNDS = 10 if CUDA else 3


@pytest.fixture(scope="module")
def contexts():
    models: dict = {}
    made: dict = {}

    def get(case: H.Case) -> H.CaseContext:
        if case not in made:
            with torch.inference_mode():
                made[case] = H.CaseContext(case, CFG, DEVICE, models)
        return made[case]

    yield get
    for ctx in made.values():
        ctx.close()


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name.replace(" ", "-"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-b{c.batch}")
def test_sampling_speed(benchmark, contexts, case, row):
    ctx = contexts(case)
    clock = H.Clock(DEVICE)
    with torch.inference_mode(), H.variant_context(row.variant, DEVICE):
        try:
            prepared = H.PREPARERS[row.kind](ctx, row)
        except H.Skip as e:
            pytest.skip(str(e))
        clock.wall(prepared.run)  # warm-up: compilation, autotuning, lazy initialisation

        def one_run() -> None:
            prepared.run()
            clock.sync()

        benchmark.group = f"{case.model} batch {case.batch}, {ctx.steps} steps, {DEVICE.type}"
        benchmark.extra_info.update(steps=ctx.steps, batch=case.batch, backend=prepared.backend, row=row.name)
        benchmark.pedantic(one_run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        images = prepared.output()
    assert images is not None and images.shape[0] == case.batch
    assert torch.isfinite(images).all(), f"{row.name} produced non-finite images"
