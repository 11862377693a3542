"""fastddpm.sample: diffusers drop-in (generator mode), seed-mode invariances, samplers, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

try:
    import diffusers
except ImportError:  # a GPU machine without it: the tests that need it skip (their fixture importorskips)
    diffusers = None

import fastddpm
from fastddpm import Schedule
from fastddpm.dispatch import availability
from fastddpm.graphs import EagerRunner, replay_schedule
from fastddpm.sampling import NonFiniteSampleError, Trajectory, make_plan


def _tiny_diffusers_unet(out_channels: int = 1):
    pytest.importorskip("diffusers")  # the GPU machine may lack it: skip, never a collection error
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def unet():
    return _tiny_diffusers_unet()


def _fused_or_skip(name: str) -> str:
    ok, why = availability(name, "cpu")
    if not ok:
        pytest.skip(f"{name}: {why}")
    return name


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_generator_mode_equals_ddpm_pipeline(unet, variance_type):
    sch = diffusers.DDPMScheduler(num_train_timesteps=200, variance_type=variance_type)
    pipe = diffusers.DDPMPipeline(unet, sch)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(3, generator=torch.Generator().manual_seed(1), output_type="np", num_inference_steps=20).images
    ours = fastddpm.sample(
        unet, Schedule.from_diffusers(sch), 3, num_inference_steps=20, generator=torch.Generator().manual_seed(1),
        progress=False,
    )  # fmt: skip
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ref - ours).max() < 1e-4


def test_generator_mode_equals_ddim_pipeline(unet):
    sch = diffusers.DDIMScheduler(num_train_timesteps=200)
    pipe = diffusers.DDIMPipeline(unet, sch)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(2, generator=torch.Generator().manual_seed(4), eta=0.5, num_inference_steps=10, output_type="np").images
    ours = fastddpm.sample(
        unet, Schedule.from_diffusers(sch), 2, sampler="ddim", eta=0.5, num_inference_steps=10,
        generator=torch.Generator().manual_seed(4), progress=False,
    )  # fmt: skip
    assert np.abs(ref - (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max() < 1e-4


def test_seed_mode_independent_of_batch_size(unet):
    schedule = Schedule(num_train_timesteps=100)
    kw = dict(num_inference_steps=6, seed=5, progress=False)
    a = fastddpm.sample(unet, schedule, 16, batch_size=8, **kw)
    b = fastddpm.sample(unet, schedule, 16, batch_size=16, **kw)
    c = fastddpm.sample(unet, schedule, 16, batch_size=5, **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    assert a.shape == (16, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    d = fastddpm.sample(unet, schedule, 16, batch_size=8, num_inference_steps=6, seed=6, progress=False)
    assert (a - d).abs().max() > 0.1


def test_seed_mode_same_images_on_every_backend(unet):
    schedule = Schedule(num_train_timesteps=100)
    kw = dict(num_inference_steps=4, seed=9, progress=False, batch_size=3)
    ref = fastddpm.sample(unet, schedule, 3, backend="reference", **kw)
    for name in ("cpu", "triton"):
        if not availability(name, "cpu")[0]:
            continue
        out = fastddpm.sample(unet, schedule, 3, backend=name, **kw)
        # Same U-Net and batches; noise and step are bitwise identical on every backend: the same bits.
        assert torch.equal(out, ref), name


def test_ddim_eta0_is_deterministic_and_seed_only_sets_x_T(unet):
    schedule = Schedule(num_train_timesteps=100)
    kw = dict(sampler="ddim", num_inference_steps=5, progress=False)
    a = fastddpm.sample(unet, schedule, 4, seed=1, **kw)
    b = fastddpm.sample(unet, schedule, 4, seed=1, **kw)
    assert torch.equal(a, b)
    # eta = 0 uses no step noise: the result is a function of x_T only
    xT = fastddpm.randn((4, 1, 8, 8), seed=1, t=100, stream=fastddpm.STREAM_INIT)
    x = xT.clone()
    for t, prev in schedule.timesteps(5, sampler="ddim").tolist():
        eps = unet(x, torch.full((4,), t)).sample
        x = fastddpm.ddim_step(eps, t, x, schedule, prev_t=prev, eta=0.0)[0]
    torch.testing.assert_close(a, x.clamp(-1, 1), atol=1e-5, rtol=0)


def test_ddpm_seed_mode_equals_a_loop_of_public_ops(unet):
    schedule = Schedule(num_train_timesteps=100, variance_type="fixed_large")
    out = fastddpm.sample(unet, schedule, 3, num_inference_steps=7, seed=2, progress=False)
    x = fastddpm.randn((3, 1, 8, 8), seed=2, t=100, stream=fastddpm.STREAM_INIT)
    for t, prev in schedule.timesteps(7).tolist():
        eps = unet(x, torch.full((3,), t)).sample
        x = fastddpm.ddpm_step(eps, t, x, schedule, prev_t=prev, seed=2)[0]
    torch.testing.assert_close(out, x.clamp(-1, 1), atol=1e-5, rtol=0)


def test_x0_sampler_is_the_single_step_prediction(unet):
    schedule = Schedule(num_train_timesteps=100)
    out = fastddpm.sample(unet, schedule, 2, sampler="x0", seed=3, progress=False)
    xT = fastddpm.randn((2, 1, 8, 8), seed=3, t=100, stream=fastddpm.STREAM_INIT)
    eps = unet(xT, torch.full((2,), 99)).sample
    a = schedule.alphas_cumprod[99]
    expected = ((xT.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()).clamp(-1, 1)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_plain_callable_model_and_shape():
    schedule = Schedule(num_train_timesteps=50)
    out = fastddpm.sample(lambda x, t: 0.1 * x, schedule, 2, shape=(3, 4, 5), num_inference_steps=5, progress=False)
    assert out.shape == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="shape=\\(C, H, W\\)"):
        fastddpm.sample(lambda x, t: x, schedule, 2, progress=False)


def test_model_output_shape_must_fit_schedule(unet):
    schedule = Schedule(num_train_timesteps=50, variance_type="learned_range")
    with pytest.raises(ValueError, match=r"expects \(2, 2, 8, 8\)"):
        fastddpm.sample(unet, schedule, 2, num_inference_steps=3, progress=False)
    learned = _tiny_diffusers_unet(out_channels=2)
    out = fastddpm.sample(learned, schedule, 2, num_inference_steps=3, progress=False)
    assert out.shape == (2, 1, 8, 8)


def test_non_finite_output_names_the_step():
    schedule = Schedule(num_train_timesteps=50, clip_sample=False)
    calls = {"n": 0}

    def model(x, t):
        calls["n"] += 1
        return x * float("nan") if calls["n"] == 3 else 0.1 * x

    with pytest.raises(NonFiniteSampleError, match="step 2 of 5") as info:
        fastddpm.sample(model, schedule, 2, shape=(1, 4, 4), num_inference_steps=5, progress=False)
    assert info.value.step == 2


def test_bf16_model_runs_with_fp32_step_math(unet):
    schedule = Schedule(num_train_timesteps=100)
    a = fastddpm.sample(unet, schedule, 2, num_inference_steps=4, seed=0, progress=False)
    b = fastddpm.sample(unet, schedule, 2, num_inference_steps=4, seed=0, progress=False, dtype=torch.bfloat16)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.1


def test_progress_bar_and_silence(unet, capsys):
    schedule = Schedule(num_train_timesteps=20)
    fastddpm.sample(unet, schedule, 2, num_inference_steps=3, progress=True)
    assert "sampling 2 images" in capsys.readouterr().err
    fastddpm.sample(unet, schedule, 2, num_inference_steps=3, progress=False)
    assert capsys.readouterr().err == ""


def test_bad_arguments(unet):
    schedule = Schedule(num_train_timesteps=20)
    with pytest.raises(ValueError, match="allowed: 'ddpm'"):
        fastddpm.sample(unet, schedule, 2, sampler="euler", progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        fastddpm.sample(unet, schedule, 0, progress=False)
    with pytest.raises(ValueError, match="CUDA device"):
        fastddpm.sample(unet, schedule, 2, cuda_graph=True, device="cpu", progress=False)
    with pytest.raises(ValueError, match="generator mode"):
        fastddpm.sample(unet, schedule, 4, batch_size=2, generator=torch.Generator(), progress=False)


def test_graph_bookkeeping_on_cpu(unet):
    assert replay_schedule(10, 4) == [4, 4, 1, 1]
    assert replay_schedule(3, 8) == [3]
    assert sum(replay_schedule(1000, 7)) == 1000
    # the step counter, RNG key and first-bad marker are device tensors advanced by the step itself
    schedule = Schedule(num_train_timesteps=30)
    plan = make_plan(schedule, "ddpm", 6, "leading", 0.0, torch.device("cpu"))
    traj = Trajectory(unet, schedule, plan, 2, (1, 8, 8), torch.device("cpu"), "reference", None)
    traj.reset(torch.randn(2, 1, 8, 8), seed=3, sample_offset=10)
    assert traj.rng.tolist() == [3, 10]
    EagerRunner(traj).run()
    assert int(traj.step) == plan.num_steps == 6
    assert int(traj.first_bad) == 6
    assert plan.coef.shape == (6, fastddpm._layout.NCOEF) and plan.tval.tolist() == [25, 20, 15, 10, 5, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("steps_per_graph", [1, 3])
def test_cuda_graph_and_eager_give_the_same_images(monkeypatch, steps_per_graph, channels_last):
    """The bundled (trained) digits U-Net, so the images are real digits, not saturated noise; 7 images
    in batches of 4 (a second runner for the remainder batch of 3); 7 steps (graphs of 3 + 1-step graphs).
    TF32 is off so the GPU run can be held to the float32 CPU reference."""
    from fastddpm.registry import load_model

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    unet, schedule, _ = load_model("digits", "cuda")
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    kw = dict(num_inference_steps=7, seed=1, progress=False, batch_size=4, device="cuda")
    eager = fastddpm.sample(unet, schedule, 7, cuda_graph=False, **kw)
    graphed = fastddpm.sample(unet, schedule, 7, cuda_graph=True, steps_per_graph=steps_per_graph, **kw)
    assert torch.equal(eager, graphed)
    assert 0.05 < float((eager.abs() < 0.99).double().mean())  # not all clamped at +-1
    ref = fastddpm.sample(unet.cpu(), schedule, 7, backend="reference", **{**kw, "device": "cpu"})
    torch.testing.assert_close(graphed.cpu(), ref, atol=1e-3, rtol=0)


def test_ddim_use_clipped_model_output_matches_the_op_loop(unet):
    schedule = Schedule(num_train_timesteps=100)
    out = fastddpm.sample(unet, schedule, 2, sampler="ddim", num_inference_steps=4, seed=5, progress=False,
                          use_clipped_model_output=True)  # fmt: skip
    x = fastddpm.randn((2, 1, 8, 8), seed=5, t=100, stream=fastddpm.STREAM_INIT)
    for t, prev in schedule.timesteps(4, sampler="ddim").tolist():
        eps = unet(x, torch.full((2,), t)).sample
        x = fastddpm.ddim_step(eps, t, x, schedule, prev_t=prev, use_clipped_model_output=True)[0]
    torch.testing.assert_close(out, x.clamp(-1, 1), atol=1e-5, rtol=0)
