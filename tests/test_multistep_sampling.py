"""``fastddpm.sample`` with the multistep solvers (dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc) through the step driver.

* generator mode equals ``DDPMPipeline(unet, DPMSolverMultistepScheduler.from_config(...))`` to 1e-4;
* seed mode equals the plain float64 loop of ``fastddpm.solvers`` from the same x_T (and, for the SDE
  variant, the same counter-based noise), so the in-kernel noise is keyed as documented;
* seed mode gives the same images for any batch size and on every backend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import Schedule
from fastddpm import _layout as L
from fastddpm.dispatch import availability
from fastddpm.driver import MULTISTEP_SAMPLERS, make_plan
from fastddpm.noise import philox_normal
from fastddpm.sampling import SAMPLERS

solvers = pytest.importorskip("fastddpm.solvers")
try:
    import diffusers
except ImportError:  # a GPU machine without it: the tests that need it skip (their fixture importorskips)
    diffusers = None


@pytest.fixture(scope="module")
def unet():
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()  # fmt: skip


def _fused_or_skip(name: str) -> str:
    ok, why = availability(name, "cpu")
    if not ok:
        pytest.skip(f"{name}: {why}")
    return name


DPM_OPTIONS = {"dpmpp_2m": {}, "dpmpp_3m": {"solver_order": 3}, "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++"}}


def test_samplers_are_listed():
    assert set(MULTISTEP_SAMPLERS) <= set(SAMPLERS)
    assert SAMPLERS[:3] == ("ddpm", "ddim", "x0")


@pytest.mark.parametrize(
    ("sampler", "karras", "spacing"),
    [("dpmpp_2m", False, "leading"), ("dpmpp_2m", True, "linspace"), ("dpmpp_3m", False, "trailing"),
     ("dpmpp_3m", True, "leading"), ("dpmpp_2m_sde", False, "linspace"), ("dpmpp_2m_sde", True, "trailing")],
)  # fmt: skip
def test_generator_mode_equals_ddpm_pipeline_with_dpm_solver(unet, sampler, karras, spacing):
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=200)
    cls = diffusers.UniPCMultistepScheduler if sampler == "unipc" else diffusers.DPMSolverMultistepScheduler
    sch = cls.from_config(
        ddpm.config, use_karras_sigmas=karras, timestep_spacing=spacing, **DPM_OPTIONS.get(sampler, {})
    )
    pipe = diffusers.DDPMPipeline(unet, sch)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(2, generator=torch.Generator().manual_seed(1), output_type="np", num_inference_steps=6).images
    ours = fastddpm.sample(
        unet, Schedule.from_diffusers(ddpm), 2, sampler=sampler, num_inference_steps=6, timestep_spacing=spacing,
        use_karras_sigmas=karras, generator=torch.Generator().manual_seed(1), progress=False,
    )  # fmt: skip
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ref - ours).max() < 1e-4


@pytest.mark.parametrize(("sampler", "order"), [("dpmpp_2m", None), ("dpmpp_3m", None), ("dpmpp_2m_sde", None),
                                                ("unipc", 2), ("unipc", 3)])  # fmt: skip
def test_seed_mode_equals_the_float64_solver_loop(unet, sampler, order):
    schedule = Schedule(num_train_timesteps=100)
    n, steps, seed = 3, 5, 4
    out = fastddpm.sample(unet, schedule, n, sampler=sampler, num_inference_steps=steps, solver_order=order,
                          seed=seed, progress=False, backend=_fused_or_skip("cpu"))  # fmt: skip
    plan = solvers.multistep_plan(schedule, sampler, steps, solver_order=order, timestep_spacing="leading")
    x_T = fastddpm.randn((n, 1, 8, 8), seed=seed, t=100, stream=L.STREAM_INIT, backend="reference")

    def noise_fn(i, t):
        z = philox_normal(seed, torch.arange(n), torch.full((n,), t), 64, L.STREAM_SDE, dtype=torch.float64)
        return z.reshape(n, 1, 8, 8)

    with torch.inference_mode():
        want = solvers.multistep_sample_reference(
            lambda x, t: unet(x.float(), t).sample.double(), schedule, x_T, plan, noise_fn, dtype=torch.float64
        )
    torch.testing.assert_close(out.double(), want.clamp(-1, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "unipc"])
def test_seed_mode_same_images_for_any_batch_size_and_backend(unet, sampler):
    schedule = Schedule(num_train_timesteps=100)
    kw = dict(sampler=sampler, num_inference_steps=4, seed=9, progress=False)
    a = fastddpm.sample(unet, schedule, 5, batch_size=5, **kw)
    b = fastddpm.sample(unet, schedule, 5, batch_size=2, **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # the U-Net's own batch dependence only
    for name in ("reference", "triton"):
        if name == "triton" and not availability(name, "cpu")[0]:
            continue
        # Same batches: every backend's noise and step are bitwise identical, so are the images.
        assert torch.equal(fastddpm.sample(unet, schedule, 5, batch_size=5, backend=name, **kw), a), name
        other = fastddpm.sample(unet, schedule, 5, batch_size=3, backend=name, **kw)
        torch.testing.assert_close(other, a, atol=1e-5, rtol=0)  # other batches: the U-Net's batch dependence
    assert (a - fastddpm.sample(unet, schedule, 5, **dict(kw, seed=10))).abs().max() > 0.1


def test_thresholding_runs_the_two_pass_step(unet):
    """Dynamic thresholding (the x0-only pass, the quantile, the fused pass) equals the solver spec."""
    schedule = Schedule(num_train_timesteps=100, thresholding=True, sample_max_value=1.0)
    out = fastddpm.sample(unet, schedule, 2, sampler="dpmpp_2m", num_inference_steps=4, seed=1, progress=False)
    plan = solvers.multistep_plan(schedule, "dpmpp_2m", 4, timestep_spacing="leading")
    assert plan.clip_mode == L.CLIP_THRESHOLD
    x_T = fastddpm.randn((2, 1, 8, 8), seed=1, t=100, stream=L.STREAM_INIT, backend="reference")
    with torch.inference_mode():
        want = solvers.multistep_sample_reference(lambda x, t: unet(x.float(), t).sample.double(), schedule, x_T,
                                                  plan, dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(out.double(), want.clamp(-1, 1), atol=1e-4, rtol=0)


class _TinyModel(torch.nn.Module):
    """A conv net with a timestep embedding: enough to make every step depend on x and t (no diffusers)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.emb = torch.nn.Embedding(1000, 2)

    def forward(self, x, t):
        return torch.tanh(self.conv(x) + self.emb(t)[:, :, None, None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "unipc"])
def test_cuda_graph_replay_equals_eager_for_multistep(sampler):
    """The whole loop (model + fused multistep pass, history on the device) captured and replayed: same bits."""
    torch.manual_seed(0)
    model = _TinyModel().cuda().eval()
    schedule = Schedule(num_train_timesteps=1000)
    kw = dict(sampler=sampler, num_inference_steps=7, seed=3, progress=False, shape=(2, 8, 8), batch_size=3)
    eager = fastddpm.sample(model, schedule, 5, cuda_graph=False, **kw)
    graphed = fastddpm.sample(model, schedule, 5, cuda_graph=True, steps_per_graph=3, **kw)
    assert torch.equal(eager, graphed)


def test_plan_errors_name_the_argument():
    schedule = Schedule(num_train_timesteps=100)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_plan(schedule, "dpmpp_2m", None, None, 0.0, "cpu")
    with pytest.raises(ValueError, match="solver_order"):
        make_plan(schedule, "ddpm", 10, None, 0.0, "cpu", solver_order=2)
    with pytest.raises(ValueError, match="solver_order"):
        make_plan(schedule, "dpmpp_2m", 10, None, 0.0, "cpu", solver_order=3)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        make_plan(schedule, "ddim", 10, None, 0.0, "cpu", final_sigmas_type="sigma_min")
    plan = make_plan(schedule, "unipc", 6, None, 0.0, "cpu", solver_order=3, final_sigmas_type="sigma_min")
    assert plan.kernel == "multistep" and plan.num_steps == 6 and plan.coef.dtype == torch.float32
    assert torch.equal(plan.coef.double(), plan.coef64.float().double())  # the float64 table, rounded once
    with pytest.raises(ValueError, match="unknown sampler"):
        make_plan(schedule, "dpmpp_4m", 10, None, 0.0, "cpu")
