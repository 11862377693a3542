"""The noise schedule: a frozen, typed config and every table derived from it, once, in float64.

Names and defaults follow diffusers' ``DDPMScheduler``/``DDIMScheduler`` so a scheduler config maps
one-to-one (:meth:`Schedule.from_diffusers`). The float64 tables are the single source of the
diffusion math: the reference backend reads named per-step terms from :meth:`Schedule.step_terms`,
and the fused backends read the same terms packed into a float32 table by
:func:`fastddpm.coefficients.step_coefficients`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal, NamedTuple

import torch

from ._checks import bool_arg, int_arg, real_arg

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
Spacing = Literal["leading", "linspace", "trailing"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SPACINGS = ("leading", "linspace", "trailing")
LEARNED_VARIANCES = ("learned", "learned_range")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def _betas_tuple(betas: Any) -> tuple[float, ...]:
    """``trained_betas`` (a sequence, numpy array or 1-D tensor of numbers) as a tuple of finite floats."""
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__iter__"):
        raise TypeError(f"trained_betas must be a sequence of numbers, got {type(betas).__name__}")
    if hasattr(betas, "tolist"):  # numpy array or tensor -> Python numbers
        betas = betas.tolist()
    return tuple(real_arg(f"trained_betas[{i}]", b) for i, b in enumerate(betas))


class StepTerms(NamedTuple):
    """Per-sample float64 quantities of one reverse step ``t -> prev_t`` (each ``[B]``).

    Notation of Ho et al. (2020) with diffusers' re-derivation for skipped steps:
    ``abar_t`` = alphas_cumprod[t], ``abar_prev`` = alphas_cumprod[prev_t] (or the final value when
    ``prev_t < 0``), ``alpha_t = abar_t / abar_prev``, ``beta_t = 1 - alpha_t``.
    """

    abar_t: torch.Tensor
    abar_prev: torch.Tensor
    alpha_t: torch.Tensor  # abar_t / abar_prev
    beta_t: torch.Tensor  # 1 - alpha_t
    posterior_variance: torch.Tensor  # beta~_t = (1 - abar_prev) / (1 - abar_t) * beta_t, clamped at 1e-20 (eq. 7)
    mean_coef_x0: torch.Tensor  # sqrt(abar_prev) * beta_t / (1 - abar_t)      (eq. 7)
    mean_coef_xt: torch.Tensor  # sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t) (eq. 7)
    noise_gate: torch.Tensor  # 1.0 where the timestep value t > 0 (diffusers' rule), else 0.0


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A DDPM noise schedule (diffusers names and defaults).

    Attributes mirror ``diffusers.DDPMScheduler`` (``timestep_spacing``, ``steps_offset`` and
    ``set_alpha_to_one`` come from its DDIM sibling's config and default as there).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    variance_type: VarianceType = "fixed_small"
    prediction_type: PredictionType = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False
    timestep_spacing: Spacing = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)  # frozen: normalised values are stored this way
        # The largest timestep a kernel keys noise by is T itself (x_T, STREAM_INIT), and t must be < 2**31.
        set_("num_train_timesteps", int_arg("num_train_timesteps", self.num_train_timesteps, 1, 2**31))
        for name in ("beta_start", "beta_end", "clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value"):
            set_(name, real_arg(name, getattr(self, name)))
        for name in ("clip_sample", "thresholding", "rescale_betas_zero_snr", "set_alpha_to_one"):
            bool_arg(name, getattr(self, name))
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        T = self.num_train_timesteps
        set_("steps_offset", int_arg("steps_offset", self.steps_offset, 0, T))
        if self.trained_betas is not None:
            set_("trained_betas", _betas_tuple(self.trained_betas))
            if len(self.trained_betas) != T:
                raise ValueError(f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps is {T}")
        if self.beta_start < 0 or self.beta_end < 0:
            raise ValueError(f"beta_start and beta_end must be >= 0, got {self.beta_start} and {self.beta_end}")
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}")
        if self.clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if self.sample_max_value < 1.0:
            raise ValueError(f"sample_max_value must be >= 1, got {self.sample_max_value}")
        betas = self.betas  # computed once here (cached), so traced code never runs the computation
        if not bool(torch.isfinite(betas).all()) or bool((betas < 0).any()) or bool((betas > 1).any()):
            raise ValueError("betas must be finite and in [0, 1]")
        _ = self.alphas_cumprod

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_diffusers(cls, source: Any) -> Schedule:
        """Build from a diffusers scheduler object, its ``.config``, a dict, or a ``scheduler_config.json`` path.

        Keys fastddpm does not use (``_class_name``, ``clip_sample`` of other samplers, ...) are ignored;
        a value fastddpm cannot honour raises ``ValueError`` listing the allowed ones.
        """
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                for name in ("scheduler_config.json", os.path.join("scheduler", "scheduler_config.json")):
                    if os.path.isfile(os.path.join(path, name)):
                        path = os.path.join(path, name)
                        break
                else:
                    raise FileNotFoundError(f"no scheduler_config.json in {source!r}")
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"scheduler config {source!r} does not exist") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"scheduler config {source!r} is not valid JSON: {e}") from None
        elif isinstance(source, Mapping):
            config = dict(source)
        elif hasattr(source, "config") and isinstance(source.config, Mapping):
            config = dict(source.config)
        else:
            raise TypeError(
                f"Schedule.from_diffusers expects a diffusers scheduler, its .config, a dict or a path; got {type(source).__name__}"
            )
        from .solvers import check_multistep_config, multistep_scheduler_name

        multistep = multistep_scheduler_name(
            config, None if isinstance(source, (str, os.PathLike, Mapping)) else source
        )
        if multistep is not None:
            # DPMSolverMultistep/UniPCMultistep: raise on keys fastddpm cannot honour; they never clip x0 (no
            # clip_sample key) and store variance_type None for "no learned variance". Their sampler options
            # (solver_order, use_karras_sigmas, ...) go to fastddpm.solvers.multistep_options_from_diffusers.
            check_multistep_config(multistep, config)
            config.setdefault("clip_sample", False)
            if config.get("variance_type") is None:
                config.pop("variance_type", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        for key in ("num_train_timesteps", "steps_offset"):  # JSON may write 1000 as 1000.0
            if isinstance(kwargs.get(key), float) and kwargs[key].is_integer():
                kwargs[key] = int(kwargs[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready config (loadable by :meth:`from_diffusers` and by diffusers' schedulers)."""
        d = dataclasses.asdict(self)
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d

    # ------------------------------------------------------------------ float64 tables
    @cached_property
    def betas(self) -> torch.Tensor:
        """beta_t, float64 ``[T]``."""
        T = self.num_train_timesteps
        f64 = torch.float64
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=f64)
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=f64)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=f64) ** 2
        elif self.beta_schedule == "squaredcos_cap_v2":
            # Nichol & Dhariwal (2021) eq. 17, betas capped at 0.999.
            def abar(s: float) -> float:
                return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=f64)
        else:  # sigmoid
            betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=f64)) * (self.beta_end - self.beta_start)
            betas = betas + self.beta_start
        if self.rescale_betas_zero_snr:
            # Lin et al. (2023), Algorithm 1: shift and scale sqrt(abar) so the last step has zero SNR.
            abar_sqrt = torch.cumprod(1.0 - betas, 0).sqrt()
            a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
            abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
            abar = abar_sqrt**2
            alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
            betas = 1.0 - alphas
        return betas

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t = prod_{s<=t} (1 - beta_s), float64 ``[T]``."""
        return torch.cumprod(1.0 - self.betas, 0)

    @property
    def final_alphas_cumprod(self) -> float:
        """abar used by DDIM after the last step (1 when ``set_alpha_to_one``, else abar_0)."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def table(self, name: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A float64 table moved to ``device`` in ``dtype``, cached per (name, device, dtype).

        ``name`` is ``"alphas_cumprod"``, ``"betas"`` or ``"q_sample"`` (``[T, 2]`` of
        ``(sqrt(abar), sqrt(1 - abar))``, the forward-noising coefficients of eq. 4).
        """
        key = (name, str(torch.device(device)), dtype)
        cache = self.__dict__.setdefault("_device_tables", {})
        if key not in cache:
            if name == "q_sample":
                ac = self.alphas_cumprod
                t64 = torch.stack([ac.sqrt(), (1.0 - ac).sqrt()], dim=1)
            elif name in ("alphas_cumprod", "betas"):
                t64 = getattr(self, name)
            else:
                raise ValueError(f"unknown table {name!r}; allowed: 'alphas_cumprod', 'betas', 'q_sample'")
            cache[key] = t64.to(device=device, dtype=dtype).contiguous()
        return cache[key]

    # ------------------------------------------------------------------ per-step terms
    def step_terms(self, t: torch.Tensor, prev_t: torch.Tensor, *, final_abar: float = 1.0) -> StepTerms:
        """Float64 terms of the reverse step ``t -> prev_t`` for int64 ``t``, ``prev_t`` of shape ``[B]``.

        ``prev_t < 0`` means the chain's end, where ``abar_prev = final_abar`` (1.0 for DDPM, as
        diffusers; :attr:`final_alphas_cumprod` for DDIM). Runs as device ops with no host sync, so it
        is safe inside CUDA-graph capture.
        """
        ac = self.table("alphas_cumprod", t.device, torch.float64)
        abar_t = ac[t]
        abar_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], torch.full_like(abar_t, final_abar))
        alpha_t = abar_t / abar_prev
        beta_t = 1.0 - alpha_t
        one_m_abar_t = 1.0 - abar_t
        posterior_variance = ((1.0 - abar_prev) / one_m_abar_t * beta_t).clamp(min=1e-20)
        return StepTerms(
            abar_t=abar_t,
            abar_prev=abar_prev,
            alpha_t=alpha_t,
            beta_t=beta_t,
            posterior_variance=posterior_variance,
            mean_coef_x0=abar_prev.sqrt() * beta_t / one_m_abar_t,
            mean_coef_xt=alpha_t.sqrt() * (1.0 - abar_prev) / one_m_abar_t,
            noise_gate=(t > 0).to(torch.float64),
        )

    # ------------------------------------------------------------------ inference timesteps
    def timesteps(
        self,
        num_inference_steps: int | None = None,
        spacing: str | None = None,
        *,
        sampler: Literal["ddpm", "ddim"] = "ddpm",
    ) -> torch.Tensor:
        """Inference ``(t, prev_t)`` pairs as an int64 tensor ``[n, 2]``, first row the first step.

        Args:
            num_inference_steps: number of steps ``n`` (``None``: all ``num_train_timesteps``).
            spacing: ``"leading"``, ``"linspace"``, ``"trailing"`` (diffusers' ``set_timesteps``, with
                ``steps_offset``), or an improved-diffusion respacing string: ``"ddim50"`` (integer stride
                giving exactly 50 steps), ``"250"`` or ``"10,15,20"`` (that many steps spread evenly over
                equal sections of ``[0, T)``). ``None`` uses :attr:`timestep_spacing`.
            sampler: how ``prev_t`` is chosen for the diffusers spacings. ``"ddpm"``: the next entry of the
                list (diffusers' ``DDPMScheduler.previous_timestep``). ``"ddim"``: ``t - T // n`` as
                diffusers' ``DDIMScheduler.step`` does. Respacing strings always use the next kept step.
        ``prev_t = -1`` marks the final step.
        """
        T = self.num_train_timesteps
        spacing = self.timestep_spacing if spacing is None else spacing
        if not isinstance(spacing, str):
            raise TypeError(f"spacing must be a string, got {type(spacing).__name__}")
        if spacing in SPACINGS:
            n = T if num_inference_steps is None else int_arg("num_inference_steps", num_inference_steps)
            if not 1 <= n <= T:
                raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
            if num_inference_steps is None:
                ts = torch.arange(T - 1, -1, -1, dtype=torch.int64)
            elif spacing == "linspace":
                ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0).to(torch.int64)
            elif spacing == "leading":
                ts = (torch.arange(n, dtype=torch.int64) * (T // n)).flip(0) + self.steps_offset
            else:  # trailing
                ts = torch.arange(float(T), 0.0, -T / n, dtype=torch.float64).round().to(torch.int64) - 1
            if sampler == "ddim" and num_inference_steps is not None:
                prev = ts - T // n
            else:
                prev = torch.cat([ts[1:], ts.new_tensor([-1])])
        else:
            kept = sorted(space_timesteps(T, spacing), reverse=True)
            if num_inference_steps is not None and num_inference_steps != len(kept):
                raise ValueError(
                    f"spacing {spacing!r} gives {len(kept)} steps but num_inference_steps={num_inference_steps}"
                )
            ts = torch.tensor(kept, dtype=torch.int64)
            prev = torch.cat([ts[1:], ts.new_tensor([-1])])
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}; allowed: 'ddpm', 'ddim'")
        if int(ts.max()) >= T or int(ts.min()) < 0:
            raise ValueError(
                f"spacing {spacing!r} with steps_offset={self.steps_offset} gives timesteps outside [0, {T})"
            )
        return torch.stack([ts, prev.clamp(min=-1)], dim=1)


def space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """improved-diffusion's respacing (``respace.py``): the set of kept timesteps.

    ``"ddimN"`` keeps ``range(0, T, stride)`` for the integer stride giving exactly N steps;
    ``"a,b,c"`` splits ``[0, T)`` into equal sections and keeps a, b, c evenly spaced steps in them.
    """
    s = section_counts.strip()
    if s.startswith("ddim"):
        try:
            desired = int(s[len("ddim") :])
        except ValueError:
            raise ValueError(f"bad respacing string {section_counts!r}; expected 'ddimN', 'N' or 'N1,N2,...'") from None
        for i in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, i)) == desired:
                return set(range(0, num_timesteps, i))
        raise ValueError(f"cannot make exactly {desired} steps of {num_timesteps} with an integer stride")
    try:
        counts = [int(x) for x in s.split(",")]
    except ValueError:
        allowed = ", ".join(repr(a) for a in SPACINGS)
        raise ValueError(
            f"unknown spacing {section_counts!r}; allowed: {allowed}, or a respacing string 'ddimN', 'N', 'N1,N2,...'"
        ) from None
    if any(c < 1 for c in counts):
        raise ValueError(f"respacing counts must be >= 1, got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)
