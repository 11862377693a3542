"""Progressive distillation: the two-step target, a toy round with the exact denoiser, checkpoints and exact
resume, two gloo ranks, bad inputs and the ``distill`` command (CPU, tiny models)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_training import assert_same_state, random_images, tiny_config
from torch import nn

import fastddpm
from fastddpm import Schedule, UNet, ddim_step, q_sample, sample
from fastddpm.cli.distill import add_parser, run
from fastddpm.distill_math import (
    distillation_target,
    predicted_x0,
    round_timesteps,
    student_grid,
    student_schedule,
    target_from_two_steps,
    truncated_snr_weight,
)
from fastddpm.distillation import DISTILL_LOG_NAME, DISTILL_STATE_NAME, SAMPLING_NAME, distill, round_dir_name
from fastddpm.quality.metrics import sliced_wasserstein
from fastddpm.quality.toy import TOY_SHAPE, ExactMixtureDenoiser, RingMixture, _time_features
from fastddpm.registry import load_model, recommended_steps
from fastddpm.training import training_target

pytestmark = pytest.mark.filterwarnings("ignore:fastddpm. using the slow reference backend")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; on a loaded 2-core machine two threads made these tests 5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RandomTeacher(nn.Module):
    """A fixed smooth random function ``(x, t) -> output`` in float64: a stand-in teacher for the math tests."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(channels, channels, dtype=torch.float64) / channels**0.5)
        self.freq = nn.Parameter(torch.rand(channels, dtype=torch.float64) * 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = (t.to(x.dtype) / 1000).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.tanh(torch.einsum("dc,bc...->bd...", self.mix, x)) * torch.cos(self.freq.reshape(-1, 1, 1) * tt)


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(tiny_config())


# ----------------------------------------------------------------------------- the math
@pytest.mark.parametrize(
    "teacher_kw",
    [
        dict(),  # epsilon, clip_sample=True: the digits teacher's settings
        dict(prediction_type="v_prediction", clip_sample=False),
        dict(prediction_type="sample", set_alpha_to_one=False, beta_schedule="squaredcos_cap_v2"),
        dict(num_train_timesteps=997, thresholding=True),  # a grid that does not divide T
    ],
)
@pytest.mark.parametrize("student_steps", [1, 3, 8])
def test_target_makes_one_student_step_equal_two_teacher_steps(teacher_kw, student_steps):
    sched = Schedule(**teacher_kw)
    teacher = RandomTeacher(3)
    b = 11
    x_t = torch.randn(b, 3, 5, 7, dtype=torch.float64) * 1.3
    rows = round_timesteps(sched, student_steps)[torch.randint(0, student_steps, (b,))]
    t, t_mid, t_end = rows.unbind(1)
    # Reference: two teacher DDIM (eta 0) steps, float64 on the reference backend.
    with torch.no_grad():
        m1, _ = ddim_step(teacher(x_t, t), t, x_t, sched, prev_t=t_mid, backend="reference")
        want_end, _ = ddim_step(teacher(m1, t_mid), t_mid, m1, sched, prev_t=t_end, backend="reference")

    target, x_end = distillation_target(teacher, sched, x_t, t, t_mid, t_end, backend="reference")
    assert target.dtype == torch.float64 and target.shape == x_t.shape
    torch.testing.assert_close(x_end, want_end, rtol=0, atol=0)
    # One student DDIM step t -> t'' that predicts x0 = target lands on the teacher's x_t''.
    x0_student = student_schedule(sched, "sample")
    got_end, _ = ddim_step(target, t, x_t, x0_student, prev_t=t_end, backend="reference")
    torch.testing.assert_close(got_end, want_end, rtol=1e-9, atol=1e-9)
    # The same through the student's v parametrisation: the v meaning ``target`` gives the same step.
    v_student = student_schedule(sched, "v_prediction")
    abar = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = (abar.sqrt() * x_t - target) / (1 - abar).sqrt()
    torch.testing.assert_close(predicted_x0(v, x_t, t, v_student), target, rtol=1e-9, atol=1e-9)
    got_v, _ = ddim_step(v, t, x_t, v_student, prev_t=t_end, backend="reference")
    torch.testing.assert_close(got_v, want_end, rtol=1e-8, atol=1e-8)


def test_grids_nest_and_start_at_the_last_timestep():
    sched = Schedule()
    for n in (1, 2, 3, 5, 8, 64, 128, 256, 500):
        rows = round_timesteps(sched, n)
        assert rows.shape == (n, 3)
        assert int(rows[0, 0]) == 999 and int(rows[-1, 2]) == -1
        assert bool((rows[:, 0] > rows[:, 1]).all()) and bool((rows[:, 1] > rows[:, 2]).all())
        assert torch.equal(rows[1:, 0], rows[:-1, 2])  # the student's steps chain
        if 1000 % n == 0:  # then diffusers' DDIM rule prev_t = t - T // n is the same grid
            ddim = sched.timesteps(n, "trailing", sampler="ddim")
            assert torch.equal(ddim, student_grid(sched, n))


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_predicted_x0_inverts_the_training_target(kind):
    sched = Schedule(prediction_type=kind)
    x0 = torch.rand(9, 2, 3, 5, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (9,))
    x_t = q_sample(x0, t, sched, noise=eps, backend="reference")
    out = training_target(x0, eps, t, sched).to(torch.float64)
    # training_target is float32: epsilon -> x0 divides its rounding by sqrt(abar_t) (>= 0.006)
    torch.testing.assert_close(predicted_x0(out, x_t, t, sched), x0, rtol=1e-4, atol=1e-4)


def test_target_formula_and_weight_against_float64_closed_form():
    sched = Schedule(set_alpha_to_one=False)
    x_t, x_end = torch.randn(2, 6, 4, 1, 3, dtype=torch.float64)
    t = torch.tensor([999, 600, 250, 20, 7, 3])
    t_end = torch.tensor([500, 100, -1, 10, 2, -1])
    ac = sched.alphas_cumprod
    a_end = torch.where(t_end >= 0, ac[t_end.clamp(min=0)], ac[0])  # set_alpha_to_one=False: abar_0 at the end
    r = ((1 - a_end) / (1 - ac[t])).sqrt().reshape(-1, 1, 1, 1)
    want = (x_end - r * x_t) / (a_end.sqrt().reshape(-1, 1, 1, 1) - r * ac[t].sqrt().reshape(-1, 1, 1, 1))
    torch.testing.assert_close(target_from_two_steps(x_t, x_end, t, t_end, sched), want, rtol=1e-12, atol=1e-12)
    snr = ac[t] / (1 - ac[t])
    torch.testing.assert_close(truncated_snr_weight(sched, t), snr.clamp(min=1).float())


# ----------------------------------------------------------------------------- the toy: exact teacher
class ToyStudent(nn.Module):
    """A small MLP ``(x [B, 2, 1, 1], t [B]) -> [B, 2, 1, 1]`` (read as v by the student schedule)."""

    def __init__(self, width: int = 64, time_dim: int = 16) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(2 + time_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t).reshape(-1).expand(b).long()
        h = torch.cat([x.reshape(b, 2).float(), _time_features(t, self.time_dim, 1000)], dim=1)
        return self.net(h).reshape(x.shape)


def test_toy_one_round_makes_a_one_step_student_that_beats_the_teachers_one_step():
    mixture, sched = RingMixture(), Schedule()
    teacher = ExactMixtureDenoiser(mixture, sched)
    data = mixture.sample(2048, seed=3).reshape(-1, *TOY_SHAPE)
    torch.manual_seed(1)
    result = distill(teacher, sched, data, from_steps=2, to_steps=1, steps_per_round=300, student=ToyStudent(),
                     batch_size=128, lr=3e-3, warmup=10, ema_decay=0.99, progress=False, log_every=50)  # fmt: skip
    assert result.finished and result.steps == 1 and [r.student_steps for r in result.rounds] == [1]
    assert result.schedule.prediction_type == "v_prediction" and not result.schedule.clip_sample

    truth = mixture.sample(3000, seed=9)

    def scores(model, schedule, steps):
        x = sample(model, schedule, 3000, num_inference_steps=steps, sampler="ddim", timestep_spacing="trailing",
                   shape=TOY_SHAPE, seed=5, progress=False).reshape(-1, 2)  # fmt: skip
        return sliced_wasserstein(x, truth), float(mixture.log_prob(x).mean())

    swd_t1, logp_t1 = scores(teacher, sched, 1)
    swd_t2, logp_t2 = scores(teacher, sched, 2)
    swd_s1, logp_s1 = scores(result.model, result.schedule, 1)
    assert swd_s1 < swd_t1 and logp_s1 > logp_t1, (swd_s1, swd_t1, logp_s1, logp_t1)
    # It learned the teacher's two steps: its one step lands where they do (their gap to one step is ~0.08).
    assert abs(swd_s1 - swd_t2) < 0.02 * swd_t1, (swd_s1, swd_t2)


# ----------------------------------------------------------------------------- checkpoints and resume
KW = dict(steps_per_round=3, batch_size=4, lr=1e-3, warmup=2, ema_decay=0.9, seed=5, progress=False, log_every=2)


def test_checkpoint_and_resume_equals_uninterrupted(tmp_path):
    data = random_images(11, seed=7)  # 11 examples, batch 4: batches span epochs
    teacher, sched = tiny_unet(0), Schedule()
    whole = distill(teacher, sched, data, from_steps=4, to_steps=1, out_dir=tmp_path / "whole", **KW)
    assert whole.finished and whole.step == 6 and [r.student_steps for r in whole.rounds] == [2, 1]

    split = tmp_path / "split"
    a = distill(teacher, sched, data, from_steps=4, to_steps=1, out_dir=split, save_every=1, stop_after=2, **KW)
    assert not a.finished and a.step == 2 and a.rounds == []
    b = distill(teacher, sched, data, from_steps=4, to_steps=1, out_dir=split, resume=True, stop_after=2, **KW)
    assert b.start_step == 2 and b.step == 4 and [r.student_steps for r in b.rounds] == [2]  # crosses a round
    c = distill(teacher, sched, data, from_steps=4, to_steps=1, out_dir=split, resume=True, **KW)
    assert c.finished and c.start_step == 4 and c.step == 6
    assert a.losses + b.losses + c.losses == pytest.approx(whole.losses, rel=1e-6, abs=1e-7)
    assert_same_state(c.model, whole.model, rtol=1e-6, atol=1e-7)
    # A stop flushes its partial loss window (step 4); every step is logged once.
    for tree, steps in (("whole", [2, 3, 5, 6]), ("split", [2, 3, 4, 6])):
        log = [json.loads(line) for line in (tmp_path / tree / DISTILL_LOG_NAME).read_text().splitlines()]
        assert [r["step"] for r in log] == steps
    with pytest.warns(UserWarning, match="nothing to do"):
        distill(teacher, sched, data, from_steps=4, to_steps=1, out_dir=split, resume=True, **KW)
    # Each round's student is a normal checkpoint that says how to sample it.
    for k, n in ((1, 2), (2, 1)):
        d = split / round_dir_name(k, n)
        model, schedule, _ = load_model(str(d))
        assert schedule == student_schedule(sched, "v_prediction")
        assert recommended_steps(str(d)) == n
        cfg = json.loads((d / SAMPLING_NAME).read_text())
        assert (cfg["sampler"], cfg["eta"], cfg["timestep_spacing"], cfg["num_inference_steps"]) == (
            "ddim",
            0.0,
            "trailing",
            n,
        )
    assert_same_state(model, whole.model, rtol=0, atol=0)
    # to_steps may be lowered later to add rounds; a changed seed is refused.
    with pytest.raises(ValueError, match="seed"):
        distill(teacher, sched, data, from_steps=4, to_steps=1, out_dir=split, resume=True, **{**KW, "seed": 6})
    with pytest.raises(ValueError, match="weights differ"):
        distill(tiny_unet(1), sched, data, from_steps=4, to_steps=1, out_dir=split, resume=True, **KW)


# ----------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_KW = dict(steps_per_round=2, batch_size=6, lr=1e-3, warmup=1, ema_decay=0.9, seed=11, progress=False, log_every=1)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, result_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", message="fastddpm: using the slow reference backend")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        data = random_images(9, seed=21)  # 9 examples, global batch 6: batches span epochs
        first = distill(
            tiny_unet(0), Schedule(), data, from_steps=4, to_steps=1, out_dir=out_dir, stop_after=3, **DDP_KW
        )
        second = distill(
            tiny_unet(0), Schedule(), data, from_steps=4, to_steps=1, out_dir=out_dir, resume=True, **DDP_KW
        )
        torch.save({"ema": second.model.state_dict(), "losses": first.losses + second.losses},
                   os.path.join(result_dir, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_ranks_match_one_process_and_resume(tmp_path):
    out_dir, result_dir = tmp_path / "ddp", tmp_path / "results"
    result_dir.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out_dir), str(result_dir)), nprocs=2, join=True)
    ref = distill(tiny_unet(0), Schedule(), random_images(9, seed=21), from_steps=4, to_steps=1, **DDP_KW)
    for r in range(2):
        got = torch.load(result_dir / f"rank{r}.pt", weights_only=True)
        assert got["losses"] == pytest.approx(ref.losses, rel=1e-5, abs=1e-6)
        # DDP averages gradients in another order than one process sums them: float noise. Adam divides by
        # the gradient's own scale, so where a gradient is ~0 that noise can flip an update's sign; such an
        # element may move by up to 2*lr per optimizer step. Bound: nearly every element within float noise,
        # none beyond 2*lr*steps (3 rounds of 2 steps here).
        steps = 3 * DDP_KW["steps_per_round"]
        n_loose = n_all = 0
        for k, want in ref.model.state_dict().items():
            have = got["ema"][k]
            diff = (have - want).abs()
            assert float(diff.max()) <= 2 * DDP_KW["lr"] * steps, k
            n_loose += int((diff > 1e-5 + 1e-4 * want.abs()).sum())
            n_all += want.numel()
        assert n_loose <= max(8, n_all // 1000), f"{n_loose} of {n_all} weights beyond float noise"
    saved = UNet.from_pretrained(out_dir / round_dir_name(2, 1)).state_dict()
    got0 = torch.load(result_dir / "rank0.pt", weights_only=True)["ema"]
    assert all(torch.equal(saved[k], v) for k, v in got0.items())


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_get_clear_errors(tmp_path):
    data, sched = random_images(6), Schedule()
    kw = dict(steps_per_round=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="learned variance"):
        distill(tiny_unet(), Schedule(variance_type="learned_range"), data, from_steps=4, to_steps=2, **kw)
    learned = UNet(dataclasses.replace(tiny_config(), out_channels=2))
    with pytest.raises(ValueError, match="out_channels"):
        distill(learned, sched, data, from_steps=4, to_steps=2, **kw)
    with pytest.raises(ValueError, match=r"from_steps / 2\*\*k.*possible to_steps: 6, 3"):
        distill(tiny_unet(), sched, data, from_steps=12, to_steps=4, **kw)
    with pytest.raises(ValueError, match="to_steps must be smaller"):
        distill(tiny_unet(), sched, data, from_steps=4, to_steps=4, **kw)
    with pytest.raises(ValueError, match="from_steps must be in"):
        distill(tiny_unet(), sched, data, from_steps=2048, to_steps=1, **kw)
    with pytest.raises(ValueError, match="to_steps must be an int"):
        distill(tiny_unet(), sched, data, from_steps=4, to_steps=0, **kw)
    with pytest.raises(ValueError, match="unknown dataset"):
        distill(tiny_unet(), sched, str(tmp_path / "no-such-folder"), from_steps=4, to_steps=2, **kw)
    with pytest.raises(ValueError, match="channels"):
        distill(tiny_unet(), sched, random_images(4, c=3), from_steps=4, to_steps=2, **kw)
    with pytest.raises(ValueError, match="schedule is required"):
        distill(tiny_unet(), None, data, from_steps=4, to_steps=2, **kw)
    with pytest.raises(ValueError, match="pass student="):
        distill(ExactMixtureDenoiser(RingMixture(), sched), sched, data, from_steps=4, to_steps=2, **kw)
    with pytest.raises(ValueError, match="unknown model"):
        distill("no-such-model", None, data, from_steps=4, to_steps=2, **kw)
    with pytest.raises(ValueError, match="prediction_type"):
        distill(tiny_unet(), sched, data, from_steps=4, to_steps=2, prediction_type="x0", **kw)
    with pytest.raises(FileNotFoundError, match=DISTILL_STATE_NAME):
        distill(tiny_unet(), sched, data, from_steps=4, to_steps=2, out_dir=tmp_path, resume=True, **kw)
    distill(tiny_unet(), sched, data, from_steps=4, to_steps=2, out_dir=tmp_path, **kw)
    with pytest.raises(FileExistsError, match="resume"):
        distill(tiny_unet(), sched, data, from_steps=4, to_steps=2, out_dir=tmp_path, **kw)


def test_a_student_grid_that_does_not_divide_T_is_flagged(tmp_path):
    with pytest.warns(UserWarning, match="3 does not divide T = 1000"):
        distill(tiny_unet(), Schedule(), random_images(4), from_steps=6, to_steps=3, steps_per_round=1, batch_size=2,
                progress=False, out_dir=tmp_path)  # fmt: skip
    cfg = json.loads((tmp_path / round_dir_name(1, 3) / SAMPLING_NAME).read_text())
    assert cfg["prev_timestep"] == "next_grid_point" and "does NOT divide" in cfg["note"]


def test_public_name_is_the_function():
    import fastddpm.distillation  # noqa: F401  (importing the module must not shadow the function)

    assert fastddpm.distill is distill


# ----------------------------------------------------------------------------- the command
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastddpm")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_distill_and_resume(tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    tiny_unet(3).save_pretrained(teacher_dir)
    (teacher_dir / "scheduler_config.json").write_text(json.dumps(Schedule().to_dict()))
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(teacher_dir), "--data", "digits", "--from-steps", "4", "--to-steps", "1",
            "--steps-per-round", "2", "--batch-size", "4", "--out", str(out), "--no-progress", "--log-every", "1"]  # fmt: skip
    assert run(_parse([*argv, "--stop-after", "3"])) == 0
    assert "stopped early" in capsys.readouterr().out
    assert run(_parse(argv)) == 2  # the state exists: --resume is needed
    assert "--resume" in capsys.readouterr().err
    assert run(_parse([*argv, "--resume"])) == 0
    printed = capsys.readouterr().out
    assert "round 2: 2 -> 1 steps" in printed and "--steps 1" in printed
    assert (out / round_dir_name(2, 1) / "model.safetensors").is_file()
    for bad, match in (
        (["--to-steps", "3"], "2\\*\\*k"),
        (["--teacher", str(tmp_path / "nope")], "nope' does not exist"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            run(_parse([*argv, "--out", str(tmp_path / "other"), *bad]))
    with pytest.raises(SystemExit):
        _parse(["distill", "--from-steps", "4"])  # --to-steps and --steps-per-round are required


# ----------------------------------------------------------------------------- the bundled students
@pytest.mark.parametrize("name, steps", [("digits-4step", 4), ("digits-1step", 1)])
def test_bundled_students_sample_offline_with_no_other_flag(name, steps, tmp_path, capsys):
    """``fastddpm sample --model digits-1step`` uses the student's sampling.json (DDIM, eta 0, trailing)."""
    from fastddpm.cli import main

    out = tmp_path / "s.npz"
    assert main(["sample", "--model", name, "--num-samples", "8", "--out", str(out), "--quiet"]) == 0
    assert f"ddim, {steps} steps" in capsys.readouterr().out
    images = np.load(out)["arr_0"]
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8


def test_one_step_student_beats_the_teachers_one_shot_x0():
    """What distillation buys: one model evaluation of the student against one of its teacher."""
    from fastddpm.quality.classifier import DigitsScorer
    from fastddpm.registry import load_model

    scorer = DigitsScorer()
    teacher, t_sched, _ = load_model("digits", "cpu")
    student, s_sched, _ = load_model("digits-1step", "cpu")
    kw = dict(seed=3, progress=False, dtype="float32")
    one_shot = scorer.score(fastddpm.sample(teacher, t_sched, 128, sampler="x0", **kw))
    distilled = scorer.score(
        fastddpm.sample(student, s_sched, 128, sampler="ddim", num_inference_steps=1, timestep_spacing="trailing", **kw)
    )
    assert distilled.fd < one_shot.fd / 3 and distilled.coverage > one_shot.coverage
