"""Samplers behind ``fastddpm quality`` (x0 one shot, deterministic DDIM), the metrics on known answers,
and a tiny end-to-end run of the quality pipeline."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

import fastddpm
from fastddpm import STREAM_INIT, Schedule
from fastddpm.quality.metrics import (
    class_coverage,
    frechet_distance,
    frechet_distance_features,
    mean_confidence,
    random_directions,
    sliced_wasserstein,
)
from fastddpm.quality.toy import TOY_SHAPE, ExactMixtureDenoiser, RingMixture, ToyDenoiser
from fastddpm.sampling import sample


class TinyEps(nn.Module):
    """A small epsilon model with random weights whose output depends on x and t: ``[B, C, H, W] -> same``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(channels))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        s = self.scale.view(1, -1, 1, 1) * (t.float() / 1000).view(-1, 1, 1, 1)
        return torch.tanh(self.conv(x)) + s + 0.5 * x


SHAPE = (3, 5, 7)


# ----------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("spacing,steps", [("trailing", 1), ("trailing", None), ("leading", 1), ("linspace", None)])
def test_x0_sampler_equals_single_step_formula(spacing, steps):
    schedule = Schedule()
    model = TinyEps(SHAPE[0])
    n, seed = 5, 1234
    out = sample(model, schedule, n, num_inference_steps=steps, sampler="x0", timestep_spacing=spacing, seed=seed,
                 shape=SHAPE, progress=False, backend="reference")  # fmt: skip
    assert len(model.calls) == 1, "the x0 sampler must evaluate the model exactly once"
    x_t, t = model.calls[0]
    t_first = schedule.num_train_timesteps - 1  # one evaluation from x_T at t = T - 1, whatever the spacing
    assert torch.equal(t, torch.full((n,), t_first, dtype=torch.int64))
    # x_T is the counter-based STREAM_INIT noise at t = T (so it does not depend on steps or sampler).
    x_T = fastddpm.randn(
        (n, *SHAPE), seed=seed, t=schedule.num_train_timesteps, stream=STREAM_INIT, backend="reference"
    )
    torch.testing.assert_close(x_t, x_T, rtol=0, atol=0)
    # DDPM eq. 15 in float64: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), then clipped to [-1, 1].
    abar = schedule.alphas_cumprod[t_first]
    eps = model(x_T.double().float(), t).double()
    want = ((x_T.double() - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_x0_sampler_refuses_more_than_one_step():
    from fastddpm.config import ConfigError

    with pytest.raises(ConfigError, match="num_inference_steps must be None or 1, got 20"):
        sample(TinyEps(SHAPE[0]), Schedule(), 2, num_inference_steps=20, sampler="x0", shape=SHAPE, progress=False,
               backend="reference")  # fmt: skip


def _ddim_loop(model, schedule, x, steps, spacing, noises):
    pairs = schedule.timesteps(steps, spacing, sampler="ddim")
    for (t, prev), z in zip(pairs.tolist(), noises):
        out = model(x, torch.full((x.shape[0],), t))
        x, _ = fastddpm.ddim_step(out, t, x, schedule, prev_t=prev, eta=0.0, noise=z, backend="reference")
    return x.clamp(-1, 1)


def test_ddim_eta0_is_deterministic():
    schedule = Schedule()
    model = TinyEps(SHAPE[0])
    n, seed, steps = 6, 77, 12
    kw = dict(num_inference_steps=steps, sampler="ddim", eta=0.0, timestep_spacing="trailing", shape=SHAPE,
              progress=False, backend="reference")  # fmt: skip
    with torch.no_grad():
        a = sample(model, schedule, n, seed=seed, **kw)
        b = sample(model, schedule, n, seed=seed, **kw)
        c = sample(model, schedule, n, seed=seed, batch_size=4, **kw)
        assert torch.equal(a, b), "two DDIM(eta=0) runs with the same seed differ"
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)
        # Same x_T with two different sets of step noise: eta = 0 adds none, so the outputs are identical.
        x_T = fastddpm.randn((n, *SHAPE), seed=seed, t=schedule.num_train_timesteps, stream=STREAM_INIT,
                             backend="reference")  # fmt: skip
        d = _ddim_loop(model, schedule, x_T.clone(), steps, "trailing", [torch.randn_like(x_T) for _ in range(steps)])
        e = _ddim_loop(model, schedule, x_T.clone(), steps, "trailing", [torch.randn_like(x_T) for _ in range(steps)])
        assert torch.equal(d, e)
        torch.testing.assert_close(d, a, rtol=1e-5, atol=1e-5)
        # Control: DDIM with eta > 0 does depend on the step noise.
        f = sample(model, schedule, n, seed=seed, **{**kw, "eta": 1.0})
        assert not torch.allclose(f, a, atol=1e-3)


def test_trajectory_ends_where_sample_ends():
    from fastddpm.quality.run import predicted_x0_trajectory

    schedule = Schedule()
    model = TinyEps(SHAPE[0])
    with torch.no_grad():
        ts, xts, x0s, final = predicted_x0_trajectory(
            model, schedule, 3, record_timesteps=(999, 500, 0), num_inference_steps=8, spacing="trailing", seed=5,
            shape=SHAPE, backend="reference",
        )  # fmt: skip
        want = sample(model, schedule, 3, num_inference_steps=8, sampler="ddpm", timestep_spacing="trailing", seed=5,
                      shape=SHAPE, progress=False, backend="reference")  # fmt: skip
    avail = schedule.timesteps(8, "trailing")[:, 0].tolist()
    assert ts == sorted({min(avail, key=lambda a, r=r: abs(a - r)) for r in (999, 500, 0)}, reverse=True)
    assert xts.shape == x0s.shape == (len(ts), 3, *SHAPE)
    assert bool(torch.isfinite(x0s).all()) and float(x0s.abs().max()) <= 1.0
    torch.testing.assert_close(final, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Frechet distance
def _random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_identical_sets_is_zero():
    feats = torch.randn(301, 7) * torch.rand(7) + torch.randn(7)
    assert abs(frechet_distance_features(feats, feats.clone())) < 1e-9 * float(feats.var(0).sum())
    shifted = feats + 0.5
    assert frechet_distance_features(feats, shifted) == pytest.approx(0.25 * 7, rel=1e-9)


def test_frechet_closed_form_2d_non_commuting():
    # For 2x2 PSD M, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); with M ~ S1 S2: tr(S1 S2), det S1 det S2.
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        s1, s2 = _random_spd(2, g), _random_spd(2, g)
        m1, m2 = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
        cross = math.sqrt(float((s1 @ s2).trace()) + 2 * math.sqrt(float(s1.det() * s2.det())))
        want = float((m1 - m2) @ (m1 - m2) + s1.trace() + s2.trace()) - 2 * cross
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_frechet_closed_form_shared_eigenbasis():
    g = torch.Generator().manual_seed(4)
    d = 5
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64)
    m1, m2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    want = float((m1 - m2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    got = frechet_distance(m1, q @ torch.diag(a) @ q.T, m2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(5)
    d = 6
    s1, s2 = _random_spd(d, g), _random_spd(d, g)
    m1, m2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real  # the FID reference code's formula
    want = float((m1 - m2) @ (m1 - m2) + s1.trace() + s2.trace()) - 2 * float(covmean.trace())
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-8)


def test_frechet_from_samples_approaches_closed_form():
    g = torch.Generator().manual_seed(6)
    d, n = 3, 40000
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a, b = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64), torch.tensor([0.3, 1.5, 1.0], dtype=torch.float64)
    shift = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * a.sqrt() @ q.T
    y = torch.randn(n, d, generator=g, dtype=torch.float64) * b.sqrt() @ q.T + shift
    want = float(shift.pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance_features(x.float(), y.float()) == pytest.approx(want, rel=0.05)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))


# ----------------------------------------------------------------------------- sliced Wasserstein
def test_swd_identical_and_shifted_sets():
    x = torch.randn(513, 2, dtype=torch.float64)
    assert sliced_wasserstein(x, x.clone()) == 0.0
    s = torch.tensor([0.3, -0.4], dtype=torch.float64)
    theta = random_directions(2, 64, seed=9)
    exact = math.sqrt(float(((theta @ s) ** 2).mean()))
    assert sliced_wasserstein(x, x + s, directions=theta) == pytest.approx(exact, rel=1e-10)
    # Over many directions: |s| / sqrt(D) (|s| = 0.5, D = 2).
    assert sliced_wasserstein(x, x + s, num_projections=4000) == pytest.approx(0.5 / math.sqrt(2), rel=0.03)


def test_swd_unequal_sizes_is_exact():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.2
    theta = random_directions(3, 11, seed=2)
    # Reference: repeating each point of x 5 times and of y 7 times gives equal-size sets with the same measures.
    xr, yr = x.repeat_interleave(5, 0), y.repeat_interleave(7, 0)
    assert sliced_wasserstein(x, y, directions=theta) == pytest.approx(
        sliced_wasserstein(xr, yr, directions=theta), rel=1e-10
    )
    assert sliced_wasserstein(x, x.repeat(3, 1), directions=theta) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- classifier scores
def test_confidence_and_coverage():
    logits = torch.randn(37, 10, dtype=torch.float64)
    assert mean_confidence(logits) == pytest.approx(float(logits.softmax(1).max(1).values.mean()), rel=1e-12)
    uniform = torch.eye(10).repeat(4, 1) * 5
    assert class_coverage(uniform) == pytest.approx(math.log(10), rel=1e-12)
    one = torch.zeros(13, 10)
    one[:, 3] = 1
    assert class_coverage(one) == 0.0
    two = torch.zeros(12, 10)
    two[:3, 1], two[3:, 7] = 1, 1  # 1/4 and 3/4
    assert class_coverage(two) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-12)


def test_shipped_classifier_loads_and_classifies_heldout_digits():
    from fastddpm.quality.classifier import accuracy, classifier_info, digits_train_heldout, load_digits_classifier

    clf = load_digits_classifier()
    _, _, x_te, y_te = digits_train_heldout()
    acc = accuracy(clf, x_te, y_te)
    assert acc == pytest.approx(classifier_info()["heldout_accuracy"], abs=2e-3)
    assert acc > 0.9
    feats, logits = clf.embed(x_te[:17])
    assert feats.shape == (17, 64) and logits.shape == (17, 10)


# ----------------------------------------------------------------------------- 2-D toy
def test_toy_log_density_of_true_samples_is_negative_entropy():
    mix = RingMixture()
    lp = mix.log_prob(mix.sample(20000, seed=11))
    se = float(lp.std()) / math.sqrt(lp.numel())
    assert abs(float(lp.mean()) + mix.entropy_separated()) < 4 * se


def test_toy_density_is_normalised():
    mix = RingMixture(num_modes=5, radius=0.6, std=0.09)
    h = 0.004
    grid = torch.arange(-1.2, 1.2, h, dtype=torch.float64) + h / 2
    pts = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    assert float(mix.log_prob(pts).exp().sum()) * h * h == pytest.approx(1.0, abs=1e-4)


def test_exact_denoiser_is_scaled_score():
    # E[eps | x_t] = -sqrt(1 - abar) * grad log p_t(x_t), p_t the mixture of N(sqrt(abar) mu_k, (abar s^2 + 1 - abar) I).
    mix, schedule = RingMixture(num_modes=6, radius=0.7, std=0.08), Schedule()
    den = ExactMixtureDenoiser(mix, schedule)
    x = torch.randn(9, 2, dtype=torch.float64) * 0.8
    for t in (0, 37, 400, 999):
        a = float(schedule.alphas_cumprod[t])
        mix_t = RingMixture(mix.num_modes, mix.radius * math.sqrt(a), math.sqrt(a * mix.std**2 + 1 - a))
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(mix_t.log_prob(xr).sum(), xr)
        want = -math.sqrt(1 - a) * grad
        got = den(x.reshape(9, *TOY_SHAPE), torch.full((9,), t)).reshape(9, 2)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_one_shot_x0_collapses_to_the_mean_while_ddim_reaches_the_modes():
    # Even the exact denoiser's one-shot x0 is E[x0 | x_T], near the data mean (0), not a sample.
    mix, schedule = RingMixture(), Schedule()
    den = ExactMixtureDenoiser(mix, schedule)
    kw = dict(shape=TOY_SHAPE, progress=False, backend="reference", timestep_spacing="trailing", seed=3)
    one = sample(den, schedule, 400, num_inference_steps=1, sampler="x0", **kw).reshape(-1, 2)
    ddim = sample(den, schedule, 400, num_inference_steps=50, sampler="ddim", **kw).reshape(-1, 2)
    assert float(one.norm(dim=1).max()) < 0.1 * mix.radius
    assert float((ddim.norm(dim=1) - mix.radius).abs().median()) < 0.1 * mix.radius
    truth = mix.sample(400, seed=4)
    assert sliced_wasserstein(one, truth) > 4 * sliced_wasserstein(ddim, truth)
    assert float(mix.log_prob(ddim).mean()) > float(mix.log_prob(one).mean()) + 10


def test_shipped_toy_denoiser_samples_the_ring():
    from fastddpm.quality.toy import load_toy_denoiser

    mix, schedule = RingMixture(), Schedule()
    m = load_toy_denoiser()
    assert isinstance(m, ToyDenoiser)
    kw = dict(shape=TOY_SHAPE, progress=False, backend="reference", timestep_spacing="trailing", seed=8)
    with torch.no_grad():
        x = sample(m, schedule, 400, num_inference_steps=50, sampler="ddpm", **kw).reshape(-1, 2)
    floor = sliced_wasserstein(mix.sample(400, seed=21), mix.sample(400, seed=22))
    assert sliced_wasserstein(x, mix.sample(400, seed=23)) < 2 * floor
    assert float(mix.log_prob(x).mean()) > -mix.entropy_separated() - 1.0


def test_toy_denoiser_stays_bounded_far_from_the_data():
    # eps - sqrt(1 - abar) x = sqrt(abar) F(x), and F must saturate (LayerNorm), not grow with |x|: an MLP
    # whose output grows with its input made DDIM diverge at 1000 steps.
    schedule = Schedule()
    m = ToyDenoiser(data_var=0.3, width=32, schedule=schedule)
    x = torch.randn(5, *TOY_SHAPE)
    t = torch.full((5,), 0)
    a = float(schedule.alphas_cumprod[0])
    with torch.no_grad():
        r = [(m(s * x, t) - math.sqrt(1 - a) * s * x) / math.sqrt(a) for s in (1e3, 1e4)]
    assert bool(torch.isfinite(r[0]).all()) and float(r[0].abs().max()) < 100
    torch.testing.assert_close(r[0], r[1], rtol=0, atol=0.05)


def test_training_is_deterministic_for_a_seed():
    from fastddpm.quality.classifier import digits_train_heldout, train_digits_classifier
    from fastddpm.quality.toy import train_toy_denoiser

    a, b = (train_toy_denoiser(RingMixture(), Schedule(), steps=15, batch_size=33, seed=4, width=16) for _ in range(2))
    c = train_toy_denoiser(RingMixture(), Schedule(), steps=15, batch_size=33, seed=5, width=16)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))
    x, y, _, _ = digits_train_heldout()
    d, e = (train_digits_classifier(x[:97], y[:97], epochs=1, batch_size=32, seed=1) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(d.state_dict().values(), e.state_dict().values()))


# ----------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def tiny_digits_model(tmp_path_factory):
    from fastddpm.unet import UNet, UNetConfig

    d = tmp_path_factory.mktemp("digits_model")
    torch.manual_seed(0)
    cfg = UNetConfig.ddpm(resolution=8, ch=8, ch_mult=(1, 2), attn_resolutions=(), in_channels=1, norm_num_groups=4,
                          time_embedding_dim=16)  # fmt: skip
    UNet(cfg).save_pretrained(d)
    (d / "scheduler_config.json").write_text(json.dumps(Schedule().to_dict()))
    return d


def test_quality_cli_quick_run_writes_its_files(tiny_digits_model, tmp_path):
    import shutil

    from fastddpm.cli import main

    # A "student": the same tiny model with a sampling.json naming DDIM, 2 steps, eta 0, "leading" spacing
    # (the run's own spacing is "trailing", so the row shows whether the file's settings were used).
    student = tmp_path / "tiny_student"
    shutil.copytree(tiny_digits_model, student)
    (student / "sampling.json").write_text(
        json.dumps({"num_inference_steps": 2, "sampler": "ddim", "eta": 0.0, "timestep_spacing": "leading"})
    )
    out = tmp_path / "q"
    rc = main(["quality", "--quick", "--model", str(tiny_digits_model), "--out", str(out), "--steps", "1,3",
               "--solver-steps", "2", "--extra-model", str(student), "--num-samples", "12", "--toy-samples", "40",
               "--backend", "reference", "--threads", "1", "--quiet"])  # fmt: skip
    assert rc == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    settings = [("x0", 1), ("ddpm", 1), ("ddpm", 3), ("ddim", 1), ("ddim", 3), ("ddim-noclip", 1), ("ddim-noclip", 3),
                ("dpmpp_2m", 2), ("dpmpp_3m", 2), ("dpmpp_2m_sde", 2), ("unipc", 2)]  # fmt: skip
    base = [r for r in rows if r["dataset"] == "digits" and r["model"] == str(tiny_digits_model)]
    assert [(r["sampler"], int(r["steps"])) for r in base] == settings
    assert [(r["sampler"], int(r["steps"])) for r in rows if r["dataset"] == "toy"] == settings
    extra = [r for r in rows if r["model"] == "tiny_student"]
    assert [(r["dataset"], r["sampler"], int(r["steps"]), float(r["eta"])) for r in extra] == [
        ("digits", "ddim", 2, 0.0)
    ]
    assert len(rows) == len(base) + len(extra) + len(settings)
    for r in rows:
        assert float(r["seconds"]) > 0 and float(r["ms_per_image"]) > 0
        keys = ("fd_digits", "confidence", "coverage") if r["dataset"] == "digits" else ("swd", "log_density")
        assert all(math.isfinite(float(r[k])) for k in keys)
    # x0 and the 1-step DDIM both return the x0 prediction from x_T at t = T - 1.
    by = {(r["dataset"], r["model"], r["sampler"], r["steps"]): r for r in rows}
    m = str(tiny_digits_model)
    assert by[("digits", m, "x0", "1")]["fd_digits"] == by[("digits", m, "ddim", "1")]["fd_digits"]
    assert by[("digits", m, "x0", "1")]["fd_digits"] == by[("digits", m, "ddim-noclip", "1")]["fd_digits"]
    # The student's row scores exactly what sample() gives with its sampling.json's settings (same code path).
    from fastddpm.quality.classifier import DigitsScorer

    with torch.no_grad():
        want = sample(fastddpm.load(student)[0], Schedule(), 12, num_inference_steps=2, sampler="ddim", eta=0.0,
                      timestep_spacing="leading", seed=0, progress=False, backend="reference")  # fmt: skip
    assert float(by[("digits", "tiny_student", "ddim", "2")]["fd_digits"]) == pytest.approx(
        DigitsScorer().score(want).fd, rel=1e-5
    )
    res = json.loads((out / "results.json").read_text())
    assert res["references"]["digits"]["heldout_size"] == 359
    assert res["config"]["num_samples"] == 12
    assert res["environment"]["extra_models"]["tiny_student"]["sampling"]["num_inference_steps"] == 2
    for name in ("quality_vs_steps", "digits_grids", "x0_trajectory", "toy_scatter", "quality_vs_time",
                 "students_vs_teacher"):  # fmt: skip
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for sampler, steps in settings:
        assert (out / "grids" / f"digits_{sampler}_{steps}.png").is_file()
    assert (out / "grids" / "digits_tiny_student_ddim_2.png").is_file()
    assert sorted(res["files"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_multistep_solver_beats_one_shot_on_the_bundled_model_and_the_toy(tmp_path):
    """The bundled digits model and the shipped toy MLP: DPM-Solver++(2M) at 5 steps (digits) and 10 steps
    (toy) scores far better than the one-shot x0 on FD-digits, SWD and log p (measured: FD 35 vs 153 at
    64 images, SWD 0.09 vs 0.23, log p -5.7 vs -42.9)."""
    from fastddpm.quality.run import QualityConfig, run_quality

    cfg = QualityConfig.quick(samplers=("x0", "dpmpp_2m"), solver_steps=(5,), toy=False, figures=False,
                              progress=False, trajectory_steps=4, trajectory_images=1)  # fmt: skip
    res = run_quality(cfg, tmp_path / "digits")
    fd = {r["sampler"]: r["fd_digits"] for r in res.rows}
    assert fd["dpmpp_2m"] < 0.5 * fd["x0"], fd
    cfg = QualityConfig.quick(samplers=("x0", "dpmpp_2m"), solver_steps=(10,), digits=False, figures=False,
                              progress=False)  # fmt: skip
    res = run_quality(cfg, tmp_path / "toy")
    toy = {r["sampler"]: r for r in res.rows}
    assert toy["dpmpp_2m"]["swd"] < 0.6 * toy["x0"]["swd"], toy
    assert toy["dpmpp_2m"]["log_density"] > toy["x0"]["log_density"] + 20, toy


def test_quality_config_rejects_bad_values():
    from fastddpm.quality.run import QualityConfig

    with pytest.raises(ValueError, match="unknown samplers"):
        QualityConfig(samplers=("euler",))
    with pytest.raises(ValueError, match="steps"):
        QualityConfig(steps=(0, 5))
    with pytest.raises(ValueError, match="eta"):
        QualityConfig(eta=-1.0)
    with pytest.raises(ValueError, match="solver_steps"):
        QualityConfig(solver_steps=(5, 0))
    with pytest.raises(ValueError, match="extra_models"):
        QualityConfig(extra_models=("digits",), digits=False)
