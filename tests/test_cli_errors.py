"""``fastddpm sample`` / ``train`` / ``info`` as a new user meets them: each mistake is one clear line naming the
argument, found before any work, and a failed run leaves no folder behind (issue 10 item 5)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from fastddpm import registry, sampling, training
from fastddpm.cli import main
from fastddpm.registry import BUNDLED_DIR

SYS = Path("/sys")


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a command gets as far as loading a model (its checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: an argument check came too late")

    monkeypatch.setattr(registry, "load_model", refuse)


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """The bundled digits checkpoint copied, so its JSON files can be edited."""
    return Path(shutil.copytree(BUNDLED_DIR / "digits", tmp_path / "model"))


def _sample(*argv: str) -> list[str]:
    return ["sample", "--num-samples", "2", "--steps", "2", "--quiet", *argv]


# ------------------------------------------------------------------------------------- device
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["sample", "train"])
def test_cuda_device_without_cuda_is_one_line(tmp_path, capsys, no_work, command):
    out = tmp_path / "new" / ("x.png" if command == "sample" else "run")
    assert main([command, "--device", "cuda", "--out", str(out)]) == 2
    err = _err(capsys)
    assert err.count("\n") == 1 and "--device cuda: CUDA is not available" in err
    assert not (tmp_path / "new").exists()


def test_bad_device_string(tmp_path, capsys, no_work):
    assert main(_sample("--device", "gpu0", "--out", str(tmp_path / "x.png"))) == 2
    assert "--device 'gpu0' is not a device" in _err(capsys)


# ------------------------------------------------------------------------------------------ --out
@pytest.mark.parametrize("command", ["sample", "train"])
def test_out_under_a_file_fails_before_any_work(tmp_path, capsys, no_work, monkeypatch, command):
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "sub" / ("x.png" if command == "sample" else "run")
    assert main([command, "--device", "cpu", "--out", str(out)]) == 2
    assert f"--out: {blocker} is a file, not a folder" in _err(capsys)


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked
    if SYS.is_dir():
        return SYS  # root may write anywhere but in kernel filesystems such as sysfs
    pytest.skip("no folder here that this user cannot write")


@pytest.mark.parametrize("command", ["sample", "train"])
def test_out_in_an_unwritable_folder_fails_before_any_work(tmp_path, capsys, no_work, monkeypatch, command):
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started"))
    locked = _unwritable_folder(tmp_path)
    out = locked / ("x.png" if command == "sample" else f"fastddpm-run-{os.getpid()}")
    assert main([command, "--device", "cpu", "--out", str(out)]) == 2
    err = _err(capsys)
    assert "--out: cannot" in err and str(locked) in err
    assert not out.exists()


def test_out_that_is_a_folder(tmp_path, capsys, no_work):
    (tmp_path / "x.png").mkdir()
    assert main(_sample("--out", str(tmp_path / "x.png"))) == 2
    assert "is a folder" in _err(capsys)


def test_failed_run_removes_only_the_empty_folders_it_made(tmp_path, capsys):
    keep = tmp_path / "existing"
    keep.mkdir()
    out = keep / "new" / "deeper" / "x.png"
    assert main(_sample("--model", "no-such-model", "--out", str(out))) == 2
    assert "unknown model 'no-such-model'" in _err(capsys)
    assert keep.is_dir() and not (keep / "new").exists()


def test_interrupted_sample_writes_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "sample", interrupted)
    out = tmp_path / "new" / "x.png"
    assert main(_sample("--out", str(out))) == 130
    assert f"interrupted; {out} was not written" in _err(capsys)
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------- model files
@pytest.mark.parametrize("name", ["config.json", "scheduler_config.json"])
def test_json_list_in_a_model_file(model_copy, tmp_path, capsys, no_work, name):
    (model_copy / name).write_text(json.dumps([1, 2, 3]))
    assert main(_sample("--model", str(model_copy), "--out", str(tmp_path / "x.png"))) == 2
    err = _err(capsys)
    assert str(model_copy / name) in err and "holds a JSON list, expected an object" in err


def _scheduler(model_copy: Path, **changes) -> None:
    path = model_copy / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "LCMScheduler", "PNDMScheduler"])
def test_scheduler_of_another_family_is_refused(model_copy, tmp_path, capsys, no_work, cls):
    _scheduler(model_copy, _class_name=cls)
    assert main(_sample("--model", str(model_copy), "--out", str(tmp_path / "x.png"))) == 2
    err = _err(capsys)
    assert f"is a {cls} config" in err and "would not be honoured" in err


def test_mistyped_scheduler_key_is_refused(model_copy, tmp_path, capsys, no_work):
    _scheduler(model_copy, beta_shedule="squaredcos_cap_v2")
    assert main(_sample("--model", str(model_copy), "--out", str(tmp_path / "x.png"))) == 2
    assert "unknown key 'beta_shedule' (did you mean 'beta_schedule'?)" in _err(capsys)


def test_old_predict_epsilon_false_is_refused(model_copy, tmp_path, capsys, no_work):
    path = model_copy / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    del cfg["prediction_type"]
    path.write_text(json.dumps({**cfg, "predict_epsilon": False}))
    assert main(_sample("--model", str(model_copy), "--out", str(tmp_path / "x.png"))) == 2
    assert "prediction_type" in _err(capsys)


@pytest.mark.parametrize(
    ("cls", "own"),
    [("UniPCMultistepScheduler", {"solver_order": 2, "predict_x0": True}),
     ("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"})],
)  # fmt: skip
def test_multistep_scheduler_config_warns_that_the_sampler_is_as_asked(model_copy, tmp_path, capsys, cls, own):
    _scheduler(model_copy, _class_name=cls, **own)
    main(_sample("--model", str(model_copy), "--out", str(tmp_path / "x.png")))
    err = capsys.readouterr().err
    assert f"warning: {model_copy / 'scheduler_config.json'} is a {cls} config" in err
    # No --sampler given: the sampler is the model's own default (its sampling.json), named in the warning.
    default = json.loads((model_copy / "sampling.json").read_text()).get("sampler", "ddpm")
    assert f"--sampler {default} as asked" in err and "solver_order" in err


def test_unipc_config_samples(model_copy, tmp_path, capsys):
    _scheduler(model_copy, _class_name="UniPCMultistepScheduler", solver_order=2)
    assert main(_sample("--model", str(model_copy), "--out", str(tmp_path / "x.png"))) == 0
    assert (tmp_path / "x.png").is_file()


# --------------------------------------------------------------------------- sampler options
@pytest.mark.parametrize(
    ("argv", "flag", "match"),
    [
        (["--sampler", "ddpm", "--eta", "0.5"], "--eta", "has no effect with sampler 'ddpm'"),
        (["--eta", "0.5"], "--eta", "has no effect with sampler 'dpmpp_2m_sde'"),  # the bundled model's default
        (
            ["--sampler", "ddpm", "--use-clipped-model-output"],
            "--use-clipped-model-output",
            "has no effect with sampler 'ddpm'",
        ),
        (["--sampler", "x0", "--steps", "10"], "--steps", "one model evaluation"),
        (["--sampler", "x0", "--eta", "0.2"], "--eta", "has no effect with sampler 'x0'"),
        (["--seed", "-1"], "--seed", r"in [0, 2**64)"),
        (["--seed", str(2**64)], "--seed", r"in [0, 2**64)"),
        (["--spacing", "evenly"], "--spacing", "unknown timestep_spacing"),
        (["--backend", "gpu"], "--backend", "unknown backend"),
    ],
)
def test_options_the_sampler_would_ignore_are_refused(tmp_path, capsys, no_work, argv, flag, match):
    assert main(["sample", "--out", str(tmp_path / "new" / "x.png"), *argv]) == 2
    err = _err(capsys)
    assert f"error: {flag}: " in err and match in err
    assert not (tmp_path / "new").exists()


def test_x0_summary_is_one_evaluation_at_the_first_timestep(tmp_path, capsys):
    assert main(["sample", "--sampler", "x0", "--num-samples", "2", "--quiet", "--out", str(tmp_path / "x.png")]) == 0
    out = capsys.readouterr().out
    assert "x0, one model evaluation at t=999" in out and "steps" not in out.split("[")[1]


# ---------------------------------------------------------------------------------------- info
def test_info_reports_a_bogus_backend_override(monkeypatch, capsys):
    monkeypatch.setenv("FASTDDPM_BACKEND", "bogus")
    assert main(["info"]) == 1
    captured = capsys.readouterr()
    assert "FASTDDPM_BACKEND='bogus'" in captured.out
    assert "fastddpm info: error: FASTDDPM_BACKEND='bogus' is not a backend" in captured.err
    assert "would fail" in captured.err


def test_info_reports_the_backend_sampling_uses(monkeypatch, capsys):
    monkeypatch.setenv("FASTDDPM_BACKEND", "reference")
    assert main(["info"]) == 0
    assert "sampling backend: reference for cpu tensors (FASTDDPM_BACKEND='reference')" in capsys.readouterr().out
    monkeypatch.delenv("FASTDDPM_BACKEND")
    assert main(["info"]) == 0
    assert "(FASTDDPM_BACKEND unset); `fastddpm sample` can run" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ train SIGINT
def test_train_interrupt_says_what_was_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def interrupted_after_a_checkpoint(*args, out_dir, **kwargs):
        Path(out_dir, training.STATE_NAME).write_bytes(b"state")
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted_after_a_checkpoint)
    assert main(["train", "--device", "cpu", "--out", str(out), "--no-progress"]) == 130
    err = _err(capsys)
    assert "no partial output" not in err
    assert f"the checkpoint this run wrote last ({out / training.STATE_NAME}" in err and "--resume" in err

    def interrupted_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted_at_once)
    fresh = tmp_path / "fresh"
    assert main(["train", "--device", "cpu", "--out", str(fresh), "--no-progress"]) == 130
    assert "interrupted; no checkpoint was written" in _err(capsys)
    assert not fresh.exists()  # the empty folder it made is gone
    time.sleep(0.01)
    assert main(["train", "--device", "cpu", "--out", str(out), "--resume", "--no-progress"]) == 130
    assert "holds the checkpoint this run resumed from, unchanged" in _err(capsys)


@pytest.mark.parametrize(
    "argv, sampler, steps, spacing",
    [
        ([], "dpmpp_2m_sde", 15, "trailing"),  # the bundled model's sampling.json
        (["--sampler", "ddpm"], "ddpm", None, None),  # another sampler: the full chain, not the file's 15
        (["--sampler", "ddim", "--steps", "50"], "ddim", 50, None),
        (["--steps", "7"], "dpmpp_2m_sde", 7, "trailing"),
        (["--model", "digits-1step"], "ddim", 1, "trailing"),  # a student names its own sampler
        (["--sampler", "x0"], "x0", None, None),
    ],
)
def test_unset_flags_come_from_the_models_sampling_json(argv, sampler, steps, spacing):
    from fastddpm.cli import build_parser
    from fastddpm.cli.sample import apply_model_defaults

    args = build_parser().parse_args(["sample", *argv])
    got_steps = apply_model_defaults(args)
    assert (args.sampler, got_steps, args.spacing) == (sampler, steps, spacing)
