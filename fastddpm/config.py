"""``SamplingConfig``: one typed, frozen description of a sampling run.

``fastddpm.sample``, ``iter_batches``, the sharded writer and the ``fastddpm sample`` command all build one
and pass it on, and a shard manifest records it whole (:meth:`SamplingConfig.to_dict`), so an option can
never reach one path and be dropped on another. The CLI parses its flags into a config and stops there.

Every value is checked when the config is made; an unknown value raises ``ValueError`` naming the field
and listing what is allowed. Options that only some samplers read (``eta`` for DDIM, the multistep
solvers' settings) raise when set away from their default for a sampler that would ignore them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import operator
import re
from collections.abc import Callable
from typing import Any

import torch

from .driver import MULTISTEP_SAMPLERS  # the few-step solvers (issue 11); their options are read by these only

CUDA_GRAPH_MODES = ("auto", "on", "off")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SOLVER_ORDERS = (1, 2, 3)
DIFFUSERS_SPACINGS = ("leading", "linspace", "trailing")
_RESPACING = re.compile(r"ddim\d+|\d+(,\d+)*")
SEED_LIMIT = 1 << 64  # seeds are unsigned 64-bit keys of the counter-based generator

# Options read by some samplers only: a non-default value with any other sampler is an error, never ignored.
ONLY_FOR = {
    "eta": ("ddim",),
    "use_clipped_model_output": ("ddim",),
    "solver_order": MULTISTEP_SAMPLERS,
    "use_karras_sigmas": MULTISTEP_SAMPLERS,
    "lower_order_final": MULTISTEP_SAMPLERS,
    "final_sigmas_type": MULTISTEP_SAMPLERS,
}


class ConfigError(ValueError):
    """A :class:`SamplingConfig` value that is not allowed; ``field`` names the field (the CLI maps it to its flag)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def registered_samplers() -> tuple[str, ...]:
    """The sampler names ``fastddpm.sampling`` implements (read each time: the registry can grow)."""
    from . import sampling

    return tuple(sampling.SAMPLERS)


def _choices(allowed: tuple[Any, ...]) -> str:
    return ", ".join(repr(a) for a in allowed)


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high)``; bools, floats and strings are refused, numpy ints taken."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if v < low or (high is not None and v >= high):
        top = f"2**{high.bit_length() - 1}" if high is not None and high & (high - 1) == 0 else high
        bound = f"in [{low}, {top})" if high is not None else f">= {low}"
        raise ConfigError(name, f"{name} must be {bound}, got {v}")
    return v


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _dtype_name(value: Any) -> str:
    if value is None:
        return "float32"
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if value not in DTYPES:
        raise ConfigError(
            "dtype", f"unknown dtype {value!r}; allowed: {_choices(DTYPES)} (or the torch dtypes, or None)"
        )
    return value


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Everything that decides how a run samples (the model, schedule and image count aside).

    Attributes:
        sampler: a name of ``fastddpm.sampling.SAMPLERS`` (``"ddpm"``, ``"ddim"``, ``"x0"``, ...).
        num_inference_steps: steps (``None``: every training timestep). ``"x0"`` is one model evaluation at
            ``t = T - 1``: ``None`` or ``1`` only.
        timestep_spacing: ``"leading"``, ``"linspace"``, ``"trailing"``, a respacing string (``"ddim50"``,
            ``"250"``, ``"10,15,20"``) or ``None`` (the schedule's own).
        eta: DDIM's noise scale (``ddim`` only), finite and ``>= 0``.
        use_clipped_model_output: DDIM only: re-derive epsilon from the clipped x0.
        seed: key of the counter-based noise, an int in ``[0, 2**64)``.
        batch_size: images per batch (``None``: all at once).
        dtype: precision of the model under autocast: ``"auto"`` (the default: float32, or bf16 autocast on
            a CPU with native bf16 where it is measured faster; see :mod:`fastddpm.autodtype`, resolved by
            :func:`fastddpm.sampling.resolve_auto_dtype` before sampling), ``"float32"`` (no autocast),
            ``"bfloat16"`` or ``"float16"``; a ``torch.dtype`` or ``None`` (float32) is accepted and stored by name.
        cuda_graph: ``"auto"`` (capture on CUDA, eager elsewhere), ``"on"`` (require it), ``"off"``;
            ``True``/``False`` are stored as ``"on"``/``"off"``.
        steps_per_graph: steps captured per CUDA graph (same images, fewer launches).
        backend: fused step backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``.
        shape: ``(C, H, W)`` of one sample, or ``None`` to read it from the model's config.
        solver_order, use_karras_sigmas, lower_order_final, final_sigmas_type: the multistep solvers'
            options, with diffusers' names and defaults (``None`` order: the sampler's own).
    """

    sampler: str = "ddpm"
    num_inference_steps: int | None = None
    timestep_spacing: str | None = None
    eta: float = 0.0
    use_clipped_model_output: bool = False
    seed: int = 0
    batch_size: int | None = None
    dtype: str = "auto"
    cuda_graph: str = "auto"
    steps_per_graph: int = 1
    backend: str = "auto"
    shape: tuple[int, int, int] | None = None
    solver_order: int | None = None
    use_karras_sigmas: bool = False
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        samplers = registered_samplers()
        if self.sampler not in samplers:
            raise ConfigError("sampler", f"unknown sampler {self.sampler!r}; allowed: {_choices(samplers)}")
        if self.num_inference_steps is not None:
            put("num_inference_steps", _int("num_inference_steps", self.num_inference_steps, 1))
        if self.sampler == "x0" and self.num_inference_steps not in (None, 1):
            raise ConfigError(
                "num_inference_steps",
                f"the x0 sampler is one model evaluation (x0 predicted from x_T at t = T - 1); "
                f"num_inference_steps must be None or 1, got {self.num_inference_steps}",
            )
        spacing = self.timestep_spacing
        if spacing is not None and (not isinstance(spacing, str) or not (
                spacing in DIFFUSERS_SPACINGS or _RESPACING.fullmatch(spacing))):  # fmt: skip
            raise ConfigError(
                "timestep_spacing",
                f"unknown timestep_spacing {spacing!r}; allowed: {_choices(DIFFUSERS_SPACINGS)}, None, or a "
                "respacing string such as 'ddim50', '250' or '10,15,20'",
            )
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta):
            raise ConfigError("eta", f"eta must be a finite number >= 0, got {self.eta!r}")
        if self.eta < 0:
            raise ConfigError("eta", f"eta must be a finite number >= 0, got {self.eta!r}")
        put("eta", float(self.eta))
        _bool("use_clipped_model_output", self.use_clipped_model_output)
        put("seed", _int("seed", self.seed, 0, SEED_LIMIT))
        if self.batch_size is not None:
            put("batch_size", _int("batch_size", self.batch_size, 1))
        put("dtype", _dtype_name(self.dtype))
        graph = {True: "on", False: "off"}.get(self.cuda_graph, self.cuda_graph) if isinstance(
            self.cuda_graph, bool) else self.cuda_graph  # fmt: skip
        if graph not in CUDA_GRAPH_MODES:
            raise ConfigError(
                "cuda_graph",
                f"unknown cuda_graph {self.cuda_graph!r}; allowed: {_choices(CUDA_GRAPH_MODES)}, True, False",
            )
        put("cuda_graph", graph)
        put("steps_per_graph", _int("steps_per_graph", self.steps_per_graph, 1))
        from .dispatch import BACKENDS

        if self.backend not in BACKENDS:
            raise ConfigError("backend", f"unknown backend {self.backend!r}; allowed: {_choices(BACKENDS)}")
        if self.shape is not None:
            if isinstance(self.shape, (str, bytes)) or not hasattr(self.shape, "__len__") or len(self.shape) != 3:
                raise ConfigError("shape", f"shape must be (C, H, W), got {self.shape!r}")
            put("shape", tuple(_int("shape", s, 1) for s in self.shape))
        if self.solver_order is not None:
            order = _int("solver_order", self.solver_order, 1)
            if order not in SOLVER_ORDERS:
                raise ConfigError(
                    "solver_order", f"solver_order must be one of {_choices(SOLVER_ORDERS)} or None, got {order}"
                )
            put("solver_order", order)
        _bool("use_karras_sigmas", self.use_karras_sigmas)
        _bool("lower_order_final", self.lower_order_final)
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ConfigError(
                "final_sigmas_type",
                f"unknown final_sigmas_type {self.final_sigmas_type!r}; allowed: {_choices(FINAL_SIGMAS_TYPES)}",
            )
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, users in ONLY_FOR.items():
            if getattr(self, name) != defaults[name] and self.sampler not in users:
                raise ConfigError(
                    name,
                    f"{name}={getattr(self, name)!r} has no effect with sampler {self.sampler!r}; it applies to "
                    f"{', '.join(users)} only (leave it at {defaults[name]!r})",
                )

    # ----------------------------------------------------------------------------------- derived
    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype`` (``"auto"`` must have been resolved first)."""
        if self.dtype == "auto":
            raise ValueError("dtype='auto' is resolved per model and device: call fastddpm.sampling.resolve_auto_dtype")
        return getattr(torch, self.dtype)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the model runs under autocast, ``None`` for plain float32."""
        return None if self.dtype == "float32" else self.torch_dtype

    # ---------------------------------------------------------------------------------- JSON, diff
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (``shape`` as a list); :meth:`from_dict` inverts it."""
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingConfig:
        """A config from :meth:`to_dict`'s output; an unknown key raises ``ValueError`` listing the fields."""
        if not isinstance(data, dict):
            raise TypeError(f"a SamplingConfig is read from a dict, got {type(data).__name__}")
        names = field_names()
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(
                f"unknown SamplingConfig field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(names)}"
            )
        kwargs = dict(data)
        if kwargs.get("shape") is not None:
            kwargs["shape"] = tuple(kwargs["shape"])
        return cls(**kwargs)

    def diff(self, other: SamplingConfig) -> list[str]:
        """Names of the fields whose values differ between ``self`` and ``other``, in field order."""
        return [n for n in field_names() if getattr(self, n) != getattr(other, n)]

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def field_names() -> tuple[str, ...]:
    """The field names of :class:`SamplingConfig`, in order."""
    return tuple(f.name for f in dataclasses.fields(SamplingConfig))


def takes_config(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Let ``fn`` take its run options as keywords *or* whole as ``config=``, never both.

    ``fn`` declares every :class:`SamplingConfig` field it takes as a keyword (same name, same default) and a
    ``config`` keyword. The wrapper builds one config from the keywords given (or takes ``config=``, and
    then refuses any of those keywords) and calls ``fn`` with ``config`` set and the field keywords left at
    their defaults: ``fn``'s body reads ``config`` only.
    """
    sig = inspect.signature(fn)
    fields = set(field_names())
    names = [n for n in sig.parameters if n in fields]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        config = bound.arguments.pop("config", None)
        given = [n for n in names if n in bound.arguments]
        if config is None:
            config = SamplingConfig(**{n: bound.arguments.pop(n) for n in given})
        elif not isinstance(config, SamplingConfig):
            raise TypeError(f"{fn.__name__}(): config must be a SamplingConfig, got {type(config).__name__}")
        elif given:
            raise TypeError(
                f"{fn.__name__}() got {', '.join(given)} both as keyword and in config=; pass each option once "
                "(config.replace(...) makes a changed copy)"
            )
        bound.arguments["config"] = config
        return fn(*bound.args, **bound.kwargs)

    return wrapper
