"""``dtype="auto"``: float32 unless the CPU has native bf16 and bf16 autocast is measured faster."""

import pytest
import torch

from fastddpm import autodtype
from fastddpm.autodtype import MIN_FP32_MS, MIN_SPEEDUP, parse_dtype, resolve_dtype


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autodtype, "_MEMORY", {})


def _native(monkeypatch, native: bool) -> None:
    flags = {"avx512_bf16"} if native else {"avx2"}
    monkeypatch.setattr(autodtype, "_cpu_flags", lambda: flags)


class _Denoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) + t.view(-1, 1, 1, 1).to(x.dtype) * 1e-3


def _model() -> torch.nn.Module:
    return _Denoiser()


@pytest.mark.parametrize(
    "given, want",
    [(None, torch.float32), ("fp32", torch.float32), ("BF16", torch.bfloat16), (torch.float16, torch.float16),
     ("auto", "auto"), ("float16", torch.float16)],
)  # fmt: skip
def test_parse_dtype(given, want):
    assert parse_dtype(given) == want


@pytest.mark.parametrize("bad", ["fp64", torch.float64, 3, "int8", torch.int32])
def test_parse_dtype_refuses(bad):
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype(bad)


def test_explicit_dtype_is_kept_and_never_measured(monkeypatch):
    _native(monkeypatch, True)
    x = torch.zeros(2, 3, 4, 4)
    choice = resolve_dtype("bf16", _model(), x, measure=lambda d: pytest.fail("measured"))
    assert choice.dtype == torch.bfloat16 and choice.autocast_dtype == torch.bfloat16
    assert resolve_dtype(torch.float32, _model(), x).autocast_dtype is None


def test_auto_without_native_bf16_is_float32_without_measuring(monkeypatch):
    _native(monkeypatch, False)
    choice = resolve_dtype("auto", _model(), torch.zeros(2, 3, 4, 4), measure=lambda d: pytest.fail("measured"))
    assert choice.dtype == torch.float32 and "no native bf16" in choice.reason


@pytest.mark.parametrize(
    "fp32_ms, bf16_ms, want",
    [
        (MIN_FP32_MS / 2, 1.0, torch.float32),  # too small to matter: bf16 not even timed
        (200.0, 200.0 / MIN_SPEEDUP - 1, torch.bfloat16),  # clearly faster
        (200.0, 200.0 / MIN_SPEEDUP + 1, torch.float32),  # not enough faster
        (100.0, 150.0, torch.float32),  # slower
    ],
)
def test_auto_on_native_bf16_follows_the_measurement(monkeypatch, fp32_ms, bf16_ms, want):
    _native(monkeypatch, True)
    asked = []

    def measure(dtype):
        asked.append(dtype)
        return fp32_ms if dtype == torch.float32 else bf16_ms

    choice = resolve_dtype("auto", _model(), torch.zeros(2, 3, 4, 4), measure=measure)
    assert choice.dtype == want
    assert asked == ([torch.float32] if fp32_ms < MIN_FP32_MS else [torch.float32, torch.bfloat16])


def test_auto_choice_is_cached_on_disk_and_reused(monkeypatch):
    _native(monkeypatch, True)
    monkeypatch.setattr(autodtype, "MIN_PARAMS", 0)
    model, x = _model(), torch.zeros(2, 3, 4, 4)
    first = resolve_dtype("auto", model, x, measure=lambda d: 300.0 if d == torch.float32 else 100.0)
    assert first.dtype == torch.bfloat16
    monkeypatch.setattr(autodtype, "_MEMORY", {})  # a new process: only the disk cache is left
    monkeypatch.setattr(autodtype, "_real_measure", lambda *a: pytest.fail("measured again"))
    again = resolve_dtype("auto", model, x)
    assert again.dtype == torch.bfloat16 and "cached" in again.reason
    # Another batch shape is another key: measured anew.
    monkeypatch.setattr(autodtype, "_real_measure", lambda *a: lambda d: 100.0)
    assert resolve_dtype("auto", model, torch.zeros(3, 3, 4, 4)).dtype == torch.float32


def test_small_models_stay_float32_without_timing(monkeypatch):
    """Below MIN_PARAMS no timing runs (too short to trust on a busy machine, and never a gain)."""
    _native(monkeypatch, True)
    monkeypatch.setattr(autodtype, "_real_measure", lambda *a: pytest.fail("timed a small model"))
    choice = resolve_dtype("auto", _model(), torch.zeros(2, 3, 4, 4))
    assert choice.dtype == torch.float32 and "too small" in choice.reason


def test_real_timing_alternates_and_reports_medians(monkeypatch):
    """The real measurement on a model above the size floor: both dtypes timed, a valid choice made."""
    _native(monkeypatch, True)
    monkeypatch.setattr(autodtype, "MIN_PARAMS", 0)
    monkeypatch.setattr(autodtype, "MIN_FP32_MS", 0.0)
    choice = resolve_dtype("auto", _model(), torch.zeros(2, 3, 8, 8))
    assert choice.fp32_ms > 0 and choice.bf16_ms > 0
    assert choice.dtype == (
        torch.bfloat16 if choice.bf16_ms * autodtype.MIN_SPEEDUP <= choice.fp32_ms else torch.float32
    )


def test_auto_off_the_cpu_is_float32():
    x = torch.zeros(2, 3, 4, 4, device="meta")
    choice = resolve_dtype("auto", _model(), x, measure=lambda d: pytest.fail("measured"))
    assert choice.dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_info_reports_the_cpu_bf16_support_and_the_auto_rule(monkeypatch, capsys, native):
    from fastddpm.cli import main

    _native(monkeypatch, native)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"avx512_bf16 {'yes' if native else 'no'}" in out
    assert ("bf16 autocast for models" in out) == native and ("no native bf16" in out) == (not native)
