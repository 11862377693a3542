"""The ``fastddpm quality`` pipeline: sample quality and cost against the number of steps, per sampler.

For every sampler (``x0`` one shot, ``ddpm`` ancestral, ``ddim`` with ``eta`` on the model's schedule,
``ddim-noclip`` the same without x0 clipping, and the multistep solvers ``dpmpp_2m``, ``dpmpp_3m``,
``dpmpp_2m_sde``, ``unipc`` at their own, smaller step counts) and step count it samples

* the digits model and scores the images with the shipped digits classifier (FD-digits, confidence,
  class coverage), against the digits held out from the classifier's training;
* the 2-D ring-of-Gaussians toy, with the MLP denoiser and with the exact denoiser (sliced Wasserstein
  distance to fresh true samples, mean log-density under the true density);

times each setting, and writes ``results.csv``, ``results.json``, ``figures/*.png`` (metrics against
steps, digit grids, the predicted-x0 strip along one trajectory, toy scatter plots) and
``grids/digits_<sampler>_<steps>.png`` under the output folder. Extra digits models (distilled students) are
sampled once each with the sampler, step count, eta and spacing of their own ``sampling.json``; their rows
carry the model's name.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _layout as L
from ..config import SamplingConfig
from ..schedule import Schedule
from .classifier import DigitsScorer, classifier_info, digits_train_heldout
from .labels import MULTISTEP_SAMPLERS, SAMPLER_ORDER, sampler_label
from .metrics import sliced_wasserstein
from .toy import (
    TOY_SHAPE,
    TOY_TRAIN_STEPS,
    TOY_WEIGHTS,
    ExactMixtureDenoiser,
    RingMixture,
    load_toy_denoiser,
    train_toy_denoiser,
)

DEFAULT_STEPS = (1, 2, 5, 10, 20, 50, 100, 250, 1000)
DEFAULT_SOLVER_STEPS = (1, 2, 3, 5, 8, 10, 15, 20, 50)
DEFAULT_TRAJECTORY_T = (999, 900, 700, 500, 300, 100, 0)
DDIM_SAMPLERS = ("ddim", "ddim-noclip")
REAL_FD_DRAWS = 10
CSV_COLUMNS = (
    "dataset", "model", "sampler", "eta", "steps", "num_samples", "batch_size", "seconds", "ms_per_image",
    "fd_digits", "confidence", "coverage", "swd", "log_density",
)  # fmt: skip


@dataclass(frozen=True)
class QualityConfig:
    """Settings of one quality run (see ``fastddpm quality --help``; :meth:`quick` is the CI preset).

    ``samplers`` come from :data:`SAMPLER_ORDER`: ``ddim`` follows the model's schedule (x0 clipped when its
    ``clip_sample`` is set, as diffusers' ``DDIMScheduler``), ``ddim-noclip`` turns the clipping off (the DDIM
    paper's sampler); the multistep solvers (:data:`MULTISTEP_SAMPLERS`) use the schedule as diffusers'
    multistep schedulers do (no ``clip_sample``). ``steps`` are numbers of model evaluations of ``ddpm`` and
    the DDIMs, ``solver_steps`` those of the multistep solvers; ``x0`` always takes one. ``spacing`` is the
    timestep spacing of the respaced schedules ("trailing" starts every schedule at t = T - 1, so one step
    starts from pure noise). ``extra_models`` are more digits models (bundled names or checkpoint dirs, e.g.
    distilled students), each sampled once with its ``sampling.json`` settings. ``batch_size`` caps the
    images per batch.
    """

    model: str = "digits"
    steps: tuple[int, ...] = DEFAULT_STEPS
    samplers: tuple[str, ...] = SAMPLER_ORDER
    solver_steps: tuple[int, ...] = DEFAULT_SOLVER_STEPS
    extra_models: tuple[str, ...] = ()
    eta: float = 0.0
    spacing: str = "trailing"
    num_samples: int = 256
    toy_samples: int = 2000
    toy_exact: bool = True
    toy_train_steps: int = 0
    trajectory_timesteps: tuple[int, ...] = DEFAULT_TRAJECTORY_T
    trajectory_steps: int | None = None
    trajectory_images: int = 4
    grid_images: int = 36
    seed: int = 0
    batch_size: int = 256
    device: str | None = None
    backend: str = "auto"
    digits: bool = True
    toy: bool = True
    figures: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [s for s in self.samplers if s not in SAMPLER_ORDER]
        if bad or not self.samplers:
            raise ValueError(f"unknown samplers {bad}; allowed: {', '.join(SAMPLER_ORDER)}")
        if not self.steps or any(int(s) < 1 for s in self.steps):
            raise ValueError(f"steps must be positive integers, got {self.steps}")
        if not self.solver_steps or any(int(s) < 1 for s in self.solver_steps):
            raise ValueError(f"solver_steps must be positive integers, got {self.solver_steps}")
        if self.extra_models and not self.digits:
            raise ValueError("extra_models are digits models: they need the digits part (digits=True)")
        if self.num_samples < 2 or self.toy_samples < 2:
            raise ValueError("num_samples and toy_samples must be >= 2 (metrics need a covariance / a spread)")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if self.toy_train_steps < 0 or self.batch_size < 1 or self.trajectory_images < 1 or self.grid_images < 1:
            raise ValueError("toy_train_steps must be >= 0; batch_size, trajectory_images, grid_images >= 1")
        if not (self.digits or self.toy):
            raise ValueError("nothing to do: both the digits and the toy parts are disabled")

    @classmethod
    def quick(cls, **overrides: Any) -> QualityConfig:
        """The CI preset: 3 step counts (5 and 10 for the solvers), 64 digits, 500 toy points, no exact-denoiser
        sweep, a 20-step strip."""
        base = dict(steps=(1, 10, 50), solver_steps=(5, 10), num_samples=64, toy_samples=500, toy_exact=False, trajectory_steps=20,
                    trajectory_images=3, grid_images=16)  # fmt: skip
        base.update(overrides)
        return cls(**base)


@dataclass
class QualityResult:
    """What :func:`run_quality` measured (also written to ``results.json``)."""

    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    references: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def _settings(config: QualityConfig) -> list[tuple[str, int]]:
    """(sampler, steps) pairs in run order; ``x0`` once with one step."""
    out = []
    for s in SAMPLER_ORDER:
        if s not in config.samplers:
            continue
        if s == "x0":
            out.append(("x0", 1))
        else:
            out += [(s, int(n)) for n in (config.solver_steps if s in MULTISTEP_SAMPLERS else config.steps)]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_sample(
    model, schedule, n, sampler, steps, config, device, shape=None, eta=None, spacing=None
) -> tuple[torch.Tensor, float]:
    """``fastddpm.sample`` of ``n`` images and its wall time; ``eta`` / ``spacing`` override the config's."""
    from ..sampling import sample

    if sampler == "ddim-noclip":
        schedule, sampler = dataclasses.replace(schedule, clip_sample=False, thresholding=False), "ddim"
    if eta is None:
        eta = config.eta if sampler in DDIM_SAMPLERS else 0.0
    run = SamplingConfig(
        num_inference_steps=None if sampler == "x0" else steps, sampler=sampler, eta=eta,
        timestep_spacing=spacing or config.spacing, batch_size=min(config.batch_size, n), seed=config.seed,
        shape=shape, backend=config.backend, dtype="float32",  # quality is measured on the model's own arithmetic
    )  # fmt: skip
    _sync(device)
    t0 = time.perf_counter()
    out = sample(model, schedule, n, device=device, progress=config.progress, config=run)
    _sync(device)
    return out, time.perf_counter() - t0


def predicted_x0_trajectory(
    model: Callable[..., Any],
    schedule: Schedule,
    num_images: int,
    *,
    record_timesteps: Sequence[int] = DEFAULT_TRAJECTORY_T,
    num_inference_steps: int | None = None,
    spacing: str = "trailing",
    seed: int = 0,
    shape: tuple[int, int, int] = (1, 8, 8),
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run one ancestral DDPM trajectory and keep ``x_t`` and the model's predicted ``x0`` at chosen steps.

    Uses the same counter-based noise as :func:`fastddpm.sample` (x_T from ``STREAM_INIT`` at t = T, step
    noise keyed by (seed, sample index, t)), so the final images equal ``sample(..., sampler="ddpm")``
    with the same seed, steps and spacing.

    Returns:
        ``(ts, xt, x0, final)``: ``ts`` the timesteps actually recorded (for each requested one, the
        nearest timestep of the schedule), ``xt`` and ``x0`` float32 ``[len(ts), N, C, H, W]`` on the
        CPU, ``final`` float32 ``[N, C, H, W]`` in [-1, 1].
    """
    from ..dispatch import resolve_backend
    from ..driver import Stepper, make_plan
    from ..ops import randn
    from ..sampling import model_call

    device = torch.device(device)
    plan = make_plan(schedule, "ddpm", num_inference_steps, spacing, 0.0, device)
    avail = plan.pairs[:, 0].tolist()
    wanted = sorted({min(avail, key=lambda a, r=r: (abs(a - r), -a)) for r in record_timesteps}, reverse=True)
    T = schedule.num_train_timesteps
    name = resolve_backend(backend, device, torch.float32)
    stepper = Stepper(plan, schedule, num_images, shape, device, name, keep_x0=True)
    stepper.reset(
        randn((num_images, *shape), seed=seed, t=T, stream=L.STREAM_INIT, device=device, backend=name), seed, 0
    )
    xts, x0s = [], []
    with torch.inference_mode():
        for t in avail:
            tt = torch.full((num_images,), t, dtype=torch.int64, device=device)
            x_t = stepper.x.cpu().clone() if t in wanted else None
            stepper.advance(model_call(model, stepper.x, tt).float())
            if t in wanted:
                xts.append(x_t)
                x0s.append(stepper.x0.cpu().clone())
    x = stepper.x
    return wanted, torch.stack(xts), torch.stack(x0s), x.clamp(-1.0, 1.0).cpu()


def _environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _log(config: QualityConfig, msg: str) -> None:
    if config.progress:
        print(msg, flush=True)


def _run_digits(config: QualityConfig, device: torch.device, out: Path, result: QualityResult) -> dict[str, Any]:
    from ..images import save_samples
    from ..registry import load_model
    from ..sampling import infer_shape

    model, schedule, desc = load_model(config.model, device)
    if infer_shape(model, None) != (1, 8, 8):
        raise ValueError(
            f"the digits metrics need a model of 8x8 one-channel images; {desc} makes {infer_shape(model, None)}"
        )
    result.environment["digits_model"] = desc
    result.environment["digits_schedule"] = schedule.to_dict()
    scorer = DigitsScorer()
    x_tr, _, x_te, _ = digits_train_heldout()
    # The FD floor and its spread at this sample size: random subsets of real training digits vs held-out.
    g = torch.Generator().manual_seed(config.seed)
    n_ref = min(config.num_samples, x_tr.shape[0])
    real_fd = torch.tensor([scorer.score(x_tr[torch.randperm(x_tr.shape[0], generator=g)[:n_ref]]).fd
                            for _ in range(REAL_FD_DRAWS)], dtype=torch.float64)  # fmt: skip
    held = scorer.score(x_te)
    result.references["digits"] = {
        "fd_train_vs_heldout": float(real_fd.mean()), "fd_train_vs_heldout_std": float(real_fd.std()),
        "fd_train_draws": REAL_FD_DRAWS, "fd_train_num_samples": n_ref, "heldout_size": int(x_te.shape[0]),
        "heldout_confidence": held.confidence, "heldout_coverage": held.coverage, "classifier": classifier_info(),
    }  # fmt: skip
    # Warm-up (builds a fused backend on first use, fills caches): not timed.
    _timed_sample(model, schedule, min(config.batch_size, config.num_samples), "ddpm", 2, config, device)
    grids = out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    samples: dict[tuple[str, int], torch.Tensor] = {}
    for sampler, steps in _settings(config):
        _log(config, f"digits: {sampler} {steps} steps, {config.num_samples} images")
        images, secs = _timed_sample(model, schedule, config.num_samples, sampler, steps, config, device)
        s = scorer.score(images)
        samples[(sampler, steps)] = images[: config.grid_images].cpu()
        path = save_samples(images[: config.grid_images], grids / f"digits_{sampler}_{steps}.png")
        result.files.append(str(path.relative_to(out)))
        result.rows.append(dict(
            dataset="digits", model=config.model, sampler=sampler, eta=config.eta if sampler in DDIM_SAMPLERS else "",
            steps=steps, num_samples=config.num_samples, batch_size=min(config.batch_size, config.num_samples),
            seconds=secs, ms_per_image=1000 * secs / config.num_samples, fd_digits=s.fd, confidence=s.confidence,
            coverage=s.coverage,
        ))  # fmt: skip
    students = _run_extra_models(config, device, out, result, scorer)
    _log(config, "digits: predicted-x0 trajectory")
    ts, xts, x0s, _ = predicted_x0_trajectory(
        model, schedule, config.trajectory_images, record_timesteps=config.trajectory_timesteps,
        num_inference_steps=config.trajectory_steps, spacing=config.spacing, seed=config.seed, device=device,
        backend=config.backend,
    )  # fmt: skip
    return {"samples": samples, "trajectory": (ts, xts, x0s), "students": students}


def model_label(name_or_path: str) -> str:
    """Short name of a digits model for tables: a bundled name as is, a checkpoint dir by its folder name."""
    return Path(str(name_or_path).rstrip("/\\")).name or str(name_or_path)


def _run_extra_models(config, device, out: Path, result: QualityResult, scorer) -> dict[str, torch.Tensor]:
    """Sample each extra digits model with its own ``sampling.json`` settings; one row each."""
    from ..images import save_samples
    from ..registry import load_model, sampling_defaults
    from ..sampling import infer_shape

    images_by_model: dict[str, torch.Tensor] = {}
    for name in config.extra_models:
        model, schedule, desc = load_model(name, device)
        if infer_shape(model, None) != (1, 8, 8):
            raise ValueError(f"extra model {name!r} ({desc}) does not make 8x8 one-channel images")
        d = sampling_defaults(name)
        sampler = d.get("sampler", "ddpm")
        steps = 1 if sampler == "x0" else d.get("num_inference_steps", schedule.num_train_timesteps)
        eta = d.get("eta", 0.0) if sampler == "ddim" else 0.0
        label = model_label(name)
        result.environment.setdefault("extra_models", {})[label] = {"description": desc, "sampling": d}
        _log(config, f"digits: {label} ({sampler} {steps} steps, from its sampling.json), {config.num_samples} images")
        images, secs = _timed_sample(
            model,
            schedule,
            config.num_samples,
            sampler,
            steps,
            config,
            device,
            eta=eta,
            spacing=d.get("timestep_spacing"),
        )
        s = scorer.score(images)
        images_by_model[label] = images[: config.grid_images].cpu()
        path = save_samples(images[: config.grid_images], out / "grids" / f"digits_{label}_{sampler}_{steps}.png")
        result.files.append(str(path.relative_to(out)))
        result.rows.append(dict(
            dataset="digits", model=label, sampler=sampler, eta=eta if sampler == "ddim" else "", steps=steps,
            num_samples=config.num_samples, batch_size=min(config.batch_size, config.num_samples), seconds=secs,
            ms_per_image=1000 * secs / config.num_samples, fd_digits=s.fd, confidence=s.confidence, coverage=s.coverage,
        ))  # fmt: skip
    return images_by_model


def _run_toy(config: QualityConfig, device: torch.device, result: QualityResult) -> dict[str, Any]:
    mixture, schedule = RingMixture(), Schedule()
    if config.toy_train_steps > 0:
        t0 = time.perf_counter()
        mlp = train_toy_denoiser(mixture, schedule, steps=config.toy_train_steps, seed=config.seed)
        result.environment["toy_mlp"] = (
            f"trained here: {config.toy_train_steps} steps in {time.perf_counter() - t0:.1f} s"
        )
    else:
        mlp = load_toy_denoiser()
        result.environment["toy_mlp"] = f"shipped weights ({TOY_WEIGHTS.name}, {TOY_TRAIN_STEPS} training steps)"
    models = {"mlp": mlp.to(device)}
    if config.toy_exact:
        models["exact"] = ExactMixtureDenoiser(mixture, schedule).to(device)
    truth = mixture.sample(config.toy_samples, seed=config.seed + 1)
    other = mixture.sample(config.toy_samples, seed=config.seed + 2)
    result.references["toy"] = {
        "mixture": dataclasses.asdict(mixture),
        "swd_true_vs_true": sliced_wasserstein(other, truth),
        "log_density_true": float(mixture.log_prob(other).mean()),
        "negative_entropy": -mixture.entropy_separated(),
        "num_samples": config.toy_samples,
    }
    points: dict[tuple[str, str, int], torch.Tensor] = {}
    quiet = dataclasses.replace(config, progress=False)
    for name, model in models.items():
        _timed_sample(model, schedule, 8, "ddpm", 2, quiet, device, TOY_SHAPE)  # warm-up
        for sampler, steps in _settings(config):
            x, secs = _timed_sample(model, schedule, config.toy_samples, sampler, steps, quiet, device, TOY_SHAPE)
            x = x.reshape(-1, 2).cpu()
            points[(name, sampler, steps)] = x
            result.rows.append(dict(
                dataset="toy", model=name, sampler=sampler, eta=config.eta if sampler in DDIM_SAMPLERS else "", steps=steps,
                num_samples=config.toy_samples, batch_size=min(config.batch_size, config.toy_samples), seconds=secs,
                ms_per_image=1000 * secs / config.toy_samples, swd=sliced_wasserstein(x, truth),
                log_density=float(mixture.log_prob(x).mean()),
            ))  # fmt: skip
        _log(config, f"toy: {name} denoiser done")
    return {"points": points, "truth": truth, "mixture": mixture}


def run_quality(config: QualityConfig, out_dir: str | Path) -> QualityResult:
    """Run the whole comparison and write its files under ``out_dir`` (created if missing).

    Returns the :class:`QualityResult` (also in ``results.json``; one row per dataset x model x sampler x
    steps in ``results.csv``). Sampling uses ``config.device`` (default: CUDA if available). Each setting's
    time is the wall time of its :func:`fastddpm.sample` call (on CUDA that includes the call's graph capture).
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = QualityResult(config=dataclasses.asdict(config), environment=_environment(device))
    t0 = time.perf_counter()
    digits = _run_digits(config, device, out, result) if config.digits else None
    toy = _run_toy(config, device, result) if config.toy else None
    result.environment["total_seconds"] = round(time.perf_counter() - t0, 1)
    if config.figures:
        from .figures import write_figures

        for p in write_figures(result, digits, toy, out / "figures"):
            result.files.append(str(p.relative_to(out)))
    _write_tables(result, out)
    return result


def _write_tables(result: QualityResult, out: Path) -> None:
    from ..images import _atomic_write

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="")
            w.writeheader()
            for row in result.rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    result.files += ["results.csv", "results.json"]
    _atomic_write(out / "results.csv", write_csv)
    text = json.dumps(dataclasses.asdict(result), indent=2, default=str) + "\n"
    _atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def format_table(result: QualityResult) -> str:
    """The measured rows as a Markdown table (digits first, then the toy), for a README."""
    lines = []
    digits = [r for r in result.rows if r["dataset"] == "digits"]
    if digits:
        base = result.config["model"]
        lines += [
            "| sampler | steps | FD-digits | confidence | coverage (nats) | ms / image |",
            "|---|---|---|---|---|---|",
        ]
        for r in digits:
            name = sampler_label(r["sampler"], r["eta"])
            name = name if r["model"] == base else f"{r['model']} ({name})"
            lines.append(f"| {name} | {r['steps']} | {r['fd_digits']:.2f} | {r['confidence']:.3f} | "
                         f"{r['coverage']:.3f} | {r['ms_per_image']:.2f} |")  # fmt: skip
        ref = result.references.get("digits")
        if ref:
            lines.append(f"| real digits | - | {ref['fd_train_vs_heldout']:.2f} +- {ref['fd_train_vs_heldout_std']:.2f} | "
                         f"{ref['heldout_confidence']:.3f} | "
                         f"{ref['heldout_coverage']:.3f} | - |")  # fmt: skip
    toy = [r for r in result.rows if r["dataset"] == "toy"]
    if toy:
        lines += [
            "",
            "| denoiser | sampler | steps | SWD | mean log-density | ms / point |",
            "|---|---|---|---|---|---|",
        ]
        for r in toy:
            name = sampler_label(r["sampler"], r["eta"])
            lines.append(f"| {r['model']} | {name} | {r['steps']} | {r['swd']:.4f} | {r['log_density']:.2f} | "
                         f"{r['ms_per_image']:.4f} |")  # fmt: skip
        ref = result.references["toy"]
        lines.append(f"| true samples | - | - | {ref['swd_true_vs_true']:.4f} | {ref['log_density_true']:.2f} | - |")
    return "\n".join(lines)
