"""The reference backend (the spec) against diffusers, config by config.

Two comparisons per case:
* "float64 diffusers": diffusers' own step code fed float64 tables and float64 tensors. The formulas
  must agree to ~1e-12: this pins every branch (prediction, variance, clipping, thresholding, skipped
  steps) exactly.
* stock diffusers (float32 tables): agreement to the float32 rounding of diffusers' own tables
  (its float32 ``1 - alphas_cumprod`` loses ~1e-4 relative near t = 0; ours are float64).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import fastddpm
from fastddpm import Schedule
from fastddpm.schedule import space_timesteps

diffusers = pytest.importorskip("diffusers")  # every test here compares with it
ddpm_mod = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")

PREDICTIONS = ["epsilon", "sample", "v_prediction"]
VARIANCES_DIFFUSERS_OK = ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]
CLIPS = [dict(clip_sample=True), dict(clip_sample=False), dict(thresholding=True, sample_max_value=2.5)]
BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


def _float64_tables(sch, schedule: Schedule):
    sch.betas = schedule.betas.clone()
    sch.alphas = 1.0 - sch.betas
    sch.alphas_cumprod = schedule.alphas_cumprod.clone()
    sch.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sch, "final_alpha_cumprod"):
        sch.final_alpha_cumprod = torch.tensor(schedule.final_alphas_cumprod, dtype=torch.float64)
    return sch


def _diffusers_ddpm_step(sch, mo, t, x, z, monkeypatch):
    monkeypatch.setattr(ddpm_mod, "randn_tensor", lambda *a, **k: z.to(mo.dtype))
    out = sch.step(mo, t, x)
    return out.prev_sample, out.pred_original_sample


def _inputs(vt: str, dtype=torch.float64, shape=(3, 2, 5, 7)):
    b, c = shape[:2]
    x = torch.randn(shape, dtype=dtype) * 1.5
    mo_c = 2 * c if vt in ("learned", "learned_range") else c
    mo = torch.randn((b, mo_c, *shape[2:]), dtype=dtype)
    if vt == "learned_range":
        mo[:, c:] = torch.rand_like(mo[:, c:]) * 2 - 1
    z = torch.randn(shape, dtype=dtype)
    return x, mo, z


@pytest.mark.parametrize(
    "pred,vt,clip", list(itertools.product(PREDICTIONS, VARIANCES_DIFFUSERS_OK, range(len(CLIPS))))
)
def test_ddpm_step_matches_diffusers(pred, vt, clip, monkeypatch):
    cfg = dict(prediction_type=pred, variance_type=vt, **CLIPS[clip])
    schedule = Schedule(**cfg)
    x, mo, z = _inputs(vt)
    sch64 = _float64_tables(diffusers.DDPMScheduler(**cfg), schedule)
    sch32 = diffusers.DDPMScheduler(**cfg)
    for t in (999, 613, 20, 1, 0):
        ours = fastddpm.ddpm_step(mo, t, x, schedule, noise=z, backend="reference")
        ref64 = _diffusers_ddpm_step(sch64, mo, t, x, z, monkeypatch)
        torch.testing.assert_close(ours, ref64, rtol=1e-10, atol=1e-10)
        ours32 = fastddpm.ddpm_step(mo.float(), t, x.float(), schedule, noise=z.float(), backend="reference")
        ref32 = _diffusers_ddpm_step(sch32, mo.float(), t, x.float(), z.float(), monkeypatch)
        torch.testing.assert_close(ours32, ref32, rtol=1e-4, atol=3e-4)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("n", [7, 50, 1000])
def test_ddpm_after_set_timesteps(spacing, n, monkeypatch):
    cfg = dict(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" and n == 50 else 0)
    schedule = Schedule(**cfg)
    sch = _float64_tables(diffusers.DDPMScheduler(**cfg), schedule)
    sch.set_timesteps(n)
    pairs = schedule.timesteps(n)
    assert pairs[:, 0].tolist() == sch.timesteps.tolist()
    x, mo, z = _inputs("fixed_small")
    for i in sorted({0, 1, len(pairs) // 2, len(pairs) - 1}):
        t, prev = (int(v) for v in pairs[i])
        assert prev == int(sch.previous_timestep(t))
        ours = fastddpm.ddpm_step(mo, t, x, schedule, prev_t=prev, noise=z, backend="reference")
        torch.testing.assert_close(ours, _diffusers_ddpm_step(sch, mo, t, x, z, monkeypatch), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pred,clip", list(itertools.product(PREDICTIONS, range(len(CLIPS)))))
@pytest.mark.parametrize("eta,use_clipped", [(0.0, False), (0.0, True), (0.7, False), (1.0, True)])
def test_ddim_step_matches_diffusers(pred, clip, eta, use_clipped):
    cfg = dict(prediction_type=pred, **CLIPS[clip])
    for set_alpha_to_one in (True, False):
        schedule = Schedule(set_alpha_to_one=set_alpha_to_one, **cfg)
        sch = _float64_tables(diffusers.DDIMScheduler(set_alpha_to_one=set_alpha_to_one, **cfg), schedule)
        sch.set_timesteps(50)
        pairs = schedule.timesteps(50, sampler="ddim")
        x, mo, z = _inputs("fixed_small")
        for t, prev in (pairs[0].tolist(), pairs[25].tolist(), pairs[-1].tolist()):
            ref = sch.step(mo, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=z)
            ours = fastddpm.ddim_step(
                mo, t, x, schedule, prev_t=prev, eta=eta, use_clipped_model_output=use_clipped, noise=z,
                backend="reference",
            )  # fmt: skip
            torch.testing.assert_close(ours, (ref.prev_sample, ref.pred_original_sample), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("rescale", [False, True])
def test_tables_and_add_noise(beta_schedule, rescale):
    cfg = dict(
        beta_schedule=beta_schedule,
        rescale_betas_zero_snr=rescale,
        beta_end=0.012 if beta_schedule == "scaled_linear" else 0.02,
    )
    schedule = Schedule(**cfg)
    sch = diffusers.DDPMScheduler(**cfg)
    # diffusers' float32 rescale loses ~1e-3 relative on the smallest betas; ours is float64.
    torch.testing.assert_close(schedule.betas, sch.betas.double(), rtol=1e-5, atol=1e-6 if rescale else 1e-7)
    torch.testing.assert_close(schedule.alphas_cumprod, sch.alphas_cumprod.double(), rtol=1e-4, atol=1e-6)
    x0 = torch.randn(4, 3, 6, 5)
    z = torch.randn_like(x0)
    t = torch.tensor([0, 17, 500, 998])
    ours = fastddpm.q_sample(x0, t, schedule, z, backend="reference")
    torch.testing.assert_close(ours, sch.add_noise(x0, z, t), rtol=1e-5, atol=1e-4 if rescale else 1e-5)
    ours64 = fastddpm.q_sample(x0.double(), t, schedule, z.double(), backend="reference")
    _float64_tables(sch, schedule)
    torch.testing.assert_close(ours64, sch.add_noise(x0.double(), z.double(), t), rtol=1e-12, atol=1e-12)


def test_trained_betas_and_from_diffusers_sources(tmp_path):
    betas = torch.linspace(1e-4, 0.03, 100).tolist()
    sch = diffusers.DDPMScheduler(num_train_timesteps=100, trained_betas=betas, variance_type="fixed_large")
    a = Schedule.from_diffusers(sch)
    b = Schedule.from_diffusers(sch.config)
    c = Schedule.from_diffusers(dict(sch.config))
    sch.save_config(tmp_path)
    d = Schedule.from_diffusers(tmp_path / "scheduler_config.json")
    e = Schedule.from_diffusers(tmp_path)
    assert a == b == c == d == e
    assert a.variance_type == "fixed_large" and a.num_train_timesteps == 100
    torch.testing.assert_close(a.betas, torch.tensor(betas, dtype=torch.float64))


def test_fixed_large_log_is_correct_where_diffusers_is_nan(monkeypatch):
    schedule = Schedule(variance_type="fixed_large_log")
    x, mo, z = _inputs("fixed_large_log")
    ref = _diffusers_ddpm_step(
        diffusers.DDPMScheduler(variance_type="fixed_large_log"), mo.float(), 500, x.float(), z.float(), monkeypatch
    )
    assert torch.isnan(ref[0]).all()  # diffusers bug #14569: sqrt(log(beta)) < 0
    ours = fastddpm.ddpm_step(mo, 500, x, schedule, noise=z, backend="reference")
    expected = fastddpm.ddpm_step(mo, 500, x, Schedule(variance_type="fixed_large"), noise=z, backend="reference")
    torch.testing.assert_close(ours, expected)
    assert torch.isfinite(ours[0]).all()


def test_learned_is_a_log_variance():
    schedule = Schedule(variance_type="learned", clip_sample=False)
    x, mo, z = _inputs("learned")
    c = x.shape[1]
    prev, x0 = fastddpm.ddpm_step(mo, 400, x, schedule, noise=z, backend="reference")
    mean, _ = fastddpm.ddpm_step(mo, 400, x, schedule, noise=torch.zeros_like(z), backend="reference")
    torch.testing.assert_close(prev - mean, torch.exp(0.5 * mo[:, c:]) * z)  # std = exp(v / 2), never NaN


def test_timesteps_spacings_match_diffusers():
    for spacing, n, offset in itertools.product(["leading", "linspace", "trailing"], [1, 3, 50, 999], [0, 1]):
        if offset and spacing != "leading":
            continue
        sch = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
        sch.set_timesteps(n)
        pairs = Schedule(timestep_spacing=spacing, steps_offset=offset).timesteps(n)
        assert pairs[:, 0].tolist() == sch.timesteps.tolist(), (spacing, n)
        assert pairs[:, 1].tolist() == [int(sch.previous_timestep(int(t))) for t in sch.timesteps]
    full = Schedule().timesteps()
    assert full[0].tolist() == [999, 998] and full[-1].tolist() == [0, -1] and len(full) == 1000


def test_respacing_strings():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "1000") == set(range(1000))
    s = space_timesteps(100, "10,15,20")
    assert len(s) == 45 and min(s) == 0 and max(s) == 99
    pairs = Schedule().timesteps(spacing="250")
    assert len(pairs) == 250 and pairs[-1].tolist() == [0, -1]
    assert (pairs[:-1, 1] == pairs[1:, 0]).all()
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim333")
    with pytest.raises(ValueError, match="allowed"):
        Schedule().timesteps(10, spacing="evenly")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta_schedule="cosine"), "allowed: 'linear'"),
        (dict(variance_type="big"), "allowed: 'fixed_small'"),
        (dict(prediction_type="noise"), "allowed: 'epsilon'"),
        (dict(timestep_spacing="even"), "allowed: 'leading'"),
        (dict(trained_betas=[0.1, 0.2]), "trained_betas has 2"),
        (dict(dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
    ],
)
def test_schedule_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_schedule_is_frozen_and_hashable():
    s = Schedule()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.beta_end = 0.1  # type: ignore[misc]
    assert hash(s) == hash(Schedule())
