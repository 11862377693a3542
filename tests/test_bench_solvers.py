"""The benchmark rows of the multistep solvers (KS, KSD, FS, BS, E2E) in the harness's quick mode on CPU.

The tiny U-Net at batch 2 and 3 solver steps, with the plain-torch ``reference`` backend (no extension build):
every row runs, its numbers are positive and finite, the diffusers comparisons are present when diffusers
is installed, the ratio columns follow from the measured ones, and the fused step the KS row times computes
the same trajectory as the diffusers ``step`` loop the KSD row times. No timing assertions.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import torch

from fastddpm.cli import main as cli_main
from fastddpm.cli_bench import load_harness
from fastddpm.driver import MULTISTEP_SAMPLERS

H = load_harness()
REF = H.Variant(backend="reference")
TINY = H.Case("tiny", 2)
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def _cfg(**kw):
    return H.default_config("cpu", quick=True, kernel_backends=("reference",), **kw)


def _positive(v) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def test_solver_rows_run_and_their_ratios_follow_from_the_measurements(tmp_path):
    quick = [t for t in H.default_tasks("cpu", quick=True) if t.row.kind in H.SOLVER_ROWS]
    kinds = {t.row.kind for t in quick}
    assert kinds == set(H.SOLVER_ROWS)  # every solver row is in the quick matrix
    # The fused rows on the reference backend (no extension build); the few-step E2E row at S=4 (time).
    s_of = {"E2E dpmpp_2m S=10": 4}
    tasks = [H.Task(t.case, H.Row(t.row.kind, REF if t.row.kind in ("FS", "E2E") else t.row.variant,
                                  sampler=t.row.sampler, solver_steps=s_of.get(t.row.name, t.row.solver_steps)))
             for t in quick]  # fmt: skip
    result = H.run_benchmark(_cfg(), tasks, tmp_path, log=None)
    data = json.loads((tmp_path / "bench.json").read_text())
    got = {r["name"]: r for r in data["rows"]}
    want = {"KS dpmpp_2m reference", "KS unipc reference", "FS dpmpp_2m reference",
            "E2E dpmpp_2m S=4 reference", "E2E ddpm S=1000 reference"}  # fmt: skip
    diffusers_rows = {"KSD dpmpp_2m", "KSD unipc", "BS dpmpp_2m"}
    assert set(got) == want | diffusers_rows
    ok = {n for n, r in got.items() if r["status"] == "ok"}
    if HAS_DIFFUSERS:
        assert ok == want | diffusers_rows, {n: r["reason"] for n, r in got.items()}
    else:
        assert ok == want and all("diffusers" in got[n]["reason"] for n in diffusers_rows)
    for name in ok:
        r = got[name]
        assert _positive(r["ms_per_step_median"]) and r["ms_per_step_p20"] <= r["ms_per_step_median"]
        assert r["output_finite"] is True and r["sampler"] == name.split()[1] and r["repeats"] >= 1
    for name in ("KS dpmpp_2m reference", "KS unipc reference"):
        r = got[name]
        assert r["steps"] == 3 and r["bytes_per_call"] == 36 * r["numel"] == 36 * 2 * 64
        assert r["gbps"] == pytest.approx(r["bytes_per_call"] / (r["ms_per_step_median"] / 1e3) / 1e9)
    assert got["FS dpmpp_2m reference"]["steps"] == 3 and got["FS dpmpp_2m reference"]["images_per_s"] > 0
    if HAS_DIFFUSERS:
        pairs = [("KS dpmpp_2m reference", "KSD dpmpp_2m"), ("KS unipc reference", "KSD unipc"),
                 ("FS dpmpp_2m reference", "BS dpmpp_2m")]  # fmt: skip
        for ours, theirs in pairs:
            ratio = got[theirs]["ms_per_step_median"] / got[ours]["ms_per_step_median"]
            assert _positive(got[ours]["speedup_vs_diffusers"])
            assert got[ours]["speedup_vs_diffusers"] == pytest.approx(ratio)
        assert "DPMSolverMultistepScheduler" in got["BS dpmpp_2m"]["backend"]
        assert "UniPCMultistepScheduler" in got["KSD unipc"]["backend"]

    # E2E: e2e_s is the per-step time times S; DDPM-1000 is projected here (e2e_full_max_s=1 s in quick mode).
    e2e, ddpm = got["E2E dpmpp_2m S=4 reference"], got["E2E ddpm S=1000 reference"]
    assert e2e["e2e_s"] == pytest.approx(e2e["ms_per_step_median"] * 4 / 1e3)
    assert ddpm["e2e_s"] == pytest.approx(ddpm["ms_per_step_median"] * 1000 / 1e3)
    assert ddpm["steps"] == 2 and ddpm["note"].startswith("projected") and "1000" in ddpm["note"]
    assert e2e["note"].startswith(("measured", "projected"))
    assert e2e["speedup_vs_ddpm1000"] == pytest.approx(ddpm["e2e_s"] / e2e["e2e_s"])
    assert ddpm["speedup_vs_ddpm1000"] == pytest.approx(1.0)

    with open(tmp_path / "bench.csv", newline="") as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    assert float(table["E2E ddpm S=1000 reference"]["e2e_s"]) == pytest.approx(ddpm["e2e_s"], rel=1e-5)
    assert "E2E dpmpp_2m S=4 reference" in H.format_table(result)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="needs diffusers")
@pytest.mark.parametrize("sampler", MULTISTEP_SAMPLERS)
def test_ks_and_ksd_time_the_same_trajectory(sampler):
    """The fused loop of KS and diffusers' step loop of KSD, from the same x_T and model output, end at the same
    sample (deterministic solvers; the SDE variant draws different noise on each side: its mean path only)."""
    cfg = _cfg(solver_steps=4)
    with torch.inference_mode():
        ctx = H.CaseContext(TINY, cfg, torch.device("cpu"))
        outs = {}
        for kind, v in (("KS", REF), ("KSD", H.Variant())):
            prepared = H.PREPARERS[kind](ctx, H.Row(kind, v, sampler=sampler))
            prepared.run()
            outs[kind] = prepared.output().reshape(TINY.batch, -1).double()
    ks, ksd = outs["KS"], outs["KSD"]
    assert torch.isfinite(ks).all() and torch.isfinite(ksd).all()
    if sampler == "dpmpp_2m_sde":
        assert ks.std() > 0 and ksd.std() > 0  # noise differs by design (Philox vs the generator)
        return
    scale = ksd.abs().max()
    torch.testing.assert_close(ks, ksd, rtol=0, atol=1e-5 * float(scale))


def test_solver_rows_in_the_matrices_and_selectable():
    cpu = H.default_tasks("cpu")
    digits = H.Case("digits", 64)
    names = {t.row.name for t in cpu if t.case == digits and t.row.kind in H.SOLVER_ROWS}
    for s in MULTISTEP_SAMPLERS:
        assert {f"KS {s}", f"KSD {s}"} <= names
    assert {"FS dpmpp_2m", "BS dpmpp_2m", "FS unipc", "BS unipc", "E2E ddpm S=1000", "E2E dpmpp_2m S=10",
            "E2E dpmpp_2m S=20", "E2E unipc S=10"} <= names  # fmt: skip
    assert {t.priority for t in cpu if t.row.kind in H.SOLVER_ROWS} == {1, 2}
    gpu = H.default_tasks("cuda")
    big = {t.row.name for t in gpu if t.case == H.Case("step-only", 8192) and t.row.kind in ("KS", "KSD")}
    assert big == {f"{k} {s}" for s in MULTISTEP_SAMPLERS for k in ("KS", "KSD")}
    expanded = H.expand_kernel_rows(gpu, H.default_config("cuda"), torch.device("cuda"))
    assert {"KS unipc triton", "KS unipc cuda"} <= {t.row.name for t in expanded}
    kept = H.filter_tasks(cpu, ["KS", "KSD", "FS", "BS", "E2E"])
    assert {t.row.kind for t in kept} == {*H.SOLVER_ROWS, "COPY"}
    assert H.Row("KS").sampler == "dpmpp_2m"  # the headline solver by default
    with pytest.raises(ValueError, match="sampler"):
        H.Row("FS", sampler="euler")
    with pytest.raises(ValueError, match="ddpm"):
        H.Row("KS", sampler="ddpm")  # only E2E runs DDPM
    with pytest.raises(ValueError, match="solver rows|KS, KSD"):
        H.Row("F1", sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="solver_steps"):
        H.BenchConfig(solver_steps=0)


def test_cli_bench_quick_selects_solver_rows(tmp_path):
    out = tmp_path / "run"
    rc = cli_main(["bench", "--quick", "--device", "cpu", "--rows", "KS,KSD", "--kernel-backends", "reference",
                   "--out", str(out), "--quiet", "--no-plot"])  # fmt: skip
    assert rc == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {r["row"] for r in rows} == {"COPY", "KS", "KSD"}
    assert all(r["status"] == "ok" or (r["row"] == "KSD" and not HAS_DIFFUSERS) for r in rows)
