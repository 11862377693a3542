"""Build-on-first-use of the C++ (CPU) and CUDA extensions in ``fastddpm/csrc``.

Nothing here runs at import time. :func:`load_cpu_extension` / :func:`load_cuda_extension` compile
the sources that ship inside the package with :func:`torch.utils.cpp_extension.load` (ninja) the
first time they are called, in torch's extension build directory (``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``), and keep the module for the rest of the process (``functools.cache``). The extension
name carries a hash of the sources, the compiler flags, the torch version and (for the CPU build,
which uses ``-march=native``) the host CPU, so a cached build is never reused for other sources,
flags or a different CPU.

A build that cannot happen or fails raises :class:`ExtensionUnavailableError` whose ``reason`` is
one line (no compiler, no ninja, no GPU, or the first error lines of the compiler), for the backend
dispatcher to turn into a single warning. The outcome is cached too: a failed build is not retried
in the same process.

Environment:
    ``FASTDDPM_VERBOSE_BUILD=1``  show the compiler output.
    ``FASTDDPM_CPU_NATIVE=0``     build the CPU extension without ``-march=native``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "ExtensionUnavailableError",
    "compiler_info",
    "cpu_build_flags",
    "csrc_dir",
    "load_cpu_extension",
    "load_cuda_extension",
]

_CPU_SOURCES = ("cpu_kernels.cpp", "cpu_groupnorm.cpp", "cpu_multistep.cpp")
_CUDA_SOURCES = ("cuda_binding.cpp", "cuda_kernels.cu", "cuda_multistep.cu")
_HEADERS = (
    "fastddpm_math.h",
    "torch_checks.h",
    "cuda_kernels.h",
    "cpu_groupnorm.h",
    "fastddpm_multistep.h",
    "cpu_multistep.h",
    "cuda_multistep.h",
)


class ExtensionUnavailableError(RuntimeError):
    """An extension cannot be built or loaded here; ``reason`` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def csrc_dir() -> Path:
    """Directory of the C++/CUDA sources shipped in the package (``fastddpm.csrc``)."""
    import fastddpm.csrc

    return Path(fastddpm.csrc.__file__).resolve().parent


def _verbose() -> bool:
    return os.environ.get("FASTDDPM_VERBOSE_BUILD", "0") not in ("", "0")


def _cxx() -> str:
    """The C++ compiler torch's extension builder will call."""
    return os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return lines[0] if lines else None


def _nvcc_path() -> str | None:
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
        if candidate.exists():
            return str(candidate)
    return shutil.which("nvcc")


def compiler_info() -> dict[str, str | bool | None]:
    """Which compilers the extension builds would use, for ``fastddpm info``.

    Returns:
        dict with ``cxx`` (path or None), ``cxx_version`` (first line of ``--version``), ``nvcc``
        (path or None), ``nvcc_version`` (last line of ``nvcc --version``), ``cuda_home`` (torch's
        CUDA_HOME), ``ninja`` (bool), ``torch_cuda`` (CUDA version torch was built with) and
        ``cpu_flags`` (the C++ flags the CPU build tries first).
    """
    from torch.utils import cpp_extension

    cxx = shutil.which(_cxx())
    nvcc = _nvcc_path()
    return {
        "cxx": cxx,
        "cxx_version": _first_line([cxx, "--version"]) if cxx and sys.platform != "win32" else None,
        "nvcc": nvcc,
        "nvcc_version": _nvcc_release(nvcc) if nvcc else None,
        "cuda_home": cpp_extension.CUDA_HOME,
        "ninja": cpp_extension.is_ninja_available(),
        "torch_cuda": torch.version.cuda,
        "cpu_flags": " ".join(cpu_build_flags()),
    }


def _nvcc_release(nvcc: str) -> str | None:
    """``release 13.0, V13.0.88`` from ``nvcc --version``."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release [^\n]*", out)
    return match.group(0).strip() if match else (out.strip().splitlines() or [None])[-1]


def _native_allowed() -> bool:
    return os.environ.get("FASTDDPM_CPU_NATIVE", "1") not in ("", "0")


def cpu_build_flags(*, native: bool | None = None, openmp: bool = True) -> list[str]:
    """C++ flags of the CPU extension.

    ``-O3`` so that gcc/clang vectorise the lane loops; ``-fno-math-errno`` so ``sqrtf`` becomes one
    instruction; ``-fno-trapping-math`` so selects over float math are if-converted (it only drops
    the promise to keep floating-point exception flags exact; results do not change); ``-fopenmp``
    because ``at::parallel_for`` is an inline OpenMP loop in torch's headers and runs on one
    thread without it (the extension then shares torch's libgomp and its ``torch.set_num_threads``).
    ``-ffp-contract=off`` because the kernels follow the float32 operation order of the "Bitwise
    rules" of :mod:`fastddpm._layout` (every backend returns the same bits): gcc contracts ``a*b + c``
    into an FMA by default wherever the target has one (``-march=native`` on any AVX2 CPU).
    Never ``-ffast-math``: the kernels rely on IEEE rounding (see ``round_small`` in fastddpm_math.h).
    """
    if sys.platform == "win32":
        return ["/O2", "/fp:precise"] + (["/openmp"] if openmp else [])
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if openmp:
        flags.append("-fopenmp")
    if native is None:
        native = _native_allowed()
    if native:
        flags.append("-march=native")
    return flags


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    parts = [platform.machine(), platform.processor()]
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "flags", "Features", "CPU part"):
        match = re.search(rf"^{key}\s*:\s*(.*)$", text, re.MULTILINE)
        if match:
            parts.append(match.group(1).strip())
    return "|".join(parts)


def _digest(sources: tuple[str, ...], *extra: str) -> str:
    h = hashlib.sha256()
    root = csrc_dir()
    for name in sorted(set(sources) | set(_HEADERS)):
        path = root / name
        h.update(name.encode())
        h.update(path.read_bytes() if path.exists() else b"<missing>")
    h.update(torch.__version__.encode())
    for item in extra:
        h.update(b"\0" + item.encode())
    return h.hexdigest()[:16]


def _build_error_reason(exc: BaseException) -> str:
    """One line out of a failed build: the first compiler error lines, else the exception text."""
    text = str(exc)
    errors = [ln.strip() for ln in text.splitlines() if re.search(r"\berror\b", ln, re.IGNORECASE)]
    errors = [ln for ln in errors if not ln.startswith("ninja: build stopped")]
    picked = errors[:3] if errors else [ln.strip() for ln in text.splitlines() if ln.strip()][:3]
    reason = " | ".join(picked) or type(exc).__name__
    return reason if len(reason) <= 600 else reason[:597] + "..."


def _build_directory(name: str) -> Path:
    """torch's build folder for extension ``name`` (``TORCH_EXTENSIONS_DIR`` or its default cache), created."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False))


def _library_path(build_dir: Path, name: str) -> Path:
    return build_dir / (name + (".pyd" if sys.platform == "win32" else ".so"))


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_library(path: Path, name: str) -> ModuleType:
    """Import a built extension module from its file (what ``cpp_extension.load`` does last)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the extension {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _built(build_dir: Path, name: str) -> Path | None:
    """The extension file if a build finished for it: the ``fastddpm_built`` marker, written after a
    successful build, holds the file's sha256, so a link killed half-way is never loaded."""
    lib, marker = _library_path(build_dir, name), build_dir / _BUILT_MARKER
    try:
        if lib.is_file() and marker.read_text().strip() == _file_digest(lib):
            return lib
    except OSError:
        return None
    return None


_BUILT_MARKER = "fastddpm_built"
_BUILD_LOCK = "fastddpm_build.lock"
_WAIT_MESSAGE_EVERY_S = 20.0


class _BuildLock:
    """An exclusive ``flock`` on ``<build dir>/fastddpm_build.lock`` around a build.

    The kernel releases a ``flock`` when its holder dies, however it dies, so a killed build never
    blocks later runs (torch's own ``lock`` file does: it stays behind and every later
    ``cpp_extension.load`` waits on it forever). While another live process builds, the waiter says
    so on stderr, naming that process and the lock file, every ``_WAIT_MESSAGE_EVERY_S`` seconds.
    On platforms without ``fcntl`` this lock is a no-op.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> _BuildLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; torch's own lock file is all there is
            return self
        import time

        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        next_message = 0.0
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now >= next_message:
                    holder = self.path.read_text(errors="replace").strip() or "another process"
                    print(
                        f"fastddpm: waiting for the C++ extension build of {holder} to finish (lock {self.path})",
                        file=sys.stderr,
                        flush=True,
                    )
                    next_message = now + _WAIT_MESSAGE_EVERY_S
                time.sleep(0.2)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"process {os.getpid()} on {platform.node()}".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _compile(name: str, sources: tuple[str, ...], **kwargs) -> ModuleType:
    """Load extension ``name``, building it first unless a finished build of it is cached.

    A finished build (see :func:`_built`) is imported directly, without ``cpp_extension.load`` and so
    without torch's build lock. Otherwise the build runs under :class:`_BuildLock`; holding it, any
    torch ``lock`` file left in the build folder is stale (its builder was killed: every fastddpm
    builder holds the flock) and is removed before ``cpp_extension.load`` would wait on it forever.
    """
    from torch.utils import cpp_extension

    build_dir = _build_directory(name)
    lib = _built(build_dir, name)
    if lib is not None:
        return _import_library(lib, name)
    with _BuildLock(build_dir / _BUILD_LOCK):
        lib = _built(build_dir, name)  # another process may have finished it while we waited
        if lib is not None:
            return _import_library(lib, name)
        stale = build_dir / "lock"
        if stale.exists():
            print(f"fastddpm: removing the stale build lock {stale} left by a killed build", file=sys.stderr)
            stale.unlink(missing_ok=True)
        root = csrc_dir()
        module = cpp_extension.load(
            name=name,
            sources=[str(root / s) for s in sources],
            extra_include_paths=[str(root)],
            build_directory=str(build_dir),
            verbose=_verbose(),
            **kwargs,
        )
        lib = _library_path(build_dir, name)
        if lib.is_file():
            tmp = build_dir / (_BUILT_MARKER + f".{os.getpid()}.tmp")
            tmp.write_text(_file_digest(lib))
            os.replace(tmp, build_dir / _BUILT_MARKER)
        return module


def _check_toolchain() -> None:
    from torch.utils import cpp_extension

    if shutil.which(_cxx()) is None:
        raise ExtensionUnavailableError(f"no C++ compiler found ({_cxx()!r} is not on PATH; set CXX or install g++)")
    if not cpp_extension.is_ninja_available():
        raise ExtensionUnavailableError("ninja is not installed (pip install ninja)")


@functools.cache
def _load_cpu() -> ModuleType | ExtensionUnavailableError:
    try:
        _check_toolchain()
    except ExtensionUnavailableError as exc:
        return exc
    # Fall back to more portable builds when a compiler rejects -march=native or -fopenmp (e.g.
    # Apple clang); the first reason is the one reported if all fail.
    native_first = _native_allowed() and sys.platform != "win32"
    attempts = [(True, True), (False, True), (False, False)] if native_first else [(False, True), (False, False)]
    reasons = []
    for native, openmp in attempts:
        flags = cpu_build_flags(native=native, openmp=openmp)
        ldflags = [f for f in flags if f == "-fopenmp"]
        name = "fastddpm_cpu_" + _digest(_CPU_SOURCES, *flags, _cpu_identity() if native else "portable")
        try:
            module = _compile(name, _CPU_SOURCES, extra_cflags=flags, extra_ldflags=ldflags, with_cuda=False)
        except Exception as exc:  # any build failure becomes the reason
            reasons.append(_build_error_reason(exc))
            continue
        module.build_flags = tuple(flags)
        return module
    return ExtensionUnavailableError(f"building the fastddpm CPU extension failed: {reasons[0]}")


def load_cpu_extension() -> ModuleType:
    """The compiled CPU extension (``step``, ``q_sample``, ``randn``), built on first call.

    Raises:
        ExtensionUnavailableError: no compiler / ninja, or the build failed (``reason`` says which).
    """
    result = _load_cpu()
    if isinstance(result, ExtensionUnavailableError):
        raise result
    return result


def _cuda_build_flags() -> list[str]:
    # No --use_fast_math: the threshold division and IEEE rounding must stay exact. --fmad=false:
    # no a*b + c contracted into an FMA, so the kernels round every operation as the "Bitwise rules"
    # of fastddpm._layout say and return the bits of the cpu and triton backends.
    return ["-O3", "-lineinfo", "--fmad=false"]


@functools.cache
def _load_cuda() -> ModuleType | ExtensionUnavailableError:
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return ExtensionUnavailableError("this torch build has no CUDA support")
    if not torch.cuda.is_available():
        return ExtensionUnavailableError("no CUDA device is available")
    if cpp_extension.CUDA_HOME is None:
        return ExtensionUnavailableError("the CUDA toolkit (nvcc) was not found; set CUDA_HOME")
    try:
        _check_toolchain()
    except ExtensionUnavailableError as exc:
        return exc
    cflags = ["-O3"] if sys.platform != "win32" else ["/O2"]
    cuda_flags = _cuda_build_flags()
    major, minor = torch.cuda.get_device_capability()
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    name = "fastddpm_cuda_" + _digest(_CUDA_SOURCES, *cflags, *cuda_flags, arch, str(torch.version.cuda))
    try:
        return _compile(name, _CUDA_SOURCES, extra_cflags=cflags, extra_cuda_cflags=cuda_flags, with_cuda=True)
    except Exception as exc:  # any build failure becomes the reason
        return ExtensionUnavailableError(f"building the fastddpm CUDA extension failed: {_build_error_reason(exc)}")


def load_cuda_extension() -> ModuleType:
    """The compiled CUDA extension (``step``, ``q_sample``, ``randn``), built on first call.

    Raises:
        ExtensionUnavailableError: no CUDA torch / device / toolkit, or the build failed.
    """
    result = _load_cuda()
    if isinstance(result, ExtensionUnavailableError):
        raise result
    return result
