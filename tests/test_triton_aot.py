"""Every Triton kernel compiles for a Hopper GPU (sm_90), with no spills and wide memory accesses.

The rest of the suite runs the kernels in the Triton interpreter, which never compiles them. This
test runs tests/triton_aot.py in a child process without TRITON_INTERPRET: it launches the kernels
through the package's own launchers with a stand-in driver, so Triton compiles each variant to a
cubin for sm_90 exactly as a launch on an H100/H200 would (same grid, block sizes, argument
specialisation), then reads the resource usage and the PTX.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # compile for real, not from an earlier run's cache
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_aot.py"), "--arch", "90", "--json", str(tmp / "report.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((tmp / "report.json").read_text())


def _variant(report, name):
    (v,) = [v for v in report["variants"] if v["name"] == name]
    return v


def test_every_variant_compiles_without_spills(report):
    names = {v["name"].split("/")[0] for v in report["variants"]}
    assert names == {"step", "q_sample", "randn", "multistep", "group_norm"}
    for v in report["variants"]:
        assert v["ok"], v
        assert v["cubin_bytes"] > 0
        if v.get("local", -1) >= 0:  # cuobjdump found: local memory means register spills
            assert v["local"] == 0, v
            assert v["registers"] <= 128, v


def test_fp32_sample_tensors_move_16_bytes_per_access(report):
    # x and m (and v, noise where read) of an aligned fp32 sample: one 16-byte load per 4 elements.
    assert _variant(report, "step/fp32/range/fixed/philox")["loads_16B"] >= 2
    assert _variant(report, "step/fp32/range/fixed/philox")["stores_16B"] >= 2  # prev and x0
    assert _variant(report, "step/fp32/none/learned/tensor")["loads_16B"] >= 4
    assert _variant(report, "q_sample/fp32/philox")["stores_16B"] >= 1
    assert _variant(report, "group_norm/fp32/c128/32x32/add+silu")["loads_16B"] >= 2


def test_half_precision_accesses_are_vectorised(report):
    # 4 bf16/fp16 elements per Philox group: at least 8 bytes per access, never scalar.
    for name in ("step/bf16/range/fixed/philox", "step/fp16/range/fixed/philox", "q_sample/bf16/tensor"):
        v = _variant(report, name)
        assert v["loads_8B"] + v["loads_16B"] >= 2, v
        assert v["stores_8B"] + v["stores_16B"] >= 1, v


def test_groupnorm_two_sweep_path_compiles_for_64x64(report):
    # channels-per-group x next_pow2(H*W) > one tile (8192): any 64x64 or larger model takes two sweeps.
    gn = [v for v in report["variants"] if v["name"].startswith("group_norm/")]
    two = {v["name"] for v in gn if v["two_sweep"]}
    assert two == {v["name"] for v in gn if "/64x64/" in v["name"]}
    assert {"group_norm/fp32/c128/64x64/add+silu", "group_norm/bf16/c128/64x64/add+silu/channels_last"} <= two
    for v in gn:
        assert v["ok"] and v["block_c"] * v["block_s"] <= 8192, v
    # the channels_last bf16 two-sweep variant still reads with vector loads
    v = _variant(report, "group_norm/bf16/c128/64x64/add+silu/channels_last")
    assert v["loads_8B"] + v["loads_16B"] >= 1, v
