"""Compile checks of the C++/CUDA sources that need no GPU.

* every ``csrc/*.cu`` compiles with nvcc (``-c``, sm_90 and sm_80, the build's own flags) when nvcc
  is installed, and its PTX keeps the "Bitwise rules" of ``_layout.py`` (no fma, no approximate
  division or root: ``--fmad=false``);
* ``csrc/fastddpm_math.h`` compiles as plain C++ (no torch, no CUDA), its constants equal
  ``fastddpm/_layout.py`` exactly, and its scalar Philox / Box-Muller / exp (the code the CUDA
  kernels and the portable CPU path run), built with the CPU extension's flags, give the same bits
  as the plain-torch spec in ``fastddpm.noise``.
"""

import glob
import os
import re
import shutil
import struct
import subprocess

import pytest
import torch

from fastddpm import _build
from fastddpm import _layout as L
from fastddpm import noise as nz

CSRC = _build.csrc_dir()
CU_FILES = sorted(CSRC.glob("*.cu"))


def _cxx() -> str:
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    return cxx


def _nvcc() -> str:
    nvcc = _build._nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
    return nvcc


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


def test_there_are_cuda_sources():
    assert [p.name for p in CU_FILES] == ["cuda_kernels.cu", "cuda_multistep.cu"]


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_with_nvcc(source, arch, tmp_path):
    nvcc = _nvcc()
    obj = tmp_path / (source.stem + ".o")
    flags = ["-std=c++17", *_build._cuda_build_flags(), f"-arch={arch}", "-Xcompiler", "-Wall", f"-I{CSRC}"]
    _run([nvcc, *flags, "-c", str(source), "-o", str(obj)])
    assert obj.stat().st_size > 0


_FMA = re.compile(r"\bfma\.[\w.]*f32\b")
_APPROX = re.compile(r"\b(?:div|sqrt|rsqrt|rcp|ex2|lg2|sin|cos)\.(?:approx|full)[\w.]*")


def test_cuda_kernels_ptx_has_no_fma_or_approximations(tmp_path):
    """With the build's flags (--fmad=false) the PTX rounds every float32 operation on its own, as
    the CPU kernels and the reference do; nvcc's default (--fmad=true) would contract a*b + c."""
    nvcc = _nvcc()
    src = CSRC / "cuda_kernels.cu"
    base = ["-std=c++17", "-arch=sm_90", f"-I{CSRC}", "-ptx", str(src)]
    flags = _build._cuda_build_flags()
    assert "--fmad=false" in flags
    _run([nvcc, *flags, *base, "-o", str(tmp_path / "k.ptx")])
    ptx = (tmp_path / "k.ptx").read_text()
    assert "sqrt.rn.f32" in ptx  # the Box-Muller root is there, correctly rounded
    assert _FMA.findall(ptx) == []
    assert sorted(set(_APPROX.findall(ptx))) == []
    _run([nvcc, *[f for f in flags if f != "--fmad=false"], *base, "-o", str(tmp_path / "default.ptx")])
    assert _FMA.findall((tmp_path / "default.ptx").read_text()), "nvcc's default contracts: the check has teeth"


def test_cuda_header_is_plain_c(tmp_path):
    """cuda_kernels.h (the C launcher API) compiles as C99 with only the CUDA runtime headers."""
    nvcc = _nvcc()
    src = tmp_path / "use_header.c"
    src.write_text('#include "cuda_kernels.h"\nint main(void) { fddpm_step_params p = {0}; return (int)p.batch; }\n')
    flags = ["-x", "c", "-Xcompiler", "-std=c99,-Wall,-Werror", f"-I{CSRC}"]
    _run([nvcc, *flags, "-c", str(src), "-o", str(tmp_path / "u.o")])


# --- the shared math header as plain C++ -------------------------------------------------------------

_CONSTANTS = {k: v for k, v in vars(L).items() if k.isupper() and isinstance(v, (int, float))}


def _math_probe(tmp_path, seed: int, g: int, t: int, stream: int, groups: int, exp_in=None) -> dict[str, list[str]]:
    """Compile (with the CPU extension's flags) and run a program that prints the header's constants,
    Philox words, normals (as float32 bit patterns) and exp_f32 of the float32 values in ``exp_in``."""
    lines = [
        '#include "fastddpm_multistep.h"',  # includes fastddpm_math.h
        "#include <cinttypes>",
        "#include <cstdio>",
        "#include <cstdlib>",
        "using namespace fastddpm;",
        "int main(int argc, char** argv) {",
        "  if (argc != 6) return 2;",
    ]
    for name in _CONSTANTS:
        lines.append(f'  std::printf("const {name} %.17g\\n", static_cast<double>({name}));')
    lines += [
        "  const int64_t seed = std::strtoll(argv[1], nullptr, 10), g = std::strtoll(argv[2], nullptr, 10);",
        "  const int64_t t = std::strtoll(argv[3], nullptr, 10);",
        "  const int stream = std::atoi(argv[4]), groups = std::atoi(argv[5]);",
        "  const PhiloxStream st = philox_stream(seed, g, t, stream);",
        "  for (int i = 0; i < groups; ++i) {",
        "    uint32_t r0, r1, r2, r3;",
        "    philox_group(st, static_cast<uint32_t>(i), r0, r1, r2, r3);",
        '    std::printf("words %u %u %u %u\\n", r0, r1, r2, r3);',
        "    float n0, n1, n2, n3;",
        "    philox_normal4(st, static_cast<uint32_t>(i), n0, n1, n2, n3);",
        '    std::printf("normals %u %u %u %u\\n", float_as_uint(n0), float_as_uint(n1), float_as_uint(n2),',
        "                float_as_uint(n3));",
        "  }",
        '  if (FILE* f = std::fopen("exp_in.bin", "rb")) {',
        "    float x;",
        '    while (std::fread(&x, sizeof(x), 1, f) == 1) std::printf("exp %u\\n", float_as_uint(exp_f32(x)));',
        "    std::fclose(f);",
        "  }",
        "  return 0;",
        "}",
    ]
    src = tmp_path / "probe.cpp"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "probe"
    if exp_in is not None:
        (tmp_path / "exp_in.bin").write_bytes(struct.pack(f"{len(exp_in)}f", *exp_in))
    # -Wall -Wextra -Werror: the header stays warning-free for any includer. The CPU extension's
    # flags (-O3 -march=native -ffp-contract=off ...): the arithmetic the extension runs.
    flags = _build.cpu_build_flags(openmp=False)
    _run([_cxx(), "-std=c++17", *flags, "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", str(src), "-o", str(exe)])
    proc = subprocess.run([str(exe), str(seed), str(g), str(t), str(stream), str(groups)], capture_output=True,
                          text=True, timeout=60, check=True, cwd=tmp_path)  # fmt: skip
    out: dict[str, list[str]] = {"const": [], "words": [], "normals": [], "exp": []}
    for line in proc.stdout.splitlines():
        kind, rest = line.split(" ", 1)
        out[kind].append(rest)
    return out


def test_math_header_constants_equal_layout(tmp_path):
    probe = _math_probe(tmp_path, seed=1, g=0, t=0, stream=0, groups=0)
    got = {name: float(value) for name, value in (line.split() for line in probe["const"])}
    for name, want in _CONSTANTS.items():
        assert got[name] == want, name  # exact: the float constants are exact float32 values on both sides
    assert set(got) == set(_CONSTANTS)


@pytest.mark.parametrize(
    "seed, g, t, stream",
    [(0, 0, 0, L.STREAM_STEP), (-1234567890123456789, 2**33 + 7, 999, L.STREAM_QSAMPLE), (2**62 + 3, 5, 1000, 2)],
)
def test_math_header_philox_is_the_spec(tmp_path, seed, g, t, stream):
    groups = 300
    probe = _math_probe(tmp_path, seed=seed, g=g, t=t, stream=stream, groups=groups)
    words = torch.tensor([[int(w) for w in line.split()] for line in probe["words"]], dtype=torch.int64)
    c0 = torch.arange(groups, dtype=torch.int64)
    c1 = torch.full_like(c0, g & 0xFFFFFFFF)
    c2 = torch.full_like(c0, t & 0xFFFFFFFF)
    c3 = torch.full_like(c0, stream | ((g >> 32) << 8))
    ref_words = torch.stack(nz.philox4x32(c0, c1, c2, c3, seed), dim=1)
    assert torch.equal(words, ref_words)  # bit-exact uint32 words

    bits = torch.tensor([[int(v) for v in line.split()] for line in probe["normals"]], dtype=torch.int64)
    normals = bits.to(torch.int32).view(torch.float32).reshape(1, -1)  # uint32 bits -> int32 -> float32
    ref = nz.philox_normal(seed, torch.tensor([g]), torch.tensor([t]), 4 * groups, stream)
    assert torch.equal(normals.view(torch.int32), ref.view(torch.int32))  # bit-exact float32 normals


def test_math_header_exp_is_the_spec(tmp_path):
    x = torch.cat([(torch.rand(20_000) - 0.5) * 220, torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])])
    probe = _math_probe(tmp_path, seed=1, g=0, t=0, stream=0, groups=0, exp_in=x.tolist())
    got = torch.tensor([int(v) for v in probe["exp"]], dtype=torch.int64).to(torch.int32).view(torch.float32)
    want = nz.exp_f32(x)
    assert torch.equal(got[:-2].view(torch.int32), want[:-2].view(torch.int32))
    assert torch.isnan(got[-2]) and got[-1] == 1.0


def _cuda_include() -> str:
    from torch.utils import cpp_extension

    candidates = [os.path.join(cpp_extension.CUDA_HOME, "include")] if cpp_extension.CUDA_HOME else []
    nvcc = _build._nvcc_path()
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    candidates += [os.path.join(os.environ[k], "include") for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    candidates += ["/usr/local/cuda/include", *sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)]
    for inc in candidates:
        if os.path.isfile(os.path.join(inc, "cuda_runtime.h")):
            return inc
    pytest.skip("no CUDA runtime headers (cuda_runtime.h) found")


def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """csrc/cuda_binding.cpp (the torch side of the CUDA backend) passes the host compiler's full
    semantic check against this torch's headers and the CUDA runtime headers.

    The CPU wheel of torch ships the c10/cuda and ATen/cuda headers but not the one CMake-generated
    ``c10/cuda/impl/cuda_cmake_macros.h``; a stand-in with the content a CUDA build generates is
    put first on the include path. Linking needs a CUDA build of torch (done on the GPU machine).
    """
    from torch.utils import cpp_extension

    cxx = _cxx()
    torch_inc = cpp_extension.include_paths()
    if not os.path.isfile(os.path.join(torch_inc[0], "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("this torch ships no c10/cuda headers")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    import sysconfig

    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror=return-type",
           "-isystem", str(tmp_path / "stub"), *[a for p in torch_inc for a in ("-isystem", p)],
           "-isystem", sysconfig.get_paths()["include"], "-isystem", _cuda_include(),
           "-DTORCH_EXTENSION_NAME=fastddpm_cuda_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-I{CSRC}", str(CSRC / "cuda_binding.cpp")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "warning" not in proc.stderr, proc.stderr[-6000:]
