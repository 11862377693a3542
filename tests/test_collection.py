"""Collecting the suite compiles nothing: a module deselected with ``-k`` (or skipped) must not cost an
extension build, in every xdist worker and in gpu_check's test selection alike."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# Loaded with ``-p`` before any test module is imported: every torch extension build goes through
# cpp_extension.load / load_inline, so wrapping those two catches a build from any module, by any path.
PLUGIN = textwrap.dedent(
    """
    import traceback

    from torch.utils import cpp_extension

    BUILDS = []

    def _refuse(name):
        def refuse(*args, **kwargs):
            BUILDS.append(name + " called from:\\n" + "".join(traceback.format_stack(limit=12)))
            raise RuntimeError("an extension build during test collection")
        return refuse

    cpp_extension.load = _refuse("cpp_extension.load")
    cpp_extension.load_inline = _refuse("cpp_extension.load_inline")

    def pytest_collection_finish(session):
        print("EXTENSION BUILDS AT COLLECTION:", len(BUILDS))
        for b in BUILDS:
            print(b)
    """
)


def test_collecting_the_suite_builds_no_extension(tmp_path):
    (tmp_path / "refuse_builds.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")  # empty: a build could not be a cache hit
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "refuse_builds", "-p", "no:cacheprovider",
         str(TESTS)],
        capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "EXTENSION BUILDS AT COLLECTION: 0" in out, out[-4000:]
    assert "test_collecting_the_suite_builds_no_extension" in out  # it did collect this very suite
