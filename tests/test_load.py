"""``fastddpm.load`` / ``UNet.from_pretrained`` by name: bundled models, checkpoint dirs of both kinds,
Hugging Face Hub ids from the local cache (never a download), and the errors of each."""

from __future__ import annotations

import json
import socket
import sys
import types

import pytest
import torch

import fastddpm
from fastddpm import Schedule, UNet
from fastddpm.registry import load_model, recommended_steps
from fastddpm.unet.locate import BUNDLED_DIR, is_hub_id

TINY = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
)
# Not the defaults, so a test can tell that the file was read.
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.015, "clip_sample": False, "num_train_timesteps": 500}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test (socket level, and the Hub client's own calls)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    hub = sys.modules.get("huggingface_hub")
    if hub is not None:
        import huggingface_hub.file_download as fd
        import huggingface_hub.hf_api as api

        for obj, name in ((api.HfApi, "repo_info"), (api.HfApi, "model_info"), (fd, "get_hf_file_metadata")):
            monkeypatch.setattr(obj, name, refuse, raising=False)


def _tiny_model() -> UNet:
    model = UNet(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the init values
    return model.eval()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # the same stored numbers read back: exact
        assert torch.equal(sa[k].float(), sb[k].float()), k


def _write_scheduler(path, config=SCHEDULER):
    path.mkdir(parents=True, exist_ok=True)
    (path / "scheduler_config.json").write_text(json.dumps(config))


def test_bundled_name():
    model, schedule = fastddpm.load("digits")
    assert isinstance(model, UNet) and not model.training and isinstance(schedule, Schedule)
    direct = UNet.from_pretrained(BUNDLED_DIR / "digits")
    _assert_same_weights(model, direct)
    _assert_same_weights(UNet.from_pretrained("digits"), direct)
    assert schedule == Schedule.from_diffusers(BUNDLED_DIR / "digits" / "scheduler_config.json")
    sampling = json.loads((BUNDLED_DIR / "digits" / "sampling.json").read_text())
    assert recommended_steps("digits") == sampling["num_inference_steps"]
    _, _, desc = load_model("digits")
    assert "fastddpm checkpoint" in desc


def test_fastddpm_checkpoint_dir(tmp_path):
    model = _tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    _write_scheduler(tmp_path / "ckpt")
    loaded, schedule = fastddpm.load(str(tmp_path / "ckpt"), dtype=torch.float64)
    _assert_same_weights(loaded, model)
    assert next(loaded.parameters()).dtype == torch.float64
    assert schedule == Schedule.from_diffusers(SCHEDULER)
    assert schedule.num_train_timesteps == 500 and schedule.clip_sample is False
    model.save_pretrained(tmp_path / "bare")
    with pytest.warns(UserWarning, match="no scheduler_config.json"):
        _, schedule = fastddpm.load(tmp_path / "bare")
    assert schedule == Schedule()


def test_diffusers_model_and_pipeline_dirs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    reference = _tiny_model()
    dmodel = reference.to_diffusers()
    dsched = diffusers.DDPMScheduler.from_config(SCHEDULER)
    dmodel.save_pretrained(tmp_path / "model")
    dsched.save_pretrained(tmp_path / "model")  # scheduler_config.json next to config.json (Hub model layout)
    diffusers.DDPMPipeline(unet=dmodel, scheduler=dsched).save_pretrained(tmp_path / "pipe")
    for where in ("model", "pipe"):
        model, schedule = fastddpm.load(tmp_path / where)
        _assert_same_weights(model, reference)
        assert schedule == Schedule.from_diffusers(dsched.config)
        _assert_same_weights(UNet.from_pretrained(tmp_path / where), reference)
    assert "diffusers checkpoint" in load_model(tmp_path / "pipe")[2]


def _fake_hub_cache(root, repo_id: str, files: dict[str, str | bytes]) -> None:
    """The Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    model = _tiny_model()
    ckpt = model.save_pretrained(tmp_path / "src")
    files = {
        "config.json": (ckpt / "config.json").read_text(),
        "model.safetensors": (ckpt / "model.safetensors").read_bytes(),
        "scheduler_config.json": json.dumps(SCHEDULER),
    }
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/tiny-ddpm", files)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    loaded, schedule = fastddpm.load("someone/tiny-ddpm")
    _assert_same_weights(loaded, model)
    assert schedule == Schedule.from_diffusers(SCHEDULER)
    _assert_same_weights(UNet.from_pretrained("someone/tiny-ddpm"), model)

    with pytest.raises(FileNotFoundError, match=r"'someone/not-cached'.*local cache.*HF_HUB_OFFLINE") as e:
        fastddpm.load("someone/not-cached")
    assert str(cache) in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'someone/not-cached'.*HF_HUB_OFFLINE=1 here"):
        fastddpm.load("someone/not-cached")


def test_hub_lookup_through_a_stand_in_module(tmp_path, monkeypatch):
    """The contract with huggingface_hub, whether or not it is installed: one snapshot_download call with
    local_files_only=True; its failure becomes our error; its absence is said plainly."""
    _tiny_model().save_pretrained(tmp_path / "snap")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id != "owner/cached":
            raise FileNotFoundError("not in cache")  # stands in for LocalEntryNotFoundError
        return str(tmp_path / "snap")

    fake = types.ModuleType("huggingface_hub")
    fake.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    fastddpm.load("owner/cached")
    assert calls == [("owner/cached", {"local_files_only": True})]
    with pytest.raises(FileNotFoundError, match=r"'owner/other'.*HF_HUB_OFFLINE"):
        fastddpm.load("owner/other")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails: not installed
    with pytest.raises(FileNotFoundError, match=r"'owner/cached'.*huggingface_hub is not installed"):
        fastddpm.load("owner/cached")


def test_what_a_hub_id_looks_like():
    assert is_hub_id("google/ddpm-cifar10-32") and is_hub_id("a/b.c_d")
    for name in ("digits", "a/b/c", "/abs/path", "./x/y", "a/..", "a/", "/b", "a b/c"):
        assert not is_hub_id(name), name


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastddpm.load(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastddpm.load(tmp_path / "owner" / "name")  # a Path is always a path, never a Hub id
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"no config.json in .*empty.*fastddpm checkpoint.*diffusers"):
        fastddpm.load(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"unknown model 'digit'.*Did you mean 'digits'"):
        fastddpm.load("digit")
    with pytest.raises(ValueError, match="is a file"):
        fastddpm.load(tmp_path / "empty" / "notes.txt")
    with pytest.raises(TypeError, match="name or a path"):
        fastddpm.load(3)

    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"listed/config.json.*expected a JSON object, got list"):
        fastddpm.load(listed)
    with pytest.raises(ValueError, match=r"expected a JSON object, got list"):
        UNet.from_pretrained(listed)

    ckpt = _tiny_model().save_pretrained(tmp_path / "ckpt")
    (ckpt / "scheduler_config.json").write_text('["DDPMScheduler"]')
    with pytest.raises(ValueError, match=r"scheduler_config.json.*expected a JSON object, got list"):
        fastddpm.load(ckpt)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        fastddpm.load(other)
    with pytest.raises(ValueError, match="variant"):
        fastddpm.load("digits", variant="fp16")
