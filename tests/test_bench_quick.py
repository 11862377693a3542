"""The benchmark harness, ``fastddpm bench`` and the GPU check script, run quickly on CPU.

Every harness code path that can run without a GPU runs here on a tiny U-Net (batch 2, 2 steps):
the baselines (diffusers pipeline when installed, eager loop, torch.compile rows as one case with the
cheap ``eager`` compile backend), the fastddpm sampler rows, the kernel rows, the ratios and the
JSON/CSV/PNG outputs. Rows that need CUDA must be recorded as skipped with a reason. The CUDA-only
parts of ``benchmarks/gpu_check.py`` are checked for their bookkeeping (budgets, time-outs, output
files). There are no timing assertions: derived columns are checked against the measured ones.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import fastddpm
from fastddpm.cli import main as cli_main
from fastddpm.cli_bench import load_harness

REPO = Path(__file__).resolve().parents[1]
H = load_harness()  # the module `fastddpm bench` runs (benchmarks/harness.py)


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()

REF = H.Variant(backend="reference")  # the fused-step launcher in plain torch: no extension build in CI
TINY = H.Case("tiny", 2)


def _has_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def _quick_cfg(**kw) -> H.BenchConfig:
    return H.default_config("cpu", quick=True, kernel_backends=("reference",), **kw)


def _by_name(rows):
    return {r["name"]: r for r in rows}


def _count_flops(model, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    chw = H.sample_shape(model)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.randn(batch, *chw), torch.full((batch,), 3))
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------- harness
def test_quick_matrix_writes_consistent_outputs(tmp_path):
    rows = [
        H.Row("B0a"), H.Row("B0b"), H.Row("F1", REF), H.Row("F1", H.Variant(dtype="bf16", channels_last=True,
        backend="reference")), H.Row("F2", REF), H.Row("F3", REF, steps_per_graph=2), H.Row("K0"), H.Row("K1"),
        H.Row("K2", REF), H.Row("KD"),
    ]  # fmt: skip
    tasks = [H.Task(H.Case("step-only", 2), H.Row("COPY"), -1), H.Task(H.Case("step-only", 1), H.Row("MM"), -1)]
    tasks += [H.Task(TINY, r) for r in rows]
    result = H.run_benchmark(_quick_cfg(), tasks, tmp_path, log=None)

    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["schema"] == H.SCHEMA and data["columns"] == list(H.COLUMNS)
    assert data["meta"]["device"] == "cpu" and data["meta"]["torch"] == torch.__version__
    got = _by_name(data["rows"])
    expected_ok = {"B0b", "F1 reference", "F1 bf16 cl reference", "K0", "K1 reference", "K2 reference", "COPY", "MM"}
    if _has_diffusers():
        expected_ok |= {"B0a", "KD"}
    else:
        for name in ("B0a", "KD"):
            assert got[name]["status"] == "skipped" and "diffusers" in got[name]["reason"]
    assert {n for n, r in got.items() if r["status"] == "ok"} == expected_ok, {n: r["reason"] for n, r in got.items()}
    for name in ("F2 reference", "F3 k=2 reference"):
        assert got[name]["status"] == "skipped" and "CUDA" in got[name]["reason"]

    # Derived columns follow from the measured ones, within this run.
    base, copy_row = got["B0b"], got["COPY"]
    model = H.load_bench_model("tiny", torch.device("cpu"))[0]
    gflop = _count_flops(model, TINY.batch) / 1e9  # counted at the real batch: checks the per-image scaling
    for r in data["rows"]:
        if r["status"] != "ok":
            continue
        ms = r["ms_per_step_median"]
        assert r["ms_per_step_p20"] <= ms <= r["ms_per_step_p80"] and r["repeats"] >= 1
        if r["row"] in H.MODEL_ROWS:
            assert r["steps"] == 2 and r["output_finite"] is True
            assert r["speedup_vs_B0b"] == pytest.approx(base["ms_per_step_median"] / ms)
            assert r["proj_1000_steps_s"] == pytest.approx(ms)  # 1000 steps x ms/1000
            assert r["images_per_s"] == pytest.approx(TINY.batch / (ms / 1e3 * r["steps"]))
            assert r["proj_images_per_s_1000_steps"] == pytest.approx(TINY.batch / ms)
            assert r["gflop_per_step"] == pytest.approx(gflop, rel=1e-9)
            assert r["tflops"] == pytest.approx(gflop / ms)
        elif r["row"] == "MM":
            n_mm = _quick_cfg().matmul_n
            assert r["gbps"] is None and r["tflops"] == pytest.approx(2 * n_mm**3 / (ms / 1e3) / 1e12)
        else:
            assert r["gbps"] == pytest.approx(r["bytes_per_call"] / (ms / 1e3) / 1e9)
            assert r["frac_of_copy_bw"] == pytest.approx(r["gbps"] / copy_row["gbps"])
    for name in ("B0b", "F1 reference"):
        assert got[name]["frac_of_matmul"] == pytest.approx(got[name]["tflops"] / got["MM"]["tflops"])
    assert base["speedup_vs_B0b"] == 1.0
    if _has_diffusers():
        assert got["F1 reference"]["speedup_vs_B0a"] == pytest.approx(
            got["B0a"]["ms_per_step_median"] / got["F1 reference"]["ms_per_step_median"]
        )
    n = 2 * 1 * 8 * 8
    assert got["K1 reference"]["numel"] == n and got["K1 reference"]["bytes_per_call"] == 12 * n
    assert got["K0"]["bytes_per_call"] == 16 * n and copy_row["bytes_per_call"] == 8 * _quick_cfg().copy_numel
    assert got["K2 reference"]["speedup_vs_K0"] == pytest.approx(
        got["K0"]["ms_per_step_median"] / got["K2 reference"]["ms_per_step_median"]
    )
    if _has_diffusers():
        assert got["KD"]["bytes_per_call"] == 16 * n and got["KD"]["backend"] == "diffusers DDPMScheduler"
        assert got["K2 reference"]["speedup_vs_KD"] == pytest.approx(
            got["KD"]["ms_per_step_median"] / got["K2 reference"]["ms_per_step_median"]
        )
    # The tiny model is not the target model: every target is reported, none is claimed.
    assert [t["status"] for t in data["targets"]] == ["unmeasured"] * 7

    with open(tmp_path / "bench.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == [*H.COLUMNS, *H.META_COLUMNS]
    assert [t["name"] for t in table] == [r["name"] for r in data["rows"]] == [r["name"] for r in result.rows]
    for t, r in zip(table, data["rows"]):
        assert t["status"] == r["status"] and t["device_name"] == data["meta"]["device_name"]
        if r["status"] == "ok":
            assert float(t["ms_per_step_median"]) == pytest.approx(r["ms_per_step_median"], rel=1e-5)

    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "B0b" in H.format_table(result)


def test_compile_rows(tmp_path):
    """B1 and B2 (torch.compile of the U-Net, of the whole step) as one case, with the cheap backend."""
    tasks = [H.Task(TINY, H.Row("B0b")), H.Task(TINY, H.Row("B1")), H.Task(TINY, H.Row("B2"))]
    result = H.run_benchmark(_quick_cfg(compile_backend="eager"), tasks, None, log=None)
    got = _by_name(result.rows)
    for name in ("B1", "B2"):
        r = got[name]
        assert r["status"] == "ok", r["reason"]
        assert r["compile_unet"] is True and r["compile_s"] is not None and r["compile_s"] >= 0
        assert r["output_finite"] is True
        assert r["speedup_vs_B0b"] == pytest.approx(got["B0b"]["ms_per_step_median"] / r["ms_per_step_median"])


def test_cli_bench_quick(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["bench", "--quick", "--device", "cpu", "--rows", "K0,K2", "--out", str(out), "--quiet"])
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    assert {r["row"] for r in data["rows"]} == {"COPY", "K0", "K2"}  # COPY is always kept
    assert all(r["status"] == "ok" for r in data["rows"]), [r["reason"] for r in data["rows"]]
    assert (out / "bench.csv").is_file() and (out / "bench.png").is_file()
    printed = capsys.readouterr().out
    assert "K0" in printed and "bench.json" in printed


def test_cli_bench_rejects_bad_arguments(tmp_path, capsys):
    assert cli_main(["bench", "--quick", "--device", "cpu", "--rows", "B9", "--out", str(tmp_path)]) == 2
    assert "B9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--steps", "0"])
    with pytest.raises(ValueError, match="MODEL:B"):
        H.parse_cases(["digits"])
    assert H.parse_cases(["ddpm-cifar10:1,8", "digits:64"]) == [
        H.Case("ddpm-cifar10", 1), H.Case("ddpm-cifar10", 8), H.Case("digits", 64)
    ]  # fmt: skip


def test_time_budget_and_failures_are_recorded_not_raised(tmp_path):
    tasks = [H.Task(H.Case("no-such-model", 1), H.Row("B0b")), H.Task(H.Case("step-only", 2), H.Row("COPY"))]
    result = H.run_benchmark(_quick_cfg(), tasks, tmp_path, log=None)
    got = _by_name(result.rows)
    assert got["B0b"]["status"] == "error" and "no-such-model" in got["B0b"]["reason"]
    assert got["COPY"]["status"] == "ok"

    result = H.run_benchmark(_quick_cfg(time_budget_s=0.0), tasks, tmp_path, log=None)
    assert all(r["status"] == "skipped" and "budget" in r["reason"] for r in result.rows)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["status"] == "skipped"


def test_default_matrix():
    gpu = H.default_tasks("cuda")
    cases = H.default_cases("cuda")
    assert {c.batch for c in cases} == {1, 16, 256} and {c.model for c in cases} == {"ddpm-cifar10", "digits"}
    assert gpu[0].row.kind == "COPY"
    assert [t.priority for t in gpu] == sorted(t.priority for t in gpu)
    for c in cases:
        first = {t.row.name for t in gpu if t.case == c and t.priority == 0}
        assert {"B0a", "B0b", "F1", "F2", "F3 k=10", "F2 bf16 cl", "K0", "K1", "K2"} <= first
        assert {t.row.kind for t in gpu if t.case == c and t.row.compiles} == {"B1", "B2", "F2"}
    assert all(t.priority >= 1 for t in gpu if t.row.compiles)
    assert any(not t.row.variant.fused_norm for t in gpu) and any(t.row.variant.sdpa == "math" for t in gpu)

    cpu = H.default_tasks("cpu")
    assert {(t.case.model, t.case.batch) for t in cpu if t.row.kind == "B0b"} == {
        ("ddpm-cifar10", 1), ("ddpm-cifar10", 8), ("digits", 64)
    }  # fmt: skip
    assert not any(t.row.variant.compile_unet for t in cpu)
    bf16 = {(t.case.model, t.case.batch) for t in cpu if t.row.variant.dtype == "bf16"}
    assert bf16 == {("ddpm-cifar10", 1), ("digits", 64)}  # one batch per model: bf16 is slow on most CPUs
    kept = H.filter_tasks(gpu, ["F2"], no_compile=True)
    assert {t.row.kind for t in kept} == {"F2", "COPY"} and not any(t.row.compiles for t in kept)
    with pytest.raises(ValueError, match="unknown row"):
        H.filter_tasks(gpu, ["F9"])
    expanded = H.expand_kernel_rows(gpu, H.default_config("cpu"), torch.device("cuda"))
    assert {t.row.name for t in expanded if t.row.kind == "K1"} == {"K1 triton", "K1 cuda"}
    with pytest.raises(ValueError, match="dtype"):
        H.Variant(dtype="fp8")


def test_repeat_count_respects_target_bounds_and_caps():
    cfg = H.default_config("cpu", target_s=1.0, min_repeats=3, max_repeats=10, max_row_s=60.0)
    assert H.repeat_count(0.01, cfg) == 10  # target wants 100: capped by max_repeats
    assert H.repeat_count(0.5, cfg) == 3  # target wants 2: raised to min_repeats
    assert H.repeat_count(25.0, cfg) == 2  # max_row_s allows two
    assert H.repeat_count(100.0, cfg) == 1  # always at least one
    assert H.repeat_count(0.5, cfg, left_s=1.2) == 2  # the run's remaining budget caps it too


def test_percentiles_match_numpy():
    import numpy as np

    values = torch.rand(17).tolist()
    med, p20, p80 = H.percentiles(values)
    assert (med, p20, p80) == pytest.approx(tuple(np.percentile(values, [50, 20, 80])))
    assert H.percentiles([2.5]) == (2.5, 2.5, 2.5)


# ------------------------------------------------------------------------------------------- gpu_check
def test_gpu_check_section_budgets():
    budget = gpu_check.section_budget
    assert budget(150.0, now=0.0, deadline=480.0, reserve_after=120.0) == 150.0
    assert budget(150.0, now=300.0, deadline=480.0, reserve_after=120.0) == 60.0
    assert budget(150.0, now=400.0, deadline=480.0, reserve_after=120.0) == 0.0
    assert budget(0.0, now=100.0, deadline=480.0, reserve_after=0.0) == 380.0  # the bench: what is left


def test_gpu_check_kills_a_section_over_budget():
    code = "import time; print('started', flush=True); time.sleep(60)"
    status, _, output, secs = gpu_check.run_process([sys.executable, "-c", code], 1.5)
    assert status == "timeout" and "started" in output and secs < 30
    status, rc, output, _ = gpu_check.run_process([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], 30)
    assert (status, rc, output.strip()) == ("failed", 3, "x")


def test_gpu_check_output_bookkeeping(tmp_path):
    assert gpu_check.parse_pytest_summary("...\n3 failed, 40 passed, 2 skipped, 100 deselected in 9.1s\n") == {
        "failed": 3, "passed": 40, "skipped": 2, "deselected": 100
    }  # fmt: skip
    assert gpu_check.parse_pytest_summary("no summary") == {}
    names = [f"f{i}.txt" for i in range(10)]
    for name in names:
        (tmp_path / name).write_text(name)
    (tmp_path / "bench.json.tmp").write_text("half-written")
    removed = gpu_check.limit_files(tmp_path, ["f9.txt", "f8.txt"], protect=frozenset({"f0.txt"}))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == gpu_check.MAX_FILES and {"f9.txt", "f8.txt", "f0.txt"} <= set(left)
    assert sorted(removed) == ["bench.json.tmp", "f6.txt", "f7.txt"]
    env = gpu_check.child_env({"TRITON_INTERPRET": "1", "PYTHONPATH": "/x"})
    assert "TRITON_INTERPRET" not in env and env["PYTHONPATH"].split(":")[:1] == [str(REPO)]
    assert gpu_check.child_env({"TRITON_INTERPRET": "1"}, interpret=None)["TRITON_INTERPRET"] == "1"
    assert gpu_check.ensure_package_aliases() in ("installed", "aliased")
    import fastddpm.kernels  # noqa: F401  (importable either way)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_without_gpu_skips_cuda_sections(tmp_path):
    rc = gpu_check.main([str(tmp_path), "--sections", "env,build,checks,bench", "--budget", "300"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["name"]: s for s in summary["sections"]}
    assert status["env"]["status"] == "ok", status["env"]
    assert status["env"]["details"]["cuda_available"] is False
    assert status["env"]["details"]["torch"] == torch.__version__
    for name in ("build", "checks", "bench"):
        assert status[name]["status"] == "skipped" and "CUDA" in status[name]["note"]
    assert rc == 0 and summary["ok"] is True
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu_check.log", "summary.json"] and len(files) <= gpu_check.MAX_FILES
    assert not math.isnan(summary["elapsed_s"]) and fastddpm.__version__


def _tiny_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (module ``fddpm_probe``), built by hand: no build backend needed."""
    import base64
    import hashlib
    import zipfile

    files = {
        "fddpm_probe.py": "VALUE = 42\n",
        "fddpm_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: fddpm-probe\nVersion: 1.0\n",
        "fddpm_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append("fddpm_probe-1.0.dist-info/RECORD,,")
    files["fddpm_probe-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = folder / "fddpm_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_gpu_check_installs_carried_wheels_for_every_section(tmp_path):
    import subprocess

    wheels = tmp_path / "whl"
    wheels.mkdir()
    _tiny_wheel(wheels)
    args = gpu_check.parse_args([str(tmp_path / "out"), "--wheels", str(wheels)])
    orch = gpu_check.Orchestrator(Path(args.out), 60.0, args)
    orch.extra_path = orch.install_wheels()
    assert orch.extra_path is not None and (Path(orch.extra_path) / "fddpm_probe.py").is_file()
    env = orch.child_environment()
    assert env["PYTHONPATH"].split(":")[0] == str(REPO)  # the checkout stays first
    out = subprocess.run([sys.executable, "-c", "import fddpm_probe; print(fddpm_probe.VALUE)"], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "42"
    assert "wheels: ok" in (Path(args.out) / gpu_check.LOG_NAME).read_text()
    # No folder (the default .whl absent on a fresh clone): nothing installed, nothing logged as an error.
    args2 = gpu_check.parse_args([str(tmp_path / "out2"), "--wheels", str(tmp_path / "missing")])
    assert gpu_check.Orchestrator(Path(args2.out), 60.0, args2).install_wheels() is None


def test_targets_are_computed_from_the_rows_of_one_run():
    def row(kind, model, batch, ms, name=None, **kw):
        r = dict.fromkeys(H.COLUMNS)
        r.update(row=kind, name=name or kind, model=model, batch=batch, status="ok", ms_per_step_median=ms, **kw)
        return r

    big = 8192 * 3 * 32 * 32  # 96 MiB of fp32 per tensor
    rows = [
        row("COPY", "step-only", 8192, 1.0, gbps=4000.0),
        row("MM", "step-only", 1, 1.0, tflops=700.0),
        row("K1", "step-only", 8192, 0.30, name="K1 triton", numel=big, frac_of_copy_bw=0.85),
        row("K1", "step-only", 8192, 0.32, name="K1 cuda", numel=big, frac_of_copy_bw=0.80),
        row("KD", "step-only", 8192, 3.0),
        row("B0a", "ddpm-cifar10", 1, 5.0),
        row("B2", "ddpm-cifar10", 1, 0.9),
        row("F2", "ddpm-cifar10", 1, 0.5),
        row("F3", "ddpm-cifar10", 1, 0.4, name="F3 k=10"),
        row("B2", "ddpm-cifar10", 256, 30.0),
        row("F2", "ddpm-cifar10", 256, 33.0, frac_of_matmul=0.3),
        row("F2", "ddpm-cifar10", 256, 45.0, name="F2 bf16", frac_of_matmul=0.25),
    ]
    t = H.evaluate_targets(rows)
    assert [x["status"] for x in t] == ["met", "met", "met", "met", "missed", "missed", "missed"]
    assert t[0]["value"] == 0.85  # the best K1 row at >= 64 MB
    assert t[1]["value"] == pytest.approx(3.0 / 0.30)  # KD over the fastest K1
    assert t[2]["value"] == pytest.approx(5.0 / 0.4) and t[3]["value"] == pytest.approx(0.9 / 0.4)
    assert t[4]["value"] == pytest.approx(30.0 / 33.0) and t[5]["value"] == 0.3  # the fastest F row's fraction
    assert t[6]["value"] == pytest.approx(196 * 1000 * 33.0 / 6e4)  # ceil(50000 / 256) batches of 1000 steps
    assert "F3 k=10" in " ".join(t[2]["evidence"]) and "B0a" in " ".join(t[2]["evidence"])
    # A row that did not run leaves its target unmeasured, never met.
    rows[4]["status"] = "skipped"
    assert H.evaluate_targets(rows)[1]["status"] == "unmeasured"
    assert "[unmeasured]" in H.format_targets(H.evaluate_targets(rows), "NVIDIA H200")


def test_gpu_check_clears_only_fastddpm_build_locks(tmp_path):
    (tmp_path / "py312_cu130" / "fastddpm_cuda_abc").mkdir(parents=True)
    (tmp_path / "py312_cu130" / "other_ext").mkdir(parents=True)
    ours = tmp_path / "py312_cu130" / "fastddpm_cuda_abc" / "lock"
    theirs = tmp_path / "py312_cu130" / "other_ext" / "lock"
    ours.write_text("")
    theirs.write_text("")
    assert gpu_check.clear_stale_build_locks(tmp_path) == [str(ours)]
    assert not ours.exists() and theirs.exists()
    assert gpu_check.clear_stale_build_locks(tmp_path / "missing") == []


def test_gpu_check_pytest_selection_skips_compile_only_tests():
    k = gpu_check.PYTEST_K
    assert "not aot" in k and "not test_cuda_compile" in k and "not fullgraph" in k


def test_rows_start_only_when_their_expected_setup_fits(tmp_path):
    """A compiling row with less budget left than its expected compile time is not started (it would
    outlive the budget and be killed); a cheap row after it still runs."""
    cfg = _quick_cfg(compile_backend="eager", compile_reserve_s=1000.0, time_budget_s=120.0)
    tasks = [H.Task(TINY, H.Row("B2")), H.Task(H.Case("step-only", 2), H.Row("K0"))]
    got = _by_name(H.run_benchmark(cfg, tasks, None, log=None).rows)
    need = H.expected_setup_s(H.Row("B2"), cfg)
    assert need == 1000.0 * H.run.COMPILE_FACTOR["B2"] > 120.0
    assert got["B2"]["status"] == "skipped" and f"~{need:.0f} s" in got["B2"]["reason"]
    assert got["K0"]["status"] == "ok"
    for kind in H.ROW_KINDS:  # every row kind has an estimate, larger on CPU than on CUDA
        row = H.Row(kind)
        gpu, cpu = H.default_config("cuda"), H.default_config("cpu")
        assert 0 < H.expected_setup_s(row, gpu) <= H.expected_setup_s(row, cpu)
