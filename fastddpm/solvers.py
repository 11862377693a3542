"""Few-step multistep solvers: DPM-Solver++ (2M, 3M, 2M SDE) and UniPC, as one coefficient table per trajectory.

Every step of these solvers is a linear combination of the current sample, the current and up to three
earlier data predictions (x0), UniPC's previous corrected sample and, for the SDE variant, fresh noise.
:func:`multistep_plan` computes all per-step scalars once, on the host, in float64, into ``coef[S, NMS]``
(columns ``MS_*`` below); a step then reads one row (see /work/notes/MULTISTEP.md and
:func:`reference_multistep_step`, the spec)::

    D0  = CX * x + CM * m                                                   # x0 prediction
    D0  = threshold(D0)                                                     # only with schedule.thresholding
    xc  = KX * x + KXP * xp + KD0 * D0 + KD1 * D1 + KD2 * D2 + KD3 * D3    # UniPC corrector (else KX = 1)
    x'  = PX * xc + PD0 * D0 + PD1 * D1 + PD2 * D2 + PZ * z                # solver update (+ SDE noise)
    x <- x', xp <- xc, D3 <- D2, D2 <- D1, D1 <- D0

The math follows diffusers 0.42.1 ``DPMSolverMultistepScheduler`` (Lu et al. 2022, "DPM-Solver++", eqs. for
the multistep 2M/3M updates in the log-SNR variable lambda = log(alpha / sigma)) and
``UniPCMultistepScheduler`` (Zhao et al. 2023, "UniPC", B(h) = e^h - 1 ("bh2"), data prediction), including
the timestep spacings, Karras sigmas, warm-up orders, ``lower_order_final`` and ``final_sigmas_type``.
As in diffusers, every coefficient and the x0 conversion use the scheduler's sigma list
``sigma = sqrt((1 - abar) / abar)`` (with Karras sigmas: the Karras values, not abar at the rounded timestep).

Deliberate details, each as diffusers does it:

* ``clip_sample`` is not applied: these schedulers have no such option; only ``thresholding`` acts on x0.
* ``rescale_betas_zero_snr``: abar of the last training step is set to 2**-24 (not 0) so its sigma is finite.
* ``dpmpp_*``: the last step is first order when ``final_sigmas_type="zero"`` (its sigma is 0), and the last
  two steps are lower order when ``lower_order_final`` and fewer than 15 steps.
* ``unipc``: with ``lower_order_final`` the order of step i is at most ``S - i`` (any number of steps); the
  corrector of step i uses the order of step i - 1's predictor; there is no corrector after the last step.

* ``dpmpp_3m`` is diffusers' (and the DPM-Solver authors') multistep third-order update. Its
  ``D2 = (D1_0 - D1_1) / (r0 + r1)`` is h^2 D''/2 while its weight ``phi_3`` needs h^2 D'' (Taylor expansion
  of the three history points), so the h^3 term is half right and the method converges at order 2, not 3
  (measured in tests/test_solvers.py; doubling that term gives order 3). Kept for equality with diffusers.

Differences from diffusers, where diffusers fails:

* With a learned variance, diffusers' DPM-Solver keeps the model output's first 3 channels
  (``model_output[:, :3]``); :func:`multistep_sample_reference` keeps the first C channels of a C-sample.
* A zero-length last step (Karras sigmas with ``final_sigmas_type="sigma_min"``: sigma_min to sigma_min) gives
  NaN in diffusers' SDE noise term when float64 rounding makes h = -1e-15; here it is the identity step, as
  in stock (float32) diffusers. Where diffusers' coefficient is NaN/inf (third-order UniPC over that step,
  ``unipc`` with ``lower_order_final=False`` and a zero final sigma, repeated timesteps) the plan raises.
* When the first timesteps repeat (e.g. Karras sigmas on the cosine schedule: 999, 999, ...), diffusers'
  ``index_for_timestep`` starts at step index 1 and fails at the end; the plan runs every step in order.
* DPM-Solver with Karras sigmas on the cosine schedule truncates fractional timesteps (diffusers does not
  round there); stock diffusers' float32 tables give 998.9999 -> 998 where float64 gives 999 -> 999, so
  the model's timestep input can differ by one from stock diffusers in that one configuration.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from . import _layout as L
from .reference import dynamic_threshold
from .schedule import SPACINGS, Schedule

# Columns of the coefficient table (mirrored by fastddpm._layout and the C++/CUDA header; same numbers).
MS_CX = 0  # D0 = CX * x + CM * m
MS_CM = 1
MS_KX = 2  # xc = KX * x + KXP * xp + KD0 * D0 + KD1 * D1 + KD2 * D2 + KD3 * D3
MS_KXP = 3
MS_KD0 = 4
MS_KD1 = 5
MS_KD2 = 6
MS_KD3 = 7
MS_PX = 8  # x' = PX * xc + PD0 * D0 + PD1 * D1 + PD2 * D2 + PZ * z
MS_PD0 = 9
MS_PD1 = 10
MS_PD2 = 11
MS_PZ = 12
NMS = 13

Sampler = Literal["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"]
SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

_F64 = torch.float64


@dataclasses.dataclass(frozen=True)
class MultistepPlan:
    """Everything a multistep trajectory needs, computed once on the host.

    Attributes:
        sampler: one of :data:`SAMPLERS`.
        timesteps: int64 ``[S]``, the model's timestep input at step i (also the SDE noise counter's t).
        coef: float64 ``[S, NMS]``, row i the coefficients of step i (columns ``MS_*``).
        noise: True when some row has ``PZ != 0`` (the SDE variant).
        clip_mode: ``CLIP_THRESHOLD`` when the schedule says ``thresholding``, else ``CLIP_NONE``.
        sigmas: float64 ``[S + 1]``, the scheduler's sigma list (last entry the final sigma).
        orders: int64 ``[S]``, the solver order of step i's update (for inspection and tests).
    """

    sampler: str
    timesteps: torch.Tensor
    coef: torch.Tensor
    noise: bool
    clip_mode: int = L.CLIP_NONE
    sigmas: torch.Tensor | None = None
    orders: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())


# ---------------------------------------------------------------------------------------- sigmas
def _multistep_alphas_cumprod(schedule: Schedule) -> torch.Tensor:
    """abar, float64 ``[T]``, as the multistep schedulers see it (zero-SNR last step set to 2**-24)."""
    ac = schedule.alphas_cumprod.clone()
    if schedule.rescale_betas_zero_snr:
        ac[-1] = 2.0**-24
    return ac


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t``: fractional timestep of ``sigma`` by interpolating ``log_sigmas`` (float64)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Karras et al. (2022) eq. 5 with rho = 7: ``n`` sigmas from ``sigma_max`` down to ``sigma_min``."""
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def multistep_sigmas(
    schedule: Schedule,
    num_inference_steps: int,
    *,
    unipc: bool,
    timestep_spacing: str = "linspace",
    use_karras_sigmas: bool = False,
    final_sigmas_type: str = "zero",
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``set_timesteps`` of the two schedulers: int64 timesteps ``[S]`` and float64 sigmas ``[S + 1]``.

    ``unipc`` selects UniPC's variant of the few places where the two differ (Karras timesteps are always
    rounded; ``final_sigmas_type="sigma_min"`` with Karras takes the last Karras sigma).
    """
    T, n = schedule.num_train_timesteps, num_inference_steps
    _check_choice("timestep_spacing", timestep_spacing, SPACINGS)
    _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    try:
        n = operator.index(n)  # int, numpy or 0-dim torch integer
    except TypeError:
        n = None
    if n is None or isinstance(num_inference_steps, bool) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {num_inference_steps!r}")
    # 1. timesteps (diffusers: lambda_min_clipped = -inf, so the last timestep is T).
    if timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif timestep_spacing == "leading":
        ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].copy().astype(np.int64)
        ts += schedule.steps_offset
    else:  # trailing
        ts = np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1
    # 2. sigmas at those timesteps, or Karras sigmas and their (rounded) timesteps.
    ac = _multistep_alphas_cumprod(schedule).numpy()
    sigmas_all = ((1 - ac) / ac) ** 0.5
    if use_karras_sigmas:
        log_sigmas = np.log(sigmas_all)
        sigmas = _karras_sigmas(float(sigmas_all[0]), float(sigmas_all[-1]), n)
        t_frac = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if unipc or schedule.beta_schedule != "squaredcos_cap_v2":
            t_frac = t_frac.round()
        ts = torch.from_numpy(t_frac).to(torch.int64).numpy()  # truncation, as diffusers' .to(int64)
    else:
        sigmas = np.interp(ts, np.arange(0, len(sigmas_all)), sigmas_all)
    if final_sigmas_type == "zero":
        sigma_last = 0.0
    elif unipc and use_karras_sigmas:
        sigma_last = float(sigmas[-1])
    else:
        sigma_last = float(sigmas_all[0])
    sigmas = np.concatenate([sigmas, [sigma_last]])
    if int(ts.min()) < 0 or int(ts.max()) >= T:
        raise ValueError(
            f"timestep_spacing {timestep_spacing!r} with steps_offset={schedule.steps_offset} gives timesteps "
            f"outside [0, {T})"
        )
    return torch.from_numpy(ts.copy()).to(torch.int64), torch.from_numpy(sigmas).to(_F64)


# ---------------------------------------------------------------------------------------- coefficients
def _alpha_sigma(sig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the VP process with ratio ``sig = sigma_t / alpha_t`` (diffusers' convention)."""
    alpha = 1 / ((sig**2 + 1) ** 0.5)
    return alpha, sig * alpha


def _lambda(sig: torch.Tensor) -> torch.Tensor:
    """Half log-SNR lambda = log(alpha_t) - log(sigma_t); +inf at sigma 0."""
    alpha, sigma = _alpha_sigma(sig)
    return torch.log(alpha) - torch.log(sigma)


def _unit(col: int) -> torch.Tensor:
    """The coefficient row with a single 1 in column ``col``: a stand-in for that column's tensor."""
    e = torch.zeros(NMS, dtype=_F64)
    e[col] = 1.0
    return e


def _x0_columns(prediction_type: str, sig: torch.Tensor) -> tuple[float, float]:
    """(CX, CM) with x0 = CX * x + CM * m at sigma ratio ``sig`` (diffusers' ``convert_model_output``)."""
    alpha, sigma = _alpha_sigma(sig)
    if prediction_type == "epsilon":  # x0 = (x - sigma_t eps) / alpha_t
        return float(1 / alpha), float(-sigma / alpha)
    if prediction_type == "sample":
        return 0.0, 1.0
    return float(alpha), float(-sigma)  # v_prediction: x0 = alpha_t x - sigma_t v


def _sde_std(h: torch.Tensor) -> torch.Tensor:
    """sqrt(1 - e^{-2h}), 0 for h <= 0: with Karras sigmas and final_sigmas_type="sigma_min" the last step
    goes from sigma_min to itself and float64 rounding can make h = -1e-15 (diffusers: NaN in float64; in
    its float32 sigma list the two are equal and h = 0)."""
    return torch.sqrt(torch.clamp(1.0 - torch.exp(-2 * h), min=0.0))


def _dpm_update(sigmas: torch.Tensor, i: int, order: int, sde: bool) -> torch.Tensor:
    """Predictor columns (PX, PD0..PD2, PZ) of DPM-Solver++ step i of the given order (diffusers' updates).

    The formulas are diffusers' ``dpm_solver_first_order_update`` / ``multistep_dpm_solver_second_order_update``
    (midpoint) / ``..._third_order_update`` evaluated with unit rows in place of the tensors, so the result is
    each tensor's coefficient.
    """
    x, m0, m1, m2, z = (_unit(c) for c in (MS_PX, MS_PD0, MS_PD1, MS_PD2, MS_PZ))
    alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
    alpha_s0, sigma_s0 = _alpha_sigma(sigmas[i])
    lambda_t, lambda_s0 = _lambda(sigmas[i + 1]), _lambda(sigmas[i])
    h = lambda_t - lambda_s0
    if order == 1:  # DPM-Solver++ 1 = DDIM (eta 0); SDE: its stochastic counterpart
        if not sde:
            return (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0
        return (
            (sigma_t / sigma_s0 * torch.exp(-h)) * x
            + (alpha_t * (1 - torch.exp(-2.0 * h))) * m0
            + sigma_t * _sde_std(h) * z
        )
    lambda_s1 = _lambda(sigmas[i - 1])
    h_0 = lambda_s0 - lambda_s1
    r0 = h_0 / h
    if order == 2:  # multistep 2M, midpoint: D1 = (m0 - m1) / r0
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        if not sde:
            return (
                (sigma_t / sigma_s0) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            )
        return (
            (sigma_t / sigma_s0 * torch.exp(-h)) * x
            + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
            + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
            + sigma_t * _sde_std(h) * z
        )
    # order 3 (dpmsolver++ only)
    lambda_s2 = _lambda(sigmas[i - 2])
    r1 = (lambda_s1 - lambda_s2) / h
    D0 = m0
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    return (
        (sigma_t / sigma_s0) * x
        - (alpha_t * (torch.exp(-h) - 1.0)) * D0
        + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
        - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
    )


def _unipc_rhs(h: torch.Tensor, rks: list[torch.Tensor], order: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UniPC's (R, b, B_h) for data prediction and B(h) = e^h - 1 (bh2), as diffusers builds them."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = torch.expm1(hh)
    rk = torch.stack([*rks, torch.ones((), dtype=_F64)])
    R, b = [], []
    for k in range(1, order + 1):
        R.append(torch.pow(rk, k - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return torch.stack(R), torch.stack(b), B_h


def _unipc_predictor(sigmas: torch.Tensor, i: int, order: int) -> torch.Tensor:
    """Predictor columns (PX, PD0, PD1, PD2) of UniP-``order`` at step i (diffusers' ``multistep_uni_p_bh_update``)."""
    x, history = _unit(MS_PX), [_unit(MS_PD0), _unit(MS_PD1), _unit(MS_PD2)]
    m0 = history[0]
    alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
    _, sigma_s0 = _alpha_sigma(sigmas[i])
    lambda_s0 = _lambda(sigmas[i])
    h = _lambda(sigmas[i + 1]) - lambda_s0
    rks, D1s = [], []
    for k in range(1, order):
        rk = (_lambda(sigmas[i - k]) - lambda_s0) / h
        rks.append(rk)
        D1s.append((history[k] - m0) / rk)
    R, b, B_h = _unipc_rhs(h, rks, order)
    h_phi_1 = torch.expm1(-h)
    x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if D1s:
        rhos_p = torch.tensor([0.5], dtype=_F64) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_t = x_t - alpha_t * B_h * sum(r * d for r, d in zip(rhos_p, D1s))
    return x_t


def _unipc_corrector(sigmas: torch.Tensor, i: int, order: int) -> torch.Tensor:
    """Corrector columns (KXP, KD0..KD3) of UniC-``order`` at step i (diffusers' ``multistep_uni_c_bh_update``).

    Corrects the predicted x_i from the previous corrected sample xp = x_{i-1}^c, the data predictions
    D1, D2, D3 of steps i-1, i-2, i-3 and D0 = the model's prediction at the predicted x_i.
    """
    x_last, model_t = _unit(MS_KXP), _unit(MS_KD0)
    history = [_unit(MS_KD1), _unit(MS_KD2), _unit(MS_KD3)]
    m0 = history[0]
    alpha_t, sigma_t = _alpha_sigma(sigmas[i])
    _, sigma_s0 = _alpha_sigma(sigmas[i - 1])
    lambda_s0 = _lambda(sigmas[i - 1])
    h = _lambda(sigmas[i]) - lambda_s0
    rks, D1s = [], []
    for k in range(1, order):
        rk = (_lambda(sigmas[i - 1 - k]) - lambda_s0) / h
        rks.append(rk)
        D1s.append((history[k] - m0) / rk)
    R, b, B_h = _unipc_rhs(h, rks, order)
    rhos_c = torch.tensor([0.5], dtype=_F64) if order == 1 else torch.linalg.solve(R, b)
    h_phi_1 = torch.expm1(-h)
    x_t = sigma_t / sigma_s0 * x_last - alpha_t * h_phi_1 * m0
    corr_res = sum((r * d for r, d in zip(rhos_c[:-1], D1s)), torch.zeros(NMS, dtype=_F64))
    return x_t - alpha_t * B_h * (corr_res + rhos_c[-1] * (model_t - m0))


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def multistep_plan(
    schedule: Schedule,
    sampler: str,
    num_inference_steps: int,
    *,
    solver_order: int | None = None,
    timestep_spacing: str = "linspace",
    use_karras_sigmas: bool = False,
    lower_order_final: bool = True,
    final_sigmas_type: str = "zero",
    disable_corrector: tuple[int, ...] = (),
) -> MultistepPlan:
    """The float64 coefficient table of one trajectory of ``sampler`` with ``num_inference_steps`` steps.

    Args:
        schedule: the noise schedule; its ``prediction_type`` sets the x0 columns, ``thresholding`` the clip mode.
        sampler: ``"dpmpp_2m"``, ``"dpmpp_3m"``, ``"dpmpp_2m_sde"`` or ``"unipc"``.
        num_inference_steps: S, the number of model evaluations, in ``[1, num_train_timesteps]``.
        solver_order: only for ``"unipc"``: 1, 2 (default) or 3 (the dpmpp samplers fix their order).
        timestep_spacing, use_karras_sigmas, lower_order_final, final_sigmas_type: diffusers' options of the
            same names and defaults.
        disable_corrector: ``"unipc"`` only: step indices whose following corrector is skipped (diffusers'
            ``disable_corrector``; step i's corrector is skipped when ``i - 1`` is listed).
    Returns:
        :class:`MultistepPlan` with ``timesteps`` int64 ``[S]`` and ``coef`` float64 ``[S, NMS]`` on the CPU.
    """
    _check_choice("sampler", sampler, SAMPLERS)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastddpm Schedule, got {type(schedule).__name__}")
    if sampler == "unipc":
        order = 2 if solver_order is None else solver_order
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3 for 'unipc', got {solver_order!r}")
    else:
        order = 3 if sampler == "dpmpp_3m" else 2
        if solver_order is not None and solver_order != order:
            raise ValueError(f"solver_order={solver_order!r} contradicts sampler {sampler!r} (order {order})")
        if disable_corrector:
            raise ValueError(f"disable_corrector applies to 'unipc' only, not {sampler!r}")
    ts, sigmas = multistep_sigmas(
        schedule,
        num_inference_steps,
        unipc=sampler == "unipc",
        timestep_spacing=timestep_spacing,
        use_karras_sigmas=bool(use_karras_sigmas),
        final_sigmas_type=final_sigmas_type,
    )
    S = ts.numel()
    coef = torch.zeros(S, NMS, dtype=_F64)
    orders = torch.zeros(S, dtype=torch.int64)
    prev_order = 0
    for i in range(S):
        coef[i, MS_CX], coef[i, MS_CM] = _x0_columns(schedule.prediction_type, sigmas[i])
        warm = min(i, order)  # diffusers' lower_order_nums at step i
        if sampler == "unipc":
            # Corrector for the previous step's prediction (order of that predictor), then UniP.
            if i > 0 and (i - 1) not in disable_corrector:
                coef[i, MS_KX : MS_KD3 + 1] = _unipc_corrector(sigmas, i, prev_order)[MS_KX : MS_KD3 + 1]
            else:
                coef[i, MS_KX] = 1.0
            p = min(order, S - i) if lower_order_final else order
            p = min(p, warm + 1)
            if sigmas[i + 1] == 0 and p > 1:
                raise ValueError(
                    "unipc with lower_order_final=False and final_sigmas_type='zero' has an infinite last-step "
                    "coefficient (diffusers returns NaN there); use lower_order_final=True or 'sigma_min'"
                )
            coef[i, MS_PX : MS_PZ + 1] = _unipc_predictor(sigmas, i, p)[MS_PX : MS_PZ + 1]
            prev_order = p
        else:
            last = i == S - 1 and ((lower_order_final and S < 15) or final_sigmas_type == "zero")
            second = i == S - 2 and lower_order_final and S < 15
            if warm < 1 or last:
                p = 1
            elif order == 2 or warm < 2 or second:
                p = 2
            else:
                p = 3
            coef[i, MS_KX] = 1.0
            coef[i, MS_PX : MS_PZ + 1] = _dpm_update(sigmas, i, p, sampler == "dpmpp_2m_sde")[MS_PX : MS_PZ + 1]
        orders[i] = p
    if not bool(torch.isfinite(coef).all()):
        row, col = (~torch.isfinite(coef)).nonzero()[0].tolist()
        raise ValueError(
            f"{sampler}: coefficient (step {row}, column {col}) is not finite; timesteps {ts.tolist()} repeat a "
            "sigma (e.g. a zero-length last step: Karras sigmas with final_sigmas_type='sigma_min') or the schedule has "
            "abar = 0 or 1 there"
        )
    return MultistepPlan(
        sampler=sampler,
        timesteps=ts,
        coef=coef,
        noise=bool((coef[:, MS_PZ] != 0).any()),
        clip_mode=L.CLIP_THRESHOLD if schedule.thresholding else L.CLIP_NONE,
        sigmas=sigmas,
        orders=orders,
    )


# ---------------------------------------------------------------------------------------- diffusers configs
MULTISTEP_SCHEDULERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
_OFF = (False, None)
# Config keys whose value changes the math, and the values fastddpm follows (diffusers' own aliases included:
# DPM-Solver maps solver_type logrho/bh1/bh2 to midpoint and algorithm_type deis to dpmsolver++; UniPC maps
# midpoint/heun/logrho to bh2). Any other value cannot be honoured.
_HONOURED: dict[str, dict[str, tuple]] = {
    "DPMSolverMultistepScheduler": {
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++", "deis"),
        "solver_type": ("midpoint", "logrho", "bh1", "bh2"),
        "solver_order": (2, 3),
        "euler_at_final": _OFF,
        "use_exponential_sigmas": _OFF,
        "use_beta_sigmas": _OFF,
        "use_lu_lambdas": _OFF,
        "use_flow_sigmas": _OFF,
        "use_dynamic_shifting": _OFF,
        "lambda_min_clipped": (-float("inf"),),
        "final_sigmas_type": FINAL_SIGMAS_TYPES,
    },
    "UniPCMultistepScheduler": {
        "predict_x0": (True,),
        "solver_type": ("bh2", "midpoint", "heun", "logrho"),
        "solver_order": (1, 2, 3),
        "solver_p": (None,),
        "use_exponential_sigmas": _OFF,
        "use_beta_sigmas": _OFF,
        "use_flow_sigmas": _OFF,
        "use_dynamic_shifting": _OFF,
        "sigma_min": (None,),
        "sigma_max": (None,),
        "shift_terminal": _OFF,
        "final_sigmas_type": FINAL_SIGMAS_TYPES,
    },
}


def multistep_scheduler_name(config: Mapping[str, Any], source: object = None) -> str | None:
    """``"DPMSolverMultistepScheduler"``, ``"UniPCMultistepScheduler"`` or None for another scheduler's config.

    Uses ``_class_name`` (saved configs), else the source object's class, else a key only that scheduler has.
    """
    name = config.get("_class_name") or (type(source).__name__ if source is not None else None)
    if name in MULTISTEP_SCHEDULERS:
        return name
    if name is None or name in ("dict", "FrozenDict"):
        if "algorithm_type" in config:
            return "DPMSolverMultistepScheduler"
        if "predict_x0" in config:
            return "UniPCMultistepScheduler"
    return None


def check_multistep_config(name: str, config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming every key of a DPM-Solver/UniPC config whose value fastddpm cannot honour."""
    bad = [
        f"{key}={config[key]!r} (fastddpm follows {', '.join(repr(v) for v in allowed)})"
        for key, allowed in _HONOURED[name].items()
        if key in config and config[key] not in allowed
    ]
    if name == "DPMSolverMultistepScheduler" and config.get("algorithm_type") == "sde-dpmsolver++":
        if config.get("solver_order", 2) != 2:
            bad.append(f"solver_order={config['solver_order']!r} with sde-dpmsolver++ (fastddpm has dpmpp_2m_sde only)")
    if bad:
        raise ValueError(f"{name} config: fastddpm cannot honour " + "; ".join(bad))


def multistep_options_from_diffusers(source: Any) -> dict[str, Any]:
    """The :func:`multistep_plan` keyword arguments (``sampler`` included) of a DPM-Solver/UniPC scheduler.

    ``source`` is the scheduler object, its ``.config`` or a dict. The schedule itself comes from
    :meth:`fastddpm.schedule.Schedule.from_diffusers`; keys neither can honour raise ``ValueError``.
    """
    config = dict(source.config) if hasattr(source, "config") and isinstance(source.config, Mapping) else source
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a diffusers scheduler, its .config or a dict; got {type(source).__name__}")
    name = multistep_scheduler_name(config, None if isinstance(source, Mapping) else source)
    if name is None:
        raise ValueError(f"not a DPMSolverMultistepScheduler/UniPCMultistepScheduler config: {sorted(config)}")
    check_multistep_config(name, config)
    order = int(config.get("solver_order", 2))
    opts: dict[str, Any] = {
        "timestep_spacing": config.get("timestep_spacing", "linspace"),
        "use_karras_sigmas": bool(config.get("use_karras_sigmas", False)),
        "lower_order_final": bool(config.get("lower_order_final", True)),
        "final_sigmas_type": config.get("final_sigmas_type", "zero"),
    }
    if name == "UniPCMultistepScheduler":
        opts.update(sampler="unipc", solver_order=order, disable_corrector=tuple(config.get("disable_corrector") or ()))
    elif config.get("algorithm_type") == "sde-dpmsolver++":
        opts["sampler"] = "dpmpp_2m_sde"
    else:
        opts["sampler"] = "dpmpp_3m" if order == 3 else "dpmpp_2m"
    return opts


# ---------------------------------------------------------------------------------------- reference step
class MultistepState(NamedTuple):
    """Device state of a multistep trajectory, each the sample's shape: x, xp (previous corrected sample) and
    D1, D2, D3 (data predictions of the last three steps, zero before they exist)."""

    x: torch.Tensor
    xp: torch.Tensor
    d1: torch.Tensor
    d2: torch.Tensor
    d3: torch.Tensor

    @classmethod
    def initial(cls, x_T: torch.Tensor) -> MultistepState:
        z = torch.zeros_like(x_T)
        return cls(x_T, z, z, z, z)


def reference_multistep_step(
    state: MultistepState,
    model_output: torch.Tensor,
    row: torch.Tensor,
    schedule: Schedule,
    *,
    clip_mode: int = L.CLIP_NONE,
    noise: torch.Tensor | None = None,
) -> MultistepState:
    """One multistep update in plain PyTorch: the spec every fused backend matches.

    Args:
        state: current :class:`MultistepState` (float32 or float64; the arithmetic runs in that dtype).
        model_output: the model's output at ``state.x``, the sample's shape (C channels).
        row: ``coef[i]``, ``[NMS]`` (any float dtype; cast to the state's dtype).
        schedule: gives the dynamic-thresholding parameters.
        clip_mode: ``CLIP_NONE``, ``CLIP_RANGE`` or ``CLIP_THRESHOLD`` (plans give NONE or THRESHOLD).
        noise: standard normal z of the sample's shape; required when ``row[MS_PZ] != 0``.
    Returns:
        the next :class:`MultistepState`.
    """
    x, xp, d1, d2, d3 = state
    c = row.to(device=x.device, dtype=x.dtype)
    m = model_output.to(x.dtype)
    # 1. data prediction x0 from the model output (eps / sample / v), then thresholding.
    d0 = c[MS_CX] * x + c[MS_CM] * m
    if clip_mode == L.CLIP_THRESHOLD:
        s = dynamic_threshold(d0, schedule.dynamic_thresholding_ratio, schedule.sample_max_value)
        s = s.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        d0 = torch.clamp(d0, -s, s) / s
    elif clip_mode == L.CLIP_RANGE:
        d0 = d0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    elif clip_mode != L.CLIP_NONE:
        raise ValueError(f"unknown clip_mode {clip_mode!r}; allowed: CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD")
    # 2. UniPC corrector of the previous step's prediction (identity row for DPM-Solver).
    xc = c[MS_KX] * x + c[MS_KXP] * xp + c[MS_KD0] * d0 + c[MS_KD1] * d1 + c[MS_KD2] * d2 + c[MS_KD3] * d3
    # 3. solver update from the (corrected) sample and the data predictions, plus the SDE noise.
    x_next = c[MS_PX] * xc + c[MS_PD0] * d0 + c[MS_PD1] * d1 + c[MS_PD2] * d2
    if bool(row[MS_PZ] != 0):
        if noise is None:
            raise ValueError("noise is required: this row has a noise coefficient (PZ != 0)")
        x_next = x_next + c[MS_PZ] * noise.to(x.dtype)
    return MultistepState(x_next, xc, d0, d1, d2)


def multistep_sample_reference(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: Schedule,
    x_T: torch.Tensor,
    plan: MultistepPlan,
    noise_fn: Callable[[int, int], torch.Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``plan`` from ``x_T`` with :func:`reference_multistep_step` (a plain loop, for tests).

    Args:
        model_fn: ``(x [B, C, ...], t int64 [B]) -> model output`` (C channels, or 2C with a learned variance:
            the first C are kept).
        schedule: the schedule the plan was made for.
        x_T: starting noise ``[B, C, ...]``.
        plan: from :func:`multistep_plan`.
        noise_fn: ``(step i, timestep t) -> z`` of x_T's shape, for plans with noise.
        dtype: arithmetic dtype (default x_T's; float32 or float64).
        return_trajectory: also return the list of samples after each step.
    Returns:
        the final sample (``dtype``), and the trajectory ``[x_1, ..., x_S]`` if asked.
    """
    if plan.noise and noise_fn is None:
        raise ValueError(f"plan {plan.sampler!r} adds noise: pass noise_fn")
    dtype = x_T.dtype if dtype is None else dtype
    state = MultistepState.initial(x_T.to(dtype))
    coef = plan.coef.to(dtype)
    traj = []
    c = x_T.shape[1]
    for i, t in enumerate(plan.timesteps.tolist()):
        tb = torch.full((x_T.shape[0],), t, dtype=torch.int64, device=x_T.device)
        m = model_fn(state.x, tb)[:, :c]
        z = noise_fn(i, t) if bool(plan.coef[i, MS_PZ] != 0) else None
        state = reference_multistep_step(state, m, coef[i], schedule, clip_mode=plan.clip_mode, noise=z)
        traj.append(state.x)
    return (state.x, traj) if return_trajectory else state.x
