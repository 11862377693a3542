"""``benchmarks/gpu_check.py --dry-run`` on CPU: every section runs, GPU-only steps are skipped with
their budgets printed, so the script cannot break unnoticed before the first GPU run.

The dry run leaves out, besides the GPU-only steps, the heavy CPU parts: the CPU extension build (the
build section only checks its entry points), the tests themselves (pytest only collects the GPU
selection, which still imports every test module) and the bench matrix (one quick kernel row runs).
It takes about 25 s of CPU time (about 100 s of wall time on the 2-core CI machine under load).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_dry_run", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    env = dict(os.environ, TRITON_INTERPRET="1")  # as a developer's shell may have it: the script must clear it
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    summary = json.loads((out / gpu_check.SUMMARY_NAME).read_text())
    return proc, summary, out


def test_dry_run_runs_every_section(dry_run):
    proc, summary, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = {s["name"]: s for s in summary["sections"]}
    assert list(sections) == list(gpu_check.SECTIONS)
    assert all(s["status"] == "ok" for s in sections.values()), {
        n: (s["status"], s["note"]) for n, s in sections.items()
    }
    assert summary["ok"] is True and summary["elapsed_s"] < summary["total_budget_s"]
    files = {p.name for p in out.iterdir()}
    assert {"summary.json", "gpu_check.log", "pytest.txt", "bench.json", "bench.csv"} <= files
    assert len(files) <= gpu_check.MAX_FILES


def test_dry_run_skips_gpu_steps_and_prints_their_budgets(dry_run):
    proc, summary, out = dry_run
    log = (out / gpu_check.LOG_NAME).read_text()
    sections = {s["name"]: s for s in summary["sections"]}
    build = sections["build"]["details"]
    assert build["dry_run"] and "GPU-only" in build["steps"]["cuda_extension"]
    assert "dry run: build cuda_extension: skipped (GPU-only); section budget" in log

    pytest_section = sections["pytest"]
    assert "collected only" in pytest_section["note"] and pytest_section["details"]["counts"]["collected"] > 0

    checks = sections["checks"]["details"]
    assert set(checks) == set(gpu_check.CHECKS)
    for name, check in gpu_check.CHECKS.items():
        if check.gpu_only:
            assert checks[name]["status"] == "skipped" and f"~{check.expected_s:.0f} s" in checks[name]["reason"]
    bitwise = checks["bitwise_identity"]
    assert bitwise["status"] == "ok"
    cases = {k: v for k, v in bitwise.items() if "/" in k}
    assert {k.split("/")[0] for k in cases} == {"randn", "q_sample", "ddpm_step", "ddim_step"}
    for pairs in cases.values():
        assert pairs and all(p["equal"] and p["mismatches"] == 0 and p["max_abs"] == 0.0 for p in pairs.values())

    launchers = checks["multistep_launchers"]  # the multistep solvers' fused step, bitwise across two runs
    assert launchers["status"] == "ok" and {"dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"} <= set(launchers)
    assert all(launchers[s]["x_equal"] and launchers[s]["hist_equal"] for s in ("dpmpp_2m_sde", "unipc"))

    bench = sections["bench"]["details"]
    assert bench["dry_run"] and bench["rows"]["K0"] == "ok" and bench["gpu_rows"] > 0
    assert bench["rows"]["KS dpmpp_2m reference"] == "ok" and bench["rows"]["KS unipc reference"] == "ok"
    assert "dry run: bench step-only:8192 KS dpmpp_3m" in log  # the GPU matrix has the solver rows
    assert "before timing" in log and "bench budget" in log


def test_pytest_section_clears_triton_interpret(tmp_path, monkeypatch):
    """A parent with TRITON_INTERPRET=1 must not make the GPU tests run interpreted."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = gpu_check.parse_args([str(tmp_path), "--wheels", str(tmp_path / "none")])
    orch = gpu_check.Orchestrator(tmp_path, 60.0, args)
    seen = {}

    def fake_run(cmd, budget, env=None, cwd=None):
        seen.update(cmd=cmd, env=env)
        return "ok", 0, "3 passed, 1 deselected in 0.1s\n", 0.1

    monkeypatch.setattr(gpu_check, "run_process", fake_run)
    res = orch.section_pytest(30.0)
    assert res.status == "ok" and res.details["counts"] == {"passed": 3, "deselected": 1}
    assert "TRITON_INTERPRET" not in seen["env"] and seen["env"]["FASTDDPM_TEST_DEVICE"] == "cuda"
    assert "groupnorm" in seen["cmd"][seen["cmd"].index("-k") + 1]


def test_interpreted_triton_reports_cuda_unavailable():
    from fastddpm.backends import triton as tb

    if not tb._interpreted(tb._kernels().step):
        assert tb.triton_compiles_for_cuda()
        pytest.skip("Triton compiles for the GPU in this process (FASTDDPM_TEST_DEVICE=cuda)")
    ok, why = tb.available("cuda")
    assert not ok and "TRITON_INTERPRET" in why
    assert tb.available("cpu")[0] and tb.available(None)[0]
    assert not tb.triton_compiles_for_cuda()
