"""One-shot GPU check of fastddpm: build, tests, identity checks, then the benchmark matrix.

Usage, from the repository root of a checkout on a CUDA machine (torch + triton preinstalled; the
repo need not be pip-installed, diffusers may be absent)::

    python benchmarks/gpu_check.py [OUT_DIR] [--budget 480]
    python benchmarks/gpu_check.py --dry-run OUT_DIR    # rehearsal on CPU (what CI runs)

Sections, in order, each in its own process with a hard time limit (a section over its limit is
killed and recorded as ``timeout``; a section that no longer fits the total budget is ``skipped``)::

    env      versions, GPU name, whether CUDA works
    build    the CUDA extension (fastddpm._build.load_cuda_extension), for the present GPU only, and
             the CPU extension next to it, so no test module or later section compiles
    pytest   pytest tests -k PYTEST_K with FASTDDPM_TEST_DEVICE=cuda and TRITON_INTERPRET removed: the
             device-aware tests run the cuda and triton (compiled) backends and the fused GroupNorm on
             CUDA tensors against the float64 reference
    checks   (gpu_checks.py) bitwise identity of randn/q_sample/ddpm_step/ddim_step across triton,
             cuda and cpu (on a CPU copy), triton vs cuda noise vs the plain-torch Philox spec, fused
             step vs the reference, CUDA-graph vs eager image equality (also on cuda:1 while cuda:0 is
             current, with two GPUs), torch.library.opcheck of the custom ops on CUDA
    bench    the benchmark matrix of benchmarks/harness.py (it stops starting rows at its budget)

Everything lands in OUT_DIR (default ``$OUT``, else ``gpu_results/``), at most 8 files::

    summary.json   every section: status, seconds, budget, details (check results, test counts)
    gpu_check.log  the output of every section
    pytest.txt     the pytest output
    bench.json, bench.csv, bench.png   the benchmark (formats in benchmarks/README.md)

The exit status is 0 when no section failed (skipped sections do not count as failures).

``--dry-run``: every section runs on CPU with the GPU-only steps skipped and their budgets printed,
and the heavy CPU parts left out too (no extension build, pytest ``--collect-only``, one quick bench
row), so the script's plumbing is exercised in CI (tests/test_gpu_check_dry_run.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # the check functions live next to this script
    sys.path.append(str(BENCH_DIR))
from gpu_checks import CHECKS, Skip  # noqa: E402

MAX_FILES = 8  # the device tool brings back at most 8 files
LOG_NAME, SUMMARY_NAME, PYTEST_NAME = "gpu_check.log", "summary.json", "pytest.txt"
SECTIONS = ("env", "build", "pytest", "checks", "bench")
#: Nominal seconds per section; the bench gets what is left of the total budget.
BUDGETS = {"env": 60.0, "build": 150.0, "pytest": 150.0, "checks": 150.0, "bench": 0.0}
BENCH_MIN_S = 120.0  # time kept for the bench while earlier sections run
#: The GPU-relevant tests; the compile-only checks (nvcc -c, the sm_90 Triton compile) already ran on CPU.
#: (``fullgraph``: a torch.compile test that builds the CPU extension, which the GPU run does not need.)
#: ``groupnorm``: the fused GroupNorm against PyTorch on CUDA tensors (tests/test_groupnorm_kernel.py with
#: FASTDDPM_TEST_DEVICE=cuda); the C++ CPU GroupNorm (test_cpu_groupnorm) already ran on CPU.
PYTEST_K = (
    "(cuda or triton or graph or opcheck or groupnorm) and not aot and not test_cuda_compile and not fullgraph"
    " and not test_cpu_groupnorm"
)
DEFAULT_WHEELS = str(REPO / ".whl")


# ----------------------------------------------------------------------------------------------------
# Bookkeeping (pure Python, unit-tested on CPU)
# ----------------------------------------------------------------------------------------------------


@dataclass
class SectionResult:
    """Outcome of one section. ``status``: ok, failed, timeout, skipped or error."""

    name: str
    status: str
    seconds: float = 0.0
    budget_s: float = 0.0
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def section_budget(nominal: float, now: float, deadline: float, reserve_after: float) -> float:
    """Seconds a section may take: its nominal budget, cut so that ``reserve_after`` seconds stay for
    the sections after it before ``deadline``. ``nominal <= 0`` means "everything that is left"."""
    left = deadline - now - reserve_after
    return max(0.0, left if nominal <= 0 else min(nominal, left))


def run_process(
    cmd: Sequence[str], budget_s: float, env: dict[str, str] | None = None, cwd: Path = REPO
) -> tuple[str, int | None, str, float]:
    """Run ``cmd`` in its own process group, killed (the whole group) after ``budget_s`` seconds.

    Returns ``(status, returncode, output, seconds)`` with status ``ok``, ``failed`` (non-zero exit) or
    ``timeout``; output is stdout and stderr interleaved.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=max(budget_s, 0.1))
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call created, nothing else
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        status = "timeout"
    return status, proc.returncode, out.decode("utf-8", "replace"), time.perf_counter() - t0


def parse_pytest_summary(output: str) -> dict[str, int]:
    """``{"passed": 12, "failed": 1, "skipped": 3, ...}`` from pytest's final summary line.

    (Not named ``pytest_*``: this module is also loaded as a pytest plugin, where that prefix means a hook.)
    """
    import re

    lines = [ln for ln in output.strip().splitlines()
             if re.search(r"\d+ (passed|failed|error|skipped|deselected)|\d+ tests? collected", ln)]  # fmt: skip
    if not lines:
        return {}
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", lines[-1])
    }
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", lines[-1])  # --collect-only: "3/40 tests collected"
    if collected:
        counts["collected"] = int(collected.group(1))
    return counts


def child_env(base: dict[str, str] | None = None, *, interpret: bool | None = False) -> dict[str, str]:
    """Environment of a section: the repo on PYTHONPATH (importable without pip install), unbuffered
    output, and TRITON_INTERPRET removed (``interpret=False``) so Triton compiles for the GPU."""
    env = dict(os.environ if base is None else base)
    paths = [str(REPO), str(BENCH_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    if interpret is False:
        env.pop("TRITON_INTERPRET", None)
    return env


def ensure_package_aliases() -> str:
    """Make ``fastddpm.kernels`` and ``fastddpm.csrc`` importable from a plain checkout.

    An install maps ``kernels/`` and ``csrc/`` into the package (setup.py ``package_dir``); a checkout
    on PYTHONPATH does not, so the two subpackages are registered from their folders here. Returns
    ``"installed"`` when nothing was needed, else ``"aliased"``.
    """
    import importlib
    import importlib.util

    try:
        importlib.import_module("fastddpm.kernels")
        importlib.import_module("fastddpm.csrc")
        return "installed"
    except ImportError:
        pass
    import fastddpm

    for sub in ("kernels", "csrc"):
        name = f"fastddpm.{sub}"
        if name in sys.modules:
            continue
        folder = REPO / sub
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot alias {name} to {folder}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(fastddpm, sub, module)
    return "aliased"


def pytest_configure(config: Any) -> None:
    """pytest plugin hook (``-p gpu_check``): alias the subpackages before tests are collected."""
    ensure_package_aliases()


def limit_files(out_dir: Path, keep_first: Sequence[str], protect: frozenset[str] = frozenset()) -> list[str]:
    """Delete leftovers (``*.tmp`` of an interrupted write) and files beyond :data:`MAX_FILES` in
    ``out_dir``; names in ``keep_first`` win, names in ``protect`` (files that were there before the
    run) are never deleted. Returns the removed names."""
    removed = []
    for p in out_dir.glob("*.tmp"):
        if p.is_file() and p.name not in protect:
            p.unlink()
            removed.append(p.name)
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    if len(files) > MAX_FILES:
        ranked = [f for f in keep_first if f in files] + [f for f in files if f not in keep_first]
        for name in ranked[MAX_FILES:]:
            if name not in protect:
                (out_dir / name).unlink()
                removed.append(name)
    return removed


# ----------------------------------------------------------------------------------------------------
# Sections that run in a child process (python benchmarks/gpu_check.py --child NAME)
# ----------------------------------------------------------------------------------------------------


def clear_stale_build_locks(root: Path | None = None) -> list[str]:
    """Delete ``lock`` files of fastddpm extension builds under torch's extension folder
    (``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``). Only call it when no build runs."""
    if root is None:
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    removed = []
    for lock in sorted(root.glob("**/fastddpm*/lock")) if root.is_dir() else []:
        try:
            lock.unlink()
            removed.append(str(lock))
        except OSError:
            pass
    return removed


def _device(allow_cpu: bool) -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if allow_cpu:
        return torch.device("cpu")
    raise Skip("no CUDA device is visible")


def child_env_info(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata
    import platform

    import torch

    info: dict[str, Any] = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                                cuda_available=torch.cuda.is_available(), aliases=ensure_package_aliases())  # fmt: skip
    for dist in ("triton", "diffusers", "matplotlib", "pytest", "pytest-benchmark", "numpy", "ninja"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        x = torch.randn(1 << 20, device="cuda")
        info["cuda_smoke"] = bool(torch.isfinite((x * 2).sum()).item())
    from fastddpm.dispatch import availability

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # Only triton here: asking for the cpu or cuda backend would compile its extension (the build section's job).
    info["triton_backend"] = list(availability("triton", dev))
    return info


#: The CPU extension build, run in its own process next to the CUDA build (they share no files).
_CPU_BUILD = (
    "import gpu_check; gpu_check.ensure_package_aliases(); from fastddpm import _build; _build.load_cpu_extension()"
)


def child_build(args: argparse.Namespace) -> dict[str, Any]:
    """Build the CUDA extension (present GPU only) and, in parallel in a second process, the CPU
    extension, so that no test module and no later section compiles anything. Dry run: checks the
    build entry points exist and skips both builds (the CUDA one is GPU-only; the CPU one is the heavy
    CPU part a dry run leaves out), printing the section's budget."""
    import torch

    ensure_package_aliases()
    from fastddpm import _build

    missing = [f for f in ("load_cuda_extension", "load_cpu_extension") if not callable(getattr(_build, f, None))]
    if missing:
        return dict(ok=False, error=f"fastddpm._build has no {missing}")
    if args.dry_run:
        steps = {"cuda_extension": "skipped (GPU-only)", "cpu_extension": "skipped (heavy CPU part, dry run)"}
        for name, what in steps.items():
            print(f"dry run: build {name}: {what}; section budget {BUDGETS['build']:.0f} s")
        return dict(ok=True, dry_run=True, steps=steps)
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise Skip("no CUDA device is visible")
    t0 = time.perf_counter()
    cpu_proc = subprocess.Popen([sys.executable, "-c", _CPU_BUILD], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out: dict[str, Any] = dict(compiler=_build.compiler_info() if hasattr(_build, "compiler_info") else None)
    from fastddpm.dispatch import availability

    if torch.cuda.is_available():
        try:
            ext = _build.load_cuda_extension()
            ok, why = availability("cuda", "cuda")
            out["cuda"] = dict(ok=bool(ok), availability=why, extension=repr(ext)[:200])
        except Exception as e:
            out["cuda"] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        out["cuda"]["seconds"] = round(time.perf_counter() - t0, 1)
    cpu_log = cpu_proc.communicate()[0].decode("utf-8", "replace")
    ok, why = availability("cpu", "cpu") if cpu_proc.returncode == 0 else (False, cpu_log.strip()[-2000:])
    out["cpu"] = dict(ok=bool(ok), availability=why, seconds=round(time.perf_counter() - t0, 1))
    out["ok"] = out["cpu"]["ok"] and out.get("cuda", {"ok": True})["ok"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def child_checks(args: argparse.Namespace) -> dict[str, Any]:
    """Every check of :data:`gpu_checks.CHECKS` on the GPU; dry run: on CPU, GPU-only checks skipped
    with their expected seconds printed, the others run on CPU."""
    import traceback

    import torch

    ensure_package_aliases()
    device = torch.device("cpu") if args.dry_run else _device(args.allow_cpu)
    results: dict[str, Any] = {}
    for name, check in CHECKS.items():
        t0 = time.perf_counter()
        try:
            if args.dry_run and check.gpu_only:
                raise Skip(f"dry run: GPU-only check, expected ~{check.expected_s:.0f} s on a GPU")
            res = check.fn(device)
            status = "ok" if res.get("ok") else "failed"
        except Skip as e:
            res, status = {"reason": str(e)}, "skipped"
        except Exception as e:
            res, status = (
                {"error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc(limit=6)},
                "error",
            )
        res.update(status=status, seconds=round(time.perf_counter() - t0, 2))
        results[name] = res
        print(f"check {name}: {status} {json.dumps({k: v for k, v in res.items() if k != 'traceback'}, default=str)}")
        if args.result:  # what is done so far survives a timeout of the section
            Path(args.result).write_text(json.dumps(dict(status="partial", details=results), default=str), "utf-8")
    return results


def child_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark matrix inside ``--bench-budget`` seconds. Dry run: prints the GPU matrix with each
    row's expected untimed seconds (the rule that decides whether a row starts) against the budget,
    then runs the COPY, K0 and KS (multistep solver step) rows of the quick matrix on CPU to exercise the
    harness and its files."""
    ensure_package_aliases()
    import harness

    budget = max(10.0, float(args.bench_budget))
    if args.dry_run:
        gpu_cfg = harness.default_config("cuda", time_budget_s=budget)
        plan = harness.default_tasks("cuda")
        setup = [harness.expected_setup_s(t.row, gpu_cfg) for t in plan]
        for t, s in zip(plan, setup):
            print(f"dry run: bench {t.case.model}:{t.case.batch} {t.row.name} (priority {t.priority}): GPU-only, "
                  f"~{s:.0f} s before timing")  # fmt: skip
        print(f"dry run: {len(plan)} GPU rows, {sum(setup):.0f} s of expected setup, bench budget {budget:.0f} s")
        cfg = harness.default_config("cpu", quick=True, kernel_backends=("reference",), time_budget_s=budget)
        tasks = harness.filter_tasks(harness.default_tasks("cpu", quick=True), ["K0", "KS"])
        result = harness.run_benchmark(cfg, tasks, args.out, log=print)
        return dict(dry_run=True, gpu_rows=len(plan), gpu_setup_s=round(sum(setup)),
                    rows={r["name"]: r["status"] for r in result.rows})  # fmt: skip
    device = _device(args.allow_cpu)
    cfg = harness.default_config(str(device), quick=args.bench_quick, time_budget_s=budget)
    tasks = harness.default_tasks(device.type, quick=args.bench_quick)
    if args.bench_rows:
        tasks = harness.filter_tasks(tasks, [r.strip() for r in args.bench_rows.split(",") if r.strip()])
    result = harness.run_benchmark(cfg, tasks, args.out, log=print)
    print(harness.format_table(result))
    counts: dict[str, int] = {}
    for r in result.rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    targets = [
        dict(target=t["target"], status=t["status"], value=t["value"]) for t in harness.evaluate_targets(result.rows)
    ]
    return dict(rows=counts, total_s=result.meta.get("total_s"), device=result.meta.get("device_name"), targets=targets)


CHILDREN: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "env": child_env_info,
    "build": child_build,
    "checks": child_checks,
    "bench": child_bench,
}


def run_child(args: argparse.Namespace) -> int:
    """Entry of a child process: run one section, write its JSON result to ``args.result``."""
    sys.path[:0] = [p for p in (str(REPO), str(BENCH_DIR)) if p not in sys.path]
    try:
        payload = dict(status="ok", details=CHILDREN[args.child](args))
        if args.child == "build" and not payload["details"].get("ok"):
            payload["status"] = "failed"
        if args.child == "checks" and any(v.get("status") in ("failed", "error") for v in payload["details"].values()):
            payload["status"] = "failed"
    except Skip as e:
        payload = dict(status="skipped", note=str(e), details={})
    Path(args.result).write_text(json.dumps(payload, default=str), encoding="utf-8")
    return 0


# ----------------------------------------------------------------------------------------------------
# The orchestrator
# ----------------------------------------------------------------------------------------------------


class Orchestrator:
    """Runs the sections in order inside one total budget and writes the output folder."""

    def __init__(self, out_dir: Path, budget_s: float, args: argparse.Namespace):
        self.out, self.budget_s, self.args = out_dir, budget_s, args
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        self.results: list[SectionResult] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="fastddpm-gpu-check-"))
        self.out.mkdir(parents=True, exist_ok=True)
        ours = {LOG_NAME, SUMMARY_NAME, PYTEST_NAME, "bench.json", "bench.csv", "bench.png"}
        self.preexisting = frozenset(p.name for p in self.out.iterdir() if p.is_file() and p.name not in ours)
        self.log_path = self.out / LOG_NAME
        self.log_path.write_text("", encoding="utf-8")
        self.cuda = True
        self.dry_run = bool(getattr(args, "dry_run", False))
        self.extra_path: str | None = None

    def log(self, text: str, *, echo: bool = True) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        if echo:
            print(text, flush=True)

    def reserve_after(self, name: str, sections: Sequence[str]) -> float:
        later = sections[sections.index(name) + 1 :]
        return BENCH_MIN_S if "bench" in later else 0.0

    def run(self, sections: Sequence[str]) -> list[SectionResult]:
        self.extra_path = self.install_wheels()
        for name in sections:
            now = time.perf_counter()
            budget = section_budget(BUDGETS[name], now, self.deadline, self.reserve_after(name, sections))
            if name == "bench":
                budget = max(0.0, budget - 15.0)  # margin for the chart and the summary
            if budget < 5.0:
                res = SectionResult(
                    name, "skipped", budget_s=budget, note="not started: the total time budget is spent"
                )
            elif not self.cuda and name in ("build", "checks", "bench") and not (self.args.allow_cpu or self.dry_run):
                res = SectionResult(name, "skipped", note="no CUDA device is visible (env section)")
            elif name == "pytest":
                res = self.section_pytest(budget)
            else:
                res = self.section_child(name, budget)
            res.budget_s = round(budget, 1)
            self.results.append(res)
            self.log(f"== {name}: {res.status} in {res.seconds:.1f} s (budget {budget:.0f} s) {res.note}")
            if name == "env" and res.status == "ok":
                self.cuda = bool(res.details.get("cuda_available"))
            self.write_summary()
        if "bench" in sections:
            self.finish_bench()
        keep = [SUMMARY_NAME, LOG_NAME, "bench.json", "bench.csv", "bench.png", PYTEST_NAME]
        removed = limit_files(self.out, keep, self.preexisting)
        if removed:
            self.log(f"removed {removed} (leftovers; the output folder holds at most {MAX_FILES} files)")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.write_summary()
        return self.results

    def section_child(self, name: str, budget: float) -> SectionResult:
        result_file = self.tmp / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(result_file),
               "--out", str(self.out)]  # fmt: skip
        if self.args.allow_cpu:
            cmd.append("--allow-cpu")
        if self.dry_run:
            cmd.append("--dry-run")
        if name == "bench":
            cmd += ["--bench-budget", f"{max(10.0, budget - 20.0):.0f}"]
            if self.args.bench_quick:
                cmd.append("--bench-quick")
            if self.args.bench_rows:
                cmd += ["--bench-rows", self.args.bench_rows]
        env = self.child_environment()
        if name == "build":
            env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        self.log(f"== {name}: {' '.join(cmd)}", echo=True)
        status, rc, output, secs = run_process(cmd, budget, env)
        self.log(output[-200_000:], echo=name in ("checks", "bench", "env"))
        res = SectionResult(name, status, seconds=round(secs, 1))
        if status == "timeout":
            res.note = f"killed after {budget:.0f} s"
            self.clear_build_locks()
        if result_file.is_file():
            payload = json.loads(result_file.read_text(encoding="utf-8"))
            res.status = payload["status"] if status == "ok" else res.status
            res.note = payload.get("note", res.note)
            res.details = payload.get("details", {})
        elif status == "failed":
            res.status, res.note = "error", f"exit status {rc}; last output: {output.strip()[-300:]}"
        return res

    def install_wheels(self) -> str | None:
        """``pip install --no-deps --target`` the wheels of ``--wheels`` (carried Python packages the
        machine lacks, e.g. diffusers for the B0a rows) into a temporary folder that every section
        gets on ``PYTHONPATH``. Returns that folder, or None when there is nothing to install."""
        folder = Path(self.args.wheels) if self.args.wheels else None
        wheels = sorted(folder.glob("*.whl")) if folder is not None and folder.is_dir() else []
        if not wheels:
            if self.args.wheels and self.args.wheels != DEFAULT_WHEELS:
                self.log(f"== wheels: no *.whl in {self.args.wheels}")
            return None
        target = self.tmp / "site"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--target", str(target), *map(str, wheels)]  # fmt: skip
        status, rc, output, secs = run_process(cmd, 120.0)
        names = ", ".join(w.name.split("-")[0] + " " + w.name.split("-")[1] for w in wheels)
        self.log(f"== wheels: {status} in {secs:.1f} s ({names}){'' if status == 'ok' else chr(10) + output[-2000:]}")
        return str(target) if status == "ok" else None

    def child_environment(self, interpret: bool | None = False) -> dict[str, str]:
        env = child_env(interpret=interpret)
        if self.extra_path:
            env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], self.extra_path])  # after the repo
        cap = (self.env_details().get("capability") or "").strip()
        if cap and "TORCH_CUDA_ARCH_LIST" not in env:
            # Build for the GPU that is here only (much faster), and the same flags in every section, so
            # later sections load the build section's extension instead of rebuilding it.
            env["TORCH_CUDA_ARCH_LIST"] = cap
        return env

    def clear_build_locks(self) -> None:
        """Remove the lock files a killed extension build leaves behind (torch's ``FileBaton`` waits on
        them forever, which would stall every later section)."""
        removed = clear_stale_build_locks()
        if removed:
            self.log(f"removed stale extension build lock(s): {removed}")

    def env_details(self) -> dict[str, Any]:
        return next((r.details for r in self.results if r.name == "env"), {})

    def section_pytest(self, budget: float) -> SectionResult:
        """The GPU test selection with ``FASTDDPM_TEST_DEVICE=cuda`` and TRITON_INTERPRET cleared (Triton
        compiles for the GPU; tests/conftest.py picks the interpreter again only for CPU runs). Dry run:
        ``--collect-only`` of the same selection (imports every test module: none may compile at import)."""
        cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-rs", "-k", self.args.pytest_k, "-p", "no:cacheprovider",
               "-p", "gpu_check", "--continue-on-collection-errors"]  # fmt: skip
        if self.dry_run:
            cmd.append("--collect-only")
        elif self.args.pytest_workers > 1 and importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(self.args.pytest_workers)]  # the interpreter-run Triton tests are CPU-bound
        env = self.child_environment(interpret=False)
        env["FASTDDPM_TEST_DEVICE"] = "cuda" if self.cuda else "cpu"
        self.log(f"== pytest: {' '.join(cmd)}")
        status, rc, output, secs = run_process(cmd, budget, env)
        (self.out / PYTEST_NAME).write_text(output, encoding="utf-8")
        self.log(output[-20_000:], echo=False)
        counts = parse_pytest_summary(output)
        res = SectionResult("pytest", status, seconds=round(secs, 1), details=dict(counts=counts, returncode=rc))
        if self.dry_run and status == "ok":
            res.note = f"dry run: collected only, {counts.get('collected', 0)} selected; GPU run budget {budget:.0f} s"
        elif status == "timeout":
            res.note = f"killed after {budget:.0f} s; partial output in {PYTEST_NAME}"
            self.clear_build_locks()
        elif rc == 5:
            res.status, res.note = "skipped", "no test matched"
        elif status == "failed" and counts:
            res.note = f"{counts.get('failed', 0)} failed, {counts.get('error', 0) + counts.get('errors', 0)} errors"
        elif status == "failed":
            res.note = f"pytest exited with status {rc} before its summary; see {PYTEST_NAME}"
        return res

    def finish_bench(self) -> None:
        js, png = self.out / "bench.json", self.out / "bench.png"
        if js.is_file() and not png.is_file():  # the bench was killed before its chart
            try:
                sys.path[:0] = [str(REPO), str(BENCH_DIR)]
                import harness

                harness.plot_json(js, png)
                self.log("drew bench.png from bench.json")
            except Exception as e:
                self.log(f"could not draw bench.png: {type(e).__name__}: {e}")

    def write_summary(self) -> None:
        data = dict(
            schema="fastddpm-gpu-check/1",
            total_budget_s=self.budget_s,
            elapsed_s=round(time.perf_counter() - self.t0, 1),
            ok=not any(r.status in ("failed", "error", "timeout") for r in self.results),
            sections=[asdict(r) for r in self.results],
            files=sorted(p.name for p in self.out.iterdir() if p.is_file()),
        )
        tmp = self.out / (SUMMARY_NAME + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.out / SUMMARY_NAME)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=None, help="output folder (default $OUT, else gpu_results/)")
    p.add_argument("--budget", type=float, default=480.0, help="total seconds for all sections (default 480)")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list, in order (default {','.join(SECTIONS)})"
    )
    p.add_argument("--pytest-k", default=PYTEST_K, help=f"pytest -k expression (default {PYTEST_K!r})")
    p.add_argument("--pytest-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="pytest-xdist workers when xdist is installed (default min(8, cores))")  # fmt: skip
    p.add_argument("--allow-cpu", action="store_true", help="run the checks and the bench on CPU when there is no GPU")
    p.add_argument("--wheels", default=DEFAULT_WHEELS,
                   help="folder of wheels to install (--no-deps, into a temporary folder) before the sections, "
                        "e.g. diffusers for the B0a rows (default: .whl in the repository, when present; "
                        "benchmarks/fetch_gpu_wheels.sh fills it)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="rehearse on CPU: every section runs, GPU-only steps (and the CPU extension build) are "
                        "skipped with their budgets printed, pytest only collects, the bench runs one quick row")  # fmt: skip
    p.add_argument("--bench-quick", action="store_true", help="the bench's quick matrix (tiny model)")
    p.add_argument("--bench-rows", default=None, help="only these bench row kinds (comma list)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--out", dest="out_opt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bench-budget", type=float, default=300.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out_opt or args.out or os.environ.get("OUT") or "gpu_results"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    orch = Orchestrator(Path(args.out), args.budget, args)
    results = orch.run(sections)
    print("\nsummary:")
    for r in results:
        print(f"  {r.name:7s} {r.status:8s} {r.seconds:7.1f} s  {r.note}")
    print(f"files in {args.out}: {', '.join(sorted(p.name for p in Path(args.out).iterdir() if p.is_file()))}")
    return 1 if any(r.status in ("failed", "error", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
