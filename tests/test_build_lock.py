"""A killed extension build never makes a later run hang (issue: stale torch ``lock`` files).

``torch.utils.cpp_extension.load`` takes a lock file for every load (for the whole build the first
time) and waits forever on one that a killed process left behind. fastddpm loads a finished build
directly and builds under a ``flock`` that dies with its holder (:mod:`fastddpm._build`).
These tests build the real CPU extension once in a fresh ``TORCH_EXTENSIONS_DIR`` (about a minute).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

LOAD = textwrap.dedent(
    """
    from fastddpm._build import load_cpu_extension
    module = load_cpu_extension()
    print("LOADED", module.__file__, flush=True)
    """
)


def _env(ext_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    return env


def _start(ext_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LOAD], env=_env(ext_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _run(ext_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LOAD], env=_env(ext_dir), capture_output=True, text=True, timeout=timeout
    )


def _kill_tree(proc: subprocess.Popen, sig: int) -> None:
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _build_dirs(ext_dir: Path) -> list[Path]:
    return [p for p in ext_dir.iterdir() if p.is_dir() and p.name.startswith("fastddpm_cpu_")]


@pytest.mark.slow
def test_killed_builds_and_stale_locks_never_hang_the_next_run(tmp_path):
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    # 1. Kill the first build at several moments of its start-up (import, build, link), with SIGTERM
    #    and SIGKILL; torch's lock file is left behind by at least the ones killed mid-build.
    for delay, sig in ((1.5, signal.SIGTERM), (6.0, signal.SIGKILL), (12.0, signal.SIGTERM)):
        proc = _start(ext_dir)
        time.sleep(delay)
        if proc.poll() is None:
            _kill_tree(proc, sig)
    # 2. The next run finishes (it builds from scratch; several minutes would mean a hang).
    done = _run(ext_dir, timeout=480)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED" in done.stdout
    (build_dir,) = _build_dirs(ext_dir)
    assert (build_dir / "fastddpm_built").is_file()

    # 3. A stale torch lock next to a finished build: loaded at once, the lock never consulted.
    (build_dir / "lock").write_text("")
    start = time.monotonic()
    done = _run(ext_dir, timeout=120)
    assert done.returncode == 0 and "LOADED" in done.stdout, done.stderr[-2000:]
    assert time.monotonic() - start < 60

    # 4. A stale lock and no finished-build marker (killed between link and marker): the lock is
    #    removed, with a message, and the (no-op) build finishes.
    (build_dir / "fastddpm_built").unlink()
    done = _run(ext_dir, timeout=240)
    assert done.returncode == 0 and "LOADED" in done.stdout, done.stderr[-2000:]
    assert "stale build lock" in done.stderr
    assert not (build_dir / "lock").exists()

    # 5. A live builder holds the flock: the waiter says so, naming the lock file, and goes on once
    #    the holder is gone (killed here: the kernel drops its flock).
    (build_dir / "fastddpm_built").unlink()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'process holder'); print('held', flush=True); "
            "time.sleep(600)",
            str(build_dir / "fastddpm_build.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    log = tmp_path / "waiter.err"
    with open(log, "w") as err_file:
        waiter = subprocess.Popen(
            [sys.executable, "-c", LOAD], env=_env(ext_dir), stdout=subprocess.PIPE, stderr=err_file, text=True
        )
        deadline = time.monotonic() + 120
        while "waiting for the C++ extension build" not in log.read_text() and time.monotonic() < deadline:
            assert waiter.poll() is None, log.read_text()[-2000:]  # it must wait for the live holder
            time.sleep(0.2)
        assert "waiting for the C++ extension build" in log.read_text()
        assert "process holder" in log.read_text() and "fastddpm_build.lock" in log.read_text()
        holder.kill()
        holder.wait()
        out, _ = waiter.communicate(timeout=240)
    assert waiter.returncode == 0 and "LOADED" in out, log.read_text()[-2000:]
