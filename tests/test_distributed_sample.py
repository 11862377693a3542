"""Sharded, resumable sampling under torch.distributed (gloo on CPU, 2 ranks through torchrun).

Every comparison is against a single-process run computed in the same test session from a freshly,
randomly initialised tiny U-Net; nothing is compared to stored numbers. The model runs with one thread
in every process, so float results are the same in the test process and in the torchrun workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import distributed as D
from fastddpm import sampling
from fastddpm.cli import build_parser, main
from fastddpm.cli.sample import run_sharded_sample
from fastddpm.images import to_uint8_nhwc
from fastddpm.registry import load_model
from fastddpm.schedule import Schedule
from fastddpm.shards import (
    ShardFolder,
    assign_shards,
    config_differences,
    remove_dead_temps,
    sample_sharded,
    shard_folder,
    shard_ranges,
    temp_name,
    write_npz_stream,
)

STEPS = 5
TORCHRUN_TIMEOUT_S = 600
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread, as the torchrun workers use (OMP_NUM_THREADS=1): same float results."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_dist_env(monkeypatch):
    for name in DIST_ENV + ("FASTDDPM_SHARD_SIZE",):
        monkeypatch.delenv(name, raising=False)


def _save_tiny_model(path: Path) -> Path:
    model = fastddpm.UNet.from_preset("digits")
    model.save_pretrained(path)
    (path / "scheduler_config.json").write_text(json.dumps(Schedule().to_dict()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A freshly, randomly initialised ``digits`` U-Net (8x8x1) saved as a checkpoint directory."""
    return _save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update({"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", **(extra_env or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *argv]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _cli_args(model_dir: Path, out: Path, n: int, batch: int | None, *extra: str) -> list[str]:
    argv = ["sample", "--model", str(model_dir), "--steps", str(STEPS), "--num-samples", str(n),
            "--device", "cpu", "--quiet", "--out", str(out), *extra]  # fmt: skip
    return argv + (["--batch-size", str(batch)] if batch else [])


def _poison(out: Path, n: int) -> None:
    """A stale output the run must replace (a different count and all-255 pixels)."""
    with open(out, "wb") as f:
        np.savez(f, np.full((n + 3, 8, 8, 1), 255, dtype=np.uint8))


def _npz(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        assert list(z.keys()) == ["arr_0"]
        return z["arr_0"]


def _reference(model_dir: Path, n: int, batch: int | None, seed: int = 0) -> np.ndarray:
    """Single-process seed-mode samples of the model as uint8 NHWC."""
    model, schedule, _ = load_model(str(model_dir), "cpu")
    x = fastddpm.sample(model, schedule, n, num_inference_steps=STEPS, batch_size=batch, seed=seed, device="cpu",
                        progress=False)  # fmt: skip
    return to_uint8_nhwc(x)


def _assert_same_bytes(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.uint8
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes(), f"{int((a != b).sum())} of {a.size} pixels differ"


# ------------------------------------------------------------------------------ split / layout
@pytest.mark.parametrize("n", [1, 2, 7, 13, 64])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("align", [1, 3, 4])
def test_split_range_partitions_in_order(n, world_size, align):
    parts = [D.split_range(n, r, world_size, align) for r in range(world_size)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    for (s0, e0), (s1, e1) in zip(parts, parts[1:]):
        assert s0 <= e0 == s1 <= e1  # contiguous, disjoint, in rank order
    for s, _ in parts:
        assert s % align == 0 or s == n  # every rank starts on a batch boundary
    blocks = [-(-(e - s) // align) for s, e in parts]
    assert max(blocks) - min(blocks) <= 1  # balanced in whole batches


def test_split_range_rejects_bad_arguments():
    for bad in [(-1, 0, 1), (4, 2, 2), (4, 0, 0), (4, -1, 2)]:
        with pytest.raises(ValueError):
            D.split_range(*bad)
    with pytest.raises(ValueError):
        D.split_range(4, 0, 2, align=0)


@pytest.mark.parametrize(("n", "size"), [(1, 1), (7, 3), (9, 3), (5, 8)])
def test_shard_ranges_cover_every_index_once(n, size):
    ranges = shard_ranges(n, size)
    assert [i for s, e in ranges for i in range(s, e)] == list(range(n))
    assert all(e - s == size for s, e in ranges[:-1]) and 1 <= ranges[-1][1] - ranges[-1][0] <= size


def test_assign_shards_deals_round_robin():
    todo = [9, 2, 5, 7, 0]
    shares = [assign_shards(todo, r, 3) for r in range(3)]
    assert sorted(k for s in shares for k in s) == sorted(todo)
    assert shares == [[0, 7], [2, 9], [5]]
    assert assign_shards([4], 1, 2) == []  # a rank with no work


def test_write_npz_stream_matches_np_savez(tmp_path):
    arr = torch.randint(0, 256, (11, 5, 3, 3), dtype=torch.uint8).numpy()
    out = tmp_path / "s.npz"
    digest = write_npz_stream(str(out), arr.shape, [arr[:4], arr[4:4], arr[4:10], arr[10:]])
    with open(tmp_path / "ref.npz", "wb") as f:
        np.savez(f, arr)
    _assert_same_bytes(_npz(out), _npz(tmp_path / "ref.npz"))
    assert digest == hashlib.sha256(arr.tobytes()).hexdigest()
    with pytest.raises(ValueError, match="header says"):
        write_npz_stream(str(tmp_path / "short.npz"), arr.shape, [arr[:4]])
    with pytest.raises(ValueError, match="does not fit"):
        write_npz_stream(str(tmp_path / "bad.npz"), arr.shape, [arr[:, :4]])


def test_config_differences_names_nested_fields():
    a = {"seed": 0, "schedule": {"beta_end": 0.02, "clip_sample": True}}
    b = {"seed": 1, "schedule": {"beta_end": 0.01, "clip_sample": True}}
    diffs = config_differences(a, b)
    assert len(diffs) == 2
    assert diffs[0].startswith("schedule.beta_end: 0.02") and diffs[1].startswith("seed: 0")
    assert config_differences(a, json.loads(json.dumps(a))) == []


# ------------------------------------------------------------------- 2 ranks under torchrun
@pytest.fixture(scope="module")
def torchrun_cli(model_dir, tmp_path_factory):
    """``torchrun --nproc_per_node 2 -m fastddpm sample`` (it creates the gloo group itself): N=7, batch 3,
    shard size 3 from ``FASTDDPM_SHARD_SIZE``, so rank 0 draws shards 0 and 2 and rank 1 draws shard 1."""
    work = tmp_path_factory.mktemp("torchrun_cli")
    out = work / "samples.npz"
    _poison(out, 7)
    proc = _torchrun(["-m", "fastddpm", *_cli_args(model_dir, out, 7, 3)], work, {"FASTDDPM_SHARD_SIZE": "3"})
    return out, proc


def test_torchrun_cli_equals_single_process(torchrun_cli, model_dir, tmp_path):
    out, proc = torchrun_cli
    single = tmp_path / "single.npz"
    assert main(_cli_args(model_dir, single, 7, 3)) == 0  # the plain single-process CLI path
    _assert_same_bytes(_npz(out), _npz(single))
    assert proc.stdout.count("wrote 7 images") == 1  # only rank 0 reports


def test_torchrun_cli_manifest_records_config_and_checksums(torchrun_cli):
    out, _ = torchrun_cli
    folder = ShardFolder(shard_folder(out))
    manifest = json.loads(folder.manifest_path.read_text())
    cfg = manifest["config"]
    assert (cfg["num_samples"], cfg["shard_size"]) == (7, 3)
    # recorded whole, with dtype="auto" resolved to the dtype used (the small bundled model: float32)
    want = fastddpm.SamplingConfig(num_inference_steps=STEPS, batch_size=3, shape=(1, 8, 8), dtype="float32")
    assert fastddpm.SamplingConfig.from_dict(cfg["sampling"]) == want
    assert manifest["info"]["world_size"] == 2
    assert manifest["output"]["sha256"] == hashlib.sha256(_npz(out).tobytes()).hexdigest()
    for k, (s, e) in enumerate(shard_ranges(7, 3)):
        rec = json.loads(folder.record_path(k).read_text())
        assert (rec["start"], rec["stop"], rec["count"]) == (s, e, e - s)
        assert folder.check(k, s, e, (8, 8, 1)) is None
    assert not list(folder.path.glob(".*.tmp"))


DRIVER = textwrap.dedent(
    """
    import os
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    import fastddpm
    from fastddpm.cli import main
    from fastddpm.registry import load_model

    model_dir, work, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")  # the caller's group: fastddpm must use it and leave it alone
    rank = dist.get_rank()
    model, schedule, _ = load_model(model_dir, "cpu")
    for n, batch in [(8, 4), (7, 3), (1, None)]:
        x = fastddpm.sample(model, schedule, n, num_inference_steps=steps, batch_size=batch, seed=3, device="cpu",
                            progress=False)
        torch.save(x, work / f"api-{n}-{rank}.pt")
    for n, batch, shard in [(1, None, ""), (5, 2, "2")]:  # N=1: rank 1 has no shard; N=5: 3 shards on 2 ranks
        os.environ["FASTDDPM_SHARD_SIZE"] = shard
        rc = main(["sample", "--model", model_dir, "--steps", str(steps), "--num-samples", str(n), "--device", "cpu",
                   "--quiet", "--seed", "3", "--out", str(work / f"cli-{n}.npz")]
                  + (["--batch-size", str(batch)] if batch else []))
        assert rc == 0, rc
    os.environ["FASTDDPM_SHARD_SIZE"] = "2"
    rc = main(["sample", "--model", model_dir, "--steps", str(steps), "--num-samples", "5", "--device", "cpu",
               "--quiet", "--batch-size", "2", "--sampler", "ddim", "--use-clipped-model-output",
               "--out", str(work / "cli-clipped.npz")])
    assert rc == 0, rc
    for sampler in ("dpmpp_2m_sde", "unipc"):  # the few-step solvers through the same shards
        rc = main(["sample", "--model", model_dir, "--steps", str(steps), "--num-samples", "5", "--device", "cpu",
                   "--quiet", "--batch-size", "2", "--sampler", sampler, "--out", str(work / f"cli-{sampler}.npz")])
        assert rc == 0, rc
    assert dist.is_initialized()
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def torchrun_driver(model_dir, tmp_path_factory):
    """2 ranks in a process group the script creates: ``fastddpm.sample`` and the sharded CLI inside it."""
    work = tmp_path_factory.mktemp("torchrun_api")
    script = work / "driver.py"
    script.write_text(DRIVER, encoding="utf-8")
    for n in (1, 5):
        _poison(work / f"cli-{n}.npz", n)
    _torchrun([str(script), str(model_dir), str(work), str(STEPS)], work)
    return work


@pytest.mark.parametrize(("n", "batch"), [(8, 4), (7, 3), (1, None)])
def test_sample_api_two_ranks_equals_one(torchrun_driver, model_dir, n, batch):
    model, schedule, _ = load_model(str(model_dir), "cpu")
    ref = fastddpm.sample(model, schedule, n, num_inference_steps=STEPS, batch_size=batch, seed=3, device="cpu",
                          progress=False)  # fmt: skip
    got = [torch.load(torchrun_driver / f"api-{n}-{r}.pt") for r in range(2)]
    assert torch.equal(got[0], got[1])  # every rank returns the full, same tensor
    # Rank boundaries fall on batch boundaries, so each rank runs the same batches as one process: bit-exact.
    assert torch.equal(got[0], ref)


def test_use_clipped_model_output_reaches_the_torchrun_path(torchrun_driver, model_dir, tmp_path):
    """Issue 10 item 3: the sharded path dropped --use-clipped-model-output. Under torchrun it must equal the
    one-process run *with* the flag, and that must differ from the run without it (else this tests nothing)."""
    with_flag, without = tmp_path / "with.npz", tmp_path / "without.npz"
    assert main(_cli_args(model_dir, with_flag, 5, 2, "--sampler", "ddim", "--use-clipped-model-output")) == 0
    assert main(_cli_args(model_dir, without, 5, 2, "--sampler", "ddim")) == 0
    assert _npz(with_flag).tobytes() != _npz(without).tobytes()
    _assert_same_bytes(_npz(torchrun_driver / "cli-clipped.npz"), _npz(with_flag))
    manifest = json.loads(ShardFolder(shard_folder(torchrun_driver / "cli-clipped.npz")).manifest_path.read_text())
    assert manifest["config"]["sampling"]["use_clipped_model_output"] is True


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "unipc"])
def test_few_step_solvers_under_torchrun_equal_one_process(torchrun_driver, model_dir, tmp_path, sampler):
    """Seed mode of the multistep solvers (the SDE one with in-kernel noise) is independent of the world size:
    2 ranks through shards give the bytes of one process."""
    single = tmp_path / "single.npz"
    assert main(_cli_args(model_dir, single, 5, 2, "--sampler", sampler)) == 0
    _assert_same_bytes(_npz(torchrun_driver / f"cli-{sampler}.npz"), _npz(single))


@pytest.mark.parametrize(("n", "batch"), [(1, None), (5, 2)])
def test_sharded_cli_uneven_two_ranks(torchrun_driver, model_dir, n, batch):
    """N=1: rank 1 has no shard and still joins the barrier; N=5, batch 2, shard size 2: rank 0 draws 3 images."""
    _assert_same_bytes(_npz(torchrun_driver / f"cli-{n}.npz"), _reference(model_dir, n, batch, seed=3))


# ------------------------------------------------------------------ resuming (one process)
def _sharded_args(model_dir: Path, out: Path, *extra: str, shard_size: int | None = 2):
    args = build_parser().parse_args(_cli_args(model_dir, out, 7, 2, *extra))
    if shard_size is not None:
        args.shard_size = shard_size  # what a future ``--shard-size`` flag sets
    return args


def _run(args) -> int:
    return run_sharded_sample(args, Path(args.out), torch.device("cpu"))


@pytest.fixture(scope="module")
def baseline(model_dir, tmp_path_factory) -> Path:
    """A complete one-process sharded run: N=7, batch 2, shard size 2 -> shards [0,2) [2,4) [4,6) [6,7)."""
    out = tmp_path_factory.mktemp("baseline") / "samples.npz"
    assert _run(_sharded_args(model_dir, out)) == 0
    return out


@pytest.fixture
def resumable(baseline, tmp_path) -> Path:
    """A private copy of the baseline's shards, with the output removed."""
    out = tmp_path / "samples.npz"
    shutil.copytree(shard_folder(baseline), shard_folder(out))
    return out


@pytest.fixture
def draws(monkeypatch) -> list[tuple[int, int]]:
    """Records the global index ranges the sampler is asked to draw."""
    calls: list[tuple[int, int]] = []
    real = sampling.iter_batches

    def counting(model, schedule, start, stop, **kw):
        calls.append((start, stop))
        return real(model, schedule, start, stop, **kw)

    monkeypatch.setattr(sampling, "iter_batches", counting)
    return calls


def _dead_pid() -> int:
    """The pid of a process that has exited (reaped: no process has it until the kernel reuses it)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-*")}


def test_sharded_one_process_equals_plain_sample(baseline, model_dir):
    _assert_same_bytes(_npz(baseline), _reference(model_dir, 7, 2))


def test_rerun_of_complete_run_draws_nothing(resumable, baseline, model_dir, draws):
    before = _stats(shard_folder(resumable))
    assert _run(_sharded_args(model_dir, resumable)) == 0
    assert draws == []
    assert _stats(shard_folder(resumable)) == before
    _assert_same_bytes(_npz(resumable), _npz(baseline))


def _flip_last_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


DAMAGE = {
    "array removed": lambda f, k: f.array_path(k).unlink(),
    "record removed (killed between the two renames)": lambda f, k: f.record_path(k).unlink(),
    "both removed": lambda f, k: (f.array_path(k).unlink(), f.record_path(k).unlink()),
    "pixel flipped": lambda f, k: _flip_last_byte(f.array_path(k)),
    "header damaged": lambda f, k: f.array_path(k).write_bytes(b"\x93NUMPY garbage" + f.array_path(k).read_bytes()[14:]),
    "truncated": lambda f, k: f.array_path(k).write_bytes(f.array_path(k).read_bytes()[:-5]),
    "record edited": lambda f, k: f.record_path(k).write_text(f.record_path(k).read_text().replace('"sha256": "', '"sha256": "0')),
    "record not json": lambda f, k: f.record_path(k).write_text("{"),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("k", [1, 3])
def test_resume_redraws_only_the_damaged_shard(resumable, baseline, model_dir, draws, damage, k, capsys):
    folder = ShardFolder(shard_folder(resumable))
    DAMAGE[damage](folder, k)
    stale_tmp = temp_name(folder.array_path(2), pid=_dead_pid())  # what a killed writer leaves behind
    stale_tmp.write_bytes(b"partial")
    live_tmp = temp_name(folder.array_path(3), pid=os.getppid())  # another live run writing to this folder
    live_tmp.write_bytes(b"in progress")
    before = _stats(folder.path)
    assert _run(_sharded_args(model_dir, resumable)) == 0
    assert draws == [shard_ranges(7, 2)[k]]
    after = _stats(folder.path)
    untouched = {name for name in before if not name.startswith(f"shard-{k:06d}.")}
    assert {name: after[name] for name in untouched} == {name: before[name] for name in untouched}
    assert not stale_tmp.exists()
    assert live_tmp.read_bytes() == b"in progress"
    assert "3 of 4 shards intact" in capsys.readouterr().out
    _assert_same_bytes(_npz(resumable), _npz(baseline))


def test_killed_run_loses_only_its_current_shard(tmp_path, baseline, model_dir, monkeypatch):
    """A run interrupted while drawing its third shard keeps the first two; the rerun draws the rest."""
    out = tmp_path / "samples.npz"
    calls: list[tuple[int, int]] = []
    real = sampling.iter_batches
    die_at = [3]

    def dies(model, schedule, start, stop, **kw):
        calls.append((start, stop))
        if len(calls) == die_at[0]:
            raise KeyboardInterrupt
        return real(model, schedule, start, stop, **kw)

    monkeypatch.setattr(sampling, "iter_batches", dies)
    with pytest.raises(KeyboardInterrupt):
        _run(_sharded_args(model_dir, out))
    assert not out.exists()
    folder = ShardFolder(shard_folder(out))
    assert [folder.check(k, s, e, (8, 8, 1)) for k, (s, e) in enumerate(shard_ranges(7, 2))] == [None, None, "missing", "missing"]  # fmt: skip
    calls.clear()
    die_at[0] = 0
    assert _run(_sharded_args(model_dir, out)) == 0
    assert calls == [(4, 6), (6, 7)]
    _assert_same_bytes(_npz(out), _npz(baseline))


@pytest.mark.parametrize(
    ("extra", "shard_size", "field"),
    [(["--seed", "1"], 2, "sampling.seed"), (["--steps", "4"], 2, "sampling.num_inference_steps"),
     (["--sampler", "ddim"], 2, "sampling.sampler"), (["--spacing", "trailing"], 2, "sampling.timestep_spacing"),
     (["--dtype", "bf16"], 2, "sampling.dtype"),
     (["--use-clipped-model-output", "--sampler", "ddim"], 2, "sampling.use_clipped_model_output"),
     ([], 3, "shard_size"), (["--num-samples", "8"], 2, "num_samples")],
)  # fmt: skip
def test_config_mismatch_is_refused_and_touches_nothing(resumable, model_dir, draws, extra, shard_size, field):
    before = _stats(shard_folder(resumable))
    args = _sharded_args(model_dir, resumable, *extra, shard_size=shard_size)
    with pytest.raises(ValueError, match=rf"different sampling config[\s\S]*{field}:[\s\S]*start fresh"):
        _run(args)
    assert draws == []
    assert _stats(shard_folder(resumable)) == before
    assert not resumable.exists()


def test_execution_choices_may_change_on_resume(resumable, baseline, model_dir, draws):
    """Backend and CUDA graphs do not change the images (held bit-exact elsewhere): a resume may switch them."""
    assert _run(_sharded_args(model_dir, resumable, "--backend", "reference", "--no-cuda-graph")) == 0
    assert draws == []
    _assert_same_bytes(_npz(resumable), _npz(baseline))


def test_other_weights_are_refused(resumable, model_dir, tmp_path):
    model = fastddpm.UNet.from_pretrained(model_dir)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3  # one weight of one layer
    model.save_pretrained(tmp_path / "other")
    shutil.copy(model_dir / "scheduler_config.json", tmp_path / "other")
    with pytest.raises(ValueError, match="model_sha256"):
        _run(_sharded_args(tmp_path / "other", resumable))


def test_moved_checkpoint_still_resumes(resumable, model_dir, tmp_path, draws):
    moved = shutil.copytree(model_dir, tmp_path / "moved")
    assert _run(_sharded_args(moved, resumable)) == 0
    assert draws == []


def test_foreign_folder_is_refused(tmp_path, model_dir):
    out = tmp_path / "samples.npz"
    shard_folder(out).mkdir()
    (shard_folder(out) / "stray.txt").write_text("not a shard")
    with pytest.raises(ValueError, match="stray.txt[\\s\\S]*start fresh"):
        _run(_sharded_args(model_dir, out))


@pytest.mark.parametrize("garbage", ["not a manifest {", "[1, 2]", '{"format": "other"}'])
def test_garbage_manifest_names_the_file_and_keeps_the_shards(resumable, model_dir, draws, garbage):
    """The message names the bad file and a recovery that reuses the intact shards (never "delete the folder");
    following it resumes with nothing redrawn."""
    folder = ShardFolder(shard_folder(resumable))
    folder.manifest_path.write_text(garbage)
    before = _stats(folder.path)
    with pytest.raises(ValueError) as info:
        _run(_sharded_args(model_dir, resumable))
    msg = str(info.value)
    assert str(folder.manifest_path) in msg and "mv " in msg and "delete" not in msg
    assert _stats(folder.path) == before and draws == []
    folder.manifest_path.rename(folder.path.parent / "manifest.bad")  # what the message says to do
    assert _run(_sharded_args(model_dir, resumable)) == 0
    assert draws == []  # every shard reused
    assert json.loads(folder.manifest_path.read_text())["format"] == "fastddpm-shards"


def test_manifestless_shards_of_another_config_are_refused(resumable, model_dir, draws):
    folder = ShardFolder(shard_folder(resumable))
    folder.manifest_path.unlink()
    with pytest.raises(ValueError, match="shard-000000.json[\\s\\S]*other settings"):
        _run(_sharded_args(model_dir, resumable, "--seed", "5"))
    assert draws == [] and not folder.manifest_path.exists()


def test_dead_temps_removed_live_and_foreign_kept(tmp_path):
    target = tmp_path / "shard-000000.npy"
    dead, live = temp_name(target, pid=_dead_pid()), temp_name(target, pid=os.getpid())
    other_host = tmp_path / ".shard-000001.npy.some-other-host.1.tmp"
    for p in (dead, live, other_host):
        p.write_bytes(b"x")
    assert remove_dead_temps(tmp_path) == [dead]
    assert live.exists() and other_host.exists() and not dead.exists()


def test_shard_size_from_env_and_default(tmp_path, model_dir, monkeypatch, draws):
    monkeypatch.setenv("FASTDDPM_SHARD_SIZE", "3")
    out = tmp_path / "env.npz"
    with pytest.warns(UserWarning, match="shard size 3 is not a multiple of batch size 2"):
        assert _run(_sharded_args(model_dir, out, shard_size=None)) == 0
    assert draws == [(0, 3), (3, 6), (6, 7)]
    monkeypatch.delenv("FASTDDPM_SHARD_SIZE")
    draws.clear()
    assert _run(_sharded_args(model_dir, tmp_path / "default.npz", shard_size=None)) == 0
    assert draws == [(0, 7)]  # default: 4 batches of 2 -> one shard of 8 holds all 7
    monkeypatch.setenv("FASTDDPM_SHARD_SIZE", "zero")
    with pytest.raises(ValueError, match="FASTDDPM_SHARD_SIZE"):
        _run(_sharded_args(model_dir, tmp_path / "bad.npz", shard_size=None))


def test_png_output_is_the_grid_of_the_samples(tmp_path, baseline, model_dir):
    from PIL import Image

    from fastddpm.images import make_grid

    out = tmp_path / "grid.png"
    model, schedule, _ = load_model(str(model_dir), "cpu")
    res = sample_sharded(model, schedule, out, 7, shard_size=2, batch_size=2, num_inference_steps=STEPS,
                         device="cpu", progress=False)  # fmt: skip
    assert res.path == out and res.reused == 0 and res.generated == [0, 1, 2, 3]
    grid = np.asarray(Image.open(out))
    _assert_same_bytes(grid, make_grid(_npz(baseline))[..., 0])
