"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", Algorithm 2): halve a model's number of deterministic DDIM steps per round.

Round ``r`` turns a teacher sampled with ``2N`` DDIM (eta 0) steps into a student sampled with ``N``:

1. The student starts as a copy of the teacher (round 1: of the given teacher, or the ``student`` passed in).
2. Each optimizer step draws ``x0`` from the data (the seeded order of :func:`fastddpm.train`), a grid index
   ``i ~ U{0..N-1}`` giving ``(t, t', t'')`` = the student's step ``t -> t''`` and its midpoint ``t'`` on the
   teacher's grid, and ``x_t = q_sample(x0, t)`` with counter-based noise keyed by the example's global counter.
3. Target: two teacher DDIM steps ``x_t -> x_t' -> x_t''`` (:func:`fastddpm.ddim_step`, the teacher's schedule
   as it samples, clipping included), then the ``x0`` for which ONE student DDIM step ``t -> t''`` lands on
   ``x_t''`` (Algorithm 2): ``x~ = (x_t'' - (s''/s) x_t) / (a'' - (s''/s) a)``, ``a = sqrt(abar_t)``,
   ``s = sqrt(1 - abar_t)``.
4. Loss ``max(SNR_t, 1) * mean((x^ - x~)^2)`` ("truncated SNR" weighting, paper section 4), ``x^`` the
   student's prediction converted to ``x0``; AdamW, gradient clipping, linear warm-up then linear decay to 0
   over the round, EMA. The round's EMA student is the next round's teacher.

Timestep grid: the ``N``-step grid is ``Schedule.timesteps(N, "trailing", sampler="ddpm")`` -- diffusers'
"trailing" spacing, so the first step starts at ``T - 1`` (pure noise, as the paper's ``t = 1``), with
``prev_t`` the next grid point and ``-1`` (``abar = 1``) after the last. The ``N``-grid is every other point
of the ``2N``-grid, so the student's step spans exactly two teacher steps. When ``N`` divides ``T`` this is
also what ``fastddpm.sample(sampler="ddim", timestep_spacing="trailing")`` uses (``prev_t = t - T // N``).

Parametrisation: the student predicts ``v`` by default (``prediction_type="v_prediction"``), as the paper
recommends: an epsilon-predicting network cannot make a one-step sample (``x0 = (x_t - s eps) / a`` with
``a = 0.006`` at ``t = T - 1`` amplifies its errors 150-fold). An epsilon teacher's weights still initialise
the student, so round 1 also teaches the network the new output; ``prediction_type="epsilon"`` keeps the
teacher's. The student's schedule is the teacher's with that ``prediction_type``, ``clip_sample=False`` and
no thresholding (the target ``x~`` may leave ``[-1, 1]``; clipping it would break the two-step match) and
``timestep_spacing="trailing"``.

On disk (``out_dir``): each round's EMA student as a fastddpm checkpoint in ``round_<r>_<N>steps/``
(``config.json``, ``model.safetensors``, ``scheduler_config.json``, ``sampling.json`` naming the sampler, step
count and spacing), and ``distill_state.pt`` + ``distill_log.jsonl`` to resume (every ``save_every`` steps,
at each round's end and at ``stop_after``). Under ``torch.distributed`` every rank draws the same global
batch and takes its slice, as :func:`fastddpm.train` does; rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import __version__
from .data import load_dataset
from .distill_math import (
    distillation_target,
    predicted_x0,
    round_timesteps,
    student_grid,
    student_schedule,
    target_from_two_steps,
    truncated_snr_weight,
)
from .distributed import barrier
from .noise import check_seed
from .ops import q_sample
from .registry import load_model
from .sampling import model_call
from .schedule import LEARNED_VARIANCES, Schedule
from .shards import model_fingerprint
from .training import (
    SCHEDULER_NAME,
    _atomic_write_bytes,
    _check_data,
    _check_positive,
    _cpu_state,
    _DataOrder,
    _derive_seed,
    _has_dropout,
    _image_size,
    _open_log,
    _place_data,
    _resolve_device,
    _world,
)
from .unet import UNet

__all__ = [
    "DISTILL_STATE_NAME",
    "DISTILL_LOG_NAME",
    "SAMPLING_NAME",
    "DistillResult",
    "RoundResult",
    "distill",
    "distillation_target",
    "predicted_x0",
    "round_dir_name",
    "round_timesteps",
    "student_grid",
    "student_schedule",
    "target_from_two_steps",
    "truncated_snr_weight",
]

DISTILL_STATE_NAME = "distill_state.pt"
DISTILL_LOG_NAME = "distill_log.jsonl"
SAMPLING_NAME = "sampling.json"
_STATE_FORMAT = 1


# ----------------------------------------------------------------------------- results and files
@dataclass
class RoundResult:
    """One finished round: its 1-based ``index``, EMA student ``model`` (eval mode), ``student_steps`` (N), its
    checkpoint ``out_dir`` (or None), the mean loss of its last ``min(100, steps)`` steps run by this call
    (None if it ran none here) and this call's seconds in it."""

    index: int
    model: nn.Module
    teacher_steps: int
    student_steps: int
    out_dir: Path | None
    final_loss: float | None
    seconds: float


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        model: the last finished round's EMA student (eval mode); the teacher if no round finished.
        schedule: the student schedule (sample ``model`` with ``sampler="ddim"``, ``eta=0``, ``steps``).
        steps: the sampling steps of ``model``.
        rounds: the rounds finished by this call.
        step: global optimizer steps done (``round_index * steps_per_round + step_in_round``), all calls.
        start_step: the global step this call started from.
        losses: per-step global-batch losses of this call.
        seconds: wall time of this call's optimizer loop (teacher steps included).
        finished: every round is done (False when ``stop_after`` ended the call early).
    """

    model: nn.Module
    schedule: Schedule
    steps: int
    rounds: list[RoundResult] = field(default_factory=list)
    step: int = 0
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = True


def round_dir_name(index: int, student_steps: int) -> str:
    """Directory of round ``index``'s (1-based) student: ``round_<index>_<steps>steps``."""
    return f"round_{index}_{student_steps}steps"


def _sampling_config(schedule: Schedule, steps: int, teacher_steps: int) -> dict[str, Any]:
    return {
        "num_inference_steps": steps,
        "sampler": "ddim",
        "eta": 0.0,
        "timestep_spacing": "trailing",
        "prev_timestep": "next_grid_point",
        "note": (
            f"progressive-distillation student of a {teacher_steps}-step DDIM teacher: sample with DDIM, eta 0, "
            f"{steps} steps on the 'trailing' grid, each step ending at the next grid point "
            f"(Schedule.timesteps({steps}, 'trailing', sampler='ddpm'); equal to diffusers' DDIM prev_t = "
            f"t - T // {steps} because {steps} "
            + ("divides" if schedule.num_train_timesteps % steps == 0 else "does NOT divide")
            + f" T = {schedule.num_train_timesteps})"
        ),
    }


def _save_round(path: Path, ema: nn.Module, schedule: Schedule, steps: int, teacher_steps: int) -> None:
    T = schedule.num_train_timesteps
    if T % steps:
        warnings.warn(
            f"the {steps}-step student in {path} was trained on the nested trailing grid (prev_t = the next grid "
            f"point), but {steps} does not divide T = {T}, so fastddpm.sample(sampler='ddim') steps to "
            f"prev_t = t - {T // steps} instead; its sampling.json says 'prev_timestep': 'next_grid_point'. Sample "
            f"it exactly with the pairs of fastddpm.distill_math.student_grid(schedule, {steps})",
            stacklevel=4,
        )
    path.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(path)
    sched = json.dumps({"_class_name": "DDPMScheduler", **schedule.to_dict()}, indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(path / SCHEDULER_NAME, lambda p: p.write_text(sched, encoding="utf-8"))
    text = json.dumps(_sampling_config(schedule, steps, teacher_steps), indent=2) + "\n"
    _atomic_write_bytes(path / SAMPLING_NAME, lambda p: p.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------- checks
def _check_steps(from_steps: Any, to_steps: Any, T: int) -> list[int]:
    """The student step counts of the rounds: ``[from/2, from/4, ..., to]``."""
    _check_positive("from_steps", from_steps, integer=True)
    _check_positive("to_steps", to_steps, integer=True)
    if from_steps < 2 or from_steps > T:
        raise ValueError(
            f"from_steps must be in [2, {T}] (the teacher's DDIM steps, at most T = {T}), got {from_steps}"
        )
    if to_steps >= from_steps:
        raise ValueError(f"to_steps must be smaller than from_steps ({from_steps}), got {to_steps}")
    ratio = from_steps // to_steps
    if from_steps % to_steps or ratio & (ratio - 1):
        raise ValueError(
            f"to_steps must be from_steps / 2**k (each round halves the steps): {from_steps} / {to_steps} is "
            f"{from_steps / to_steps:g}; possible to_steps: "
            + ", ".join(
                str(from_steps >> k) for k in range(1, 64) if from_steps >> k and (from_steps >> k) << k == from_steps
            )
        )
    plan, n = [], from_steps
    while n > to_steps:
        n //= 2
        plan.append(n)
    return plan


def _check_teacher(teacher: nn.Module, schedule: Schedule) -> None:
    if schedule.variance_type in LEARNED_VARIANCES:
        raise ValueError(
            f"the teacher has a learned variance (variance_type={schedule.variance_type!r}); progressive "
            "distillation matches deterministic DDIM steps and trains a mean-only student: give a teacher with a "
            "fixed variance"
        )
    cfg = getattr(teacher, "config", None)
    if isinstance(teacher, UNet) and cfg.out_channels != cfg.in_channels:
        raise ValueError(
            f"the teacher outputs {cfg.out_channels} channels for {cfg.in_channels} input channels (a learned-"
            "variance model?); distillation needs out_channels == in_channels"
        )


def _check_generic_data(data: torch.Tensor) -> None:
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.dim() < 2 or data.shape[0] == 0:
        raise ValueError("data must be a non-empty float tensor [N, ...] in [-1, 1]")
    lo, hi = float(data.min()), float(data.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(f"data must be finite and in [-1, 1]; got values in [{lo}, {hi}]")


def _load_state(out_path: Path | None, resume: bool) -> dict[str, Any] | None:
    if not resume:
        if out_path is not None and (out_path / DISTILL_STATE_NAME).is_file():
            raise FileExistsError(
                f"{out_path} already holds a distillation run ({DISTILL_STATE_NAME}); pass resume=True (--resume) "
                "to continue it or choose another directory"
            )
        return None
    if out_path is None:
        raise ValueError(f"resume=True needs out_dir (the directory holding {DISTILL_STATE_NAME})")
    if not (out_path / DISTILL_STATE_NAME).is_file():
        raise FileNotFoundError(f"cannot resume: {out_path / DISTILL_STATE_NAME} does not exist")
    state = torch.load(out_path / DISTILL_STATE_NAME, map_location="cpu", weights_only=True)
    if state.get("format") != _STATE_FORMAT:
        raise ValueError(
            f"{out_path / DISTILL_STATE_NAME} has format {state.get('format')!r}, expected {_STATE_FORMAT}"
        )
    return state


# ----------------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """What every round of one :func:`distill` call shares."""

    plan: list[int]
    s_sched: Schedule
    data: torch.Tensor
    device: torch.device
    rank: int
    world: int
    lo: int
    local: int
    batch_size: int
    stop_at: int
    lr: float
    weight_decay: float
    grad_clip: float | None
    ema_decay: float
    warmup: int
    seed: int
    backend: str
    log_every: int
    save_every: int | None
    out_path: Path | None
    bar: Any
    log_file: Any
    t_start: float
    result: DistillResult
    meta: dict[str, Any]


def _run_round(
    c: _Run, r: int, teacher: nn.Module, t_sched: Schedule, init: nn.Module, resumed: dict[str, Any] | None
) -> RoundResult | None:
    """Round ``r`` (0-based): train a student of ``c.plan[r]`` steps on ``teacher``'s two-step DDIM target.
    Returns None when ``c.stop_at`` ended it (the state is saved)."""
    n, B, spr = c.plan[r], c.batch_size, c.meta["hparams"]["steps_per_round"]
    grid = round_timesteps(c.s_sched, n).to(c.device)  # [n, 3] = (t, t', t'')
    model = copy.deepcopy(init).to(c.device).train().requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay)
    round_seed = _derive_seed(c.seed, "distill-round", r)
    t_gen = torch.Generator().manual_seed(_derive_seed(round_seed, "grid-index"))
    n_data = c.data.shape[0]
    order = _DataOrder(n_data, round_seed)
    s0 = 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        optimizer.load_state_dict(resumed["optimizer"])
        for group in optimizer.param_groups:  # this call's setting wins over the saved one
            group["weight_decay"] = c.weight_decay
        t_gen.set_state(resumed["t_generator"])
        order.set_perm(int(resumed["data"]["epoch"]), resumed["data"]["perm"])
        s0 = int(resumed["step"])
    net: nn.Module = model
    if c.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[c.device.index] if c.device.type == "cuda" else None)
        if resumed is None:  # DDP broadcast rank 0's weights; the EMA starts from them too
            ema.load_state_dict(model.state_dict())
    ema_params, raw_params = list(ema.parameters()), list(model.parameters())
    ema_buffers, raw_buffers = list(ema.buffers()), list(model.buffers())
    dropout = _has_dropout(model)
    window = torch.zeros(c.log_every, dtype=torch.float32, device=c.device)
    n_window, round_losses, t0 = 0, [], time.perf_counter()

    def save_state(s: int, finished: bool = False) -> None:
        if c.out_path is None:
            return
        if c.rank == 0:
            st: dict[str, Any] = {"format": _STATE_FORMAT, "fastddpm_version": __version__,
                                  "torch_version": str(torch.__version__), **c.meta}  # fmt: skip
            if finished:  # the next round starts from this round's saved student
                st.update(round=r + 1, step=0, model=None, ema=None, optimizer=None, t_generator=None, data=None)
            else:
                epoch = (s * B) // n_data
                st.update(round=r, step=s, model=_cpu_state(model), ema=_cpu_state(ema),
                          optimizer=optimizer.state_dict(), t_generator=t_gen.get_state(),
                          data={"epoch": epoch, "perm": order.perm(epoch)})  # fmt: skip
            _atomic_write_bytes(c.out_path / DISTILL_STATE_NAME, lambda p: torch.save(st, p))
        barrier()

    def flush(done: int) -> None:
        nonlocal n_window
        if n_window == 0:
            return
        vals = window[:n_window].clone()
        if c.world > 1:
            dist.all_reduce(vals)
            vals /= c.world
        vals_list = vals.tolist()
        n_window = 0
        bad = [i for i, v in enumerate(vals_list) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"the loss became {vals_list[bad[0]]} at step {done - len(vals_list) + bad[0] + 1} of round {r + 1}; "
                "try a lower lr, more warmup or gradient clipping"
            )
        round_losses.extend(vals_list)
        c.result.losses.extend(vals_list)
        mean = sum(vals_list) / len(vals_list)
        if c.bar is not None:
            c.bar.set_postfix(round=f"{r + 1}/{len(c.plan)}", loss=f"{mean:.4f}", refresh=False)
        if c.log_file is not None:
            rec = {"step": r * spr + done, "round": r + 1, "student_steps": n, "round_step": done, "loss": mean,
                   "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.perf_counter() - c.t_start, 3)}  # fmt: skip
            c.log_file.write(json.dumps(rec) + "\n")
            c.log_file.flush()

    fork_devices = [c.device.index] if c.device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices, enabled=dropout):
        for s in range(s0, spr):
            if r * spr + s >= c.stop_at:
                flush(s)
                save_state(s)
                return None
            # 1. the global batch: example indices and grid indices, the same on every rank; this rank's slice
            idx = order.indices(s * B, B)[c.lo : c.lo + c.local]
            i_all = torch.randint(0, n, (B,), generator=t_gen, dtype=torch.int64)
            t, t_mid, t_end = grid[i_all[c.lo : c.lo + c.local].to(c.device)].unbind(1)
            x0 = c.data[idx.to(c.data.device)].to(c.device, non_blocking=True)
            # 2. x_t with counter-based noise keyed by the example's global counter (each round its own key)
            x_t = q_sample(x0, t, t_sched, seed=round_seed, sample_offset=s * B + c.lo, backend=c.backend)
            # 3. the target: two teacher DDIM steps t -> t' -> t'', solved for the student's x0 (Algorithm 2)
            target, _ = distillation_target(teacher, t_sched, x_t, t, t_mid, t_end, backend=c.backend)
            # 4. truncated-SNR weighted x0 loss, backward, clip, AdamW with warm-up and linear decay
            if dropout:
                torch.manual_seed(_derive_seed(c.seed, "dropout", r, s, c.rank))
            x_hat = predicted_x0(model_call(net, x_t, t).float(), x_t.float(), t, c.s_sched)
            per_example = (x_hat - target.float()).pow(2).flatten(1).mean(1)
            loss = (truncated_snr_weight(c.s_sched, t) * per_example).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
            scale = min(1.0, (s + 1) / c.warmup) if c.warmup else 1.0
            for group in optimizer.param_groups:
                group["lr"] = c.lr * min(scale, (spr - s) / spr)
            optimizer.step()
            # 5. EMA of the weights
            decay = min(c.ema_decay, (1.0 + s) / (10.0 + s))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, raw_params, 1.0 - decay)
                for eb, rb in zip(ema_buffers, raw_buffers):
                    eb.copy_(rb)
            window[n_window] = loss.detach()
            n_window += 1
            done = s + 1
            c.result.step = r * spr + done
            if n_window == c.log_every or done == spr:
                flush(done)
            if c.bar is not None:
                c.bar.update(1)
            if c.out_path is not None and c.save_every and done % c.save_every == 0 and done != spr:
                save_state(done)
    out = None
    if c.out_path is not None:
        out = c.out_path / round_dir_name(r + 1, n)
        if c.rank == 0:
            _save_round(out, ema, c.s_sched, n, 2 * n)
        save_state(spr, finished=True)
    tail = round_losses[-100:]
    return RoundResult(
        index=r + 1, model=ema, teacher_steps=2 * n, student_steps=n, out_dir=out,
        final_loss=sum(tail) / len(tail) if tail else None, seconds=time.perf_counter() - t0,
    )  # fmt: skip


def distill(
    teacher: nn.Module | str | os.PathLike,
    schedule: Schedule | None = None,
    data: torch.Tensor | str | os.PathLike = "digits",
    *,
    from_steps: int,
    to_steps: int,
    steps_per_round: int,
    student: nn.Module | None = None,
    prediction_type: str = "v_prediction",
    batch_size: int = 64,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    warmup: int = 10,
    seed: int = 0,
    device: torch.device | str | None = None,
    out_dir: str | os.PathLike | None = None,
    save_every: int | None = 500,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    log_every: int = 50,
    backend: str = "auto",
    image_size: int | None = None,
) -> DistillResult:
    """Progressive distillation from ``from_steps`` to ``to_steps`` DDIM steps; see the module docstring.

    Args:
        teacher: a model ``(x [B, ...], t [B]) -> output`` (a :class:`UNet` or any module), or a name/directory
            as ``fastddpm sample --model`` takes (bundled name, fastddpm or diffusers checkpoint). Moved to
            ``device`` and put in eval mode; its weights are never changed.
        schedule: the teacher's schedule (default: the one saved with a named teacher). Learned variances
            are refused; its betas are the student's (the paper allows the teacher's schedule).
        data: float ``[N, ...]`` tensor in ``[-1, 1]``, or a name/folder for :func:`fastddpm.data.load_dataset`
            (UNet teachers: resized to the model's size and channels).
        from_steps: DDIM steps of the teacher (2 ..= T); to_steps: of the last student, ``from_steps / 2**k``.
        steps_per_round: optimizer steps of each round.
        student: the first round's initial student (default: a copy of the teacher); never modified.
        prediction_type: what the students predict (``"v_prediction"``, ``"sample"`` or ``"epsilon"``).
        batch_size: global batch size; lr, weight_decay: AdamW (lr warms up over ``warmup`` steps, then decays
            linearly to ``lr / steps_per_round`` at the round's last step); grad_clip: max gradient norm.
        ema_decay: EMA decay; step ``s`` of a round uses ``min(ema_decay, (1 + s) / (10 + s))``.
        seed: key of the data order, the grid indices and the counter-based noise (each round its own).
        device: where to train (as :func:`fastddpm.train`).
        out_dir: where the round checkpoints, ``distill_state.pt`` and ``distill_log.jsonl`` go (the student
            must then be a :class:`UNet`). save_every: state every this many steps within a round.
        resume: continue the run in ``out_dir`` (the same teacher, data, seed, batch size, from_steps,
            steps_per_round and prediction_type; ``to_steps`` may be lowered to add rounds).
        stop_after: run at most this many optimizer steps in this call, save the state and return
            (``finished=False``); resume later.
        progress, log_every, backend, image_size: as :func:`fastddpm.train`.

    Returns:
        :class:`DistillResult`; ``result.model`` is the last finished round's EMA student.
    """
    rank, world = _world()
    _check_positive("steps_per_round", steps_per_round, integer=True)
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    _check_positive("warmup", warmup, integer=True, allow_zero=True)
    _check_positive("log_every", log_every, integer=True)
    for name, value in (("grad_clip", grad_clip), ("save_every", save_every)):
        if value is not None:
            _check_positive(name, value, integer=name == "save_every", allow_zero=True)
    if stop_after is not None:
        _check_positive("stop_after", stop_after, integer=True)
    if not isinstance(ema_decay, (int, float)) or isinstance(ema_decay, bool) or not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
    seed = check_seed(seed)
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of ranks ({world})")

    # ---- teacher, schedules, the plan of rounds
    if isinstance(teacher, os.PathLike):
        teacher = os.fspath(teacher)
    if isinstance(teacher, str):
        teacher, saved_schedule, _ = load_model(teacher, "cpu")
        schedule = saved_schedule if schedule is None else schedule
    if not isinstance(teacher, nn.Module):
        raise TypeError(
            f"teacher must be a torch.nn.Module, a bundled model name or a directory; got {type(teacher).__name__}"
        )
    if schedule is None:
        raise ValueError("schedule is required with a teacher module (a teacher name or directory brings its own)")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastddpm.Schedule, got {type(schedule).__name__}")
    _check_teacher(teacher, schedule)
    T = schedule.num_train_timesteps
    plan = _check_steps(from_steps, to_steps, T)
    s_sched = student_schedule(schedule, prediction_type)
    first = student if student is not None else teacher
    if not isinstance(first, nn.Module) or not any(p.is_floating_point() for p in first.parameters()):
        raise ValueError("the student needs trainable parameters: pass student= when the teacher has none")
    device = _resolve_device(device, teacher, world)
    if world > 1 and dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"torch.distributed uses NCCL but the device is {device}; use gloo for CPU training")

    out_path = Path(out_dir).expanduser() if out_dir is not None else None
    if out_path is not None and not isinstance(first, UNet):
        raise ValueError("out_dir writes fastddpm checkpoints: the student must be a fastddpm UNet")
    state = _load_state(out_path, resume)
    teacher_sha = model_fingerprint(teacher)
    hparams = dict(from_steps=from_steps, steps_per_round=steps_per_round, batch_size=batch_size, seed=seed,
                   prediction_type=prediction_type, teacher_schedule=schedule.to_dict())  # fmt: skip
    if state is not None:
        for key, now in hparams.items():
            if state["hparams"][key] != now:
                raise ValueError(f"{key}={now!r} differs from the resumed run's {state['hparams'][key]!r}")
        if state["teacher_sha256"] != teacher_sha:
            raise ValueError("the teacher's weights differ from the resumed run's teacher")
        if state["round"] > len(plan):
            raise ValueError(
                f"the resumed run already finished {state['round']} rounds; to_steps={to_steps} needs fewer"
            )

    # ---- data
    cfg = teacher.config if isinstance(teacher, UNet) else None
    if not isinstance(data, torch.Tensor):
        if cfg is None:
            raise ValueError("data must be a tensor when the teacher is not a fastddpm UNet")
        data = load_dataset(data, image_size=image_size or _image_size(cfg), channels=cfg.in_channels)
    _check_data(data, cfg) if cfg is not None else _check_generic_data(data)
    data = _place_data(data, device)
    n_data = data.shape[0]
    data_info = {"num_examples": n_data, "shape": list(data.shape[1:])}
    if state is not None and state["data_info"] != data_info:
        raise ValueError(f"data has {data_info} but the resumed run had {state['data_info']}")

    # ---- where to start
    B = batch_size
    local = B // world
    lo = rank * local
    spr = steps_per_round
    start_round, start_in_round = (int(state["round"]), int(state["step"])) if state is not None else (0, 0)
    global_start = start_round * spr + start_in_round
    stop_at = len(plan) * spr if stop_after is None else min(len(plan) * spr, global_start + stop_after)
    cur_teacher, cur_sched, cur_steps = teacher.to(device).eval(), schedule, from_steps
    if start_round > 0:
        prev_dir = out_path / round_dir_name(start_round, plan[start_round - 1])
        cur_teacher, cur_sched, cur_steps = (
            UNet.from_pretrained(prev_dir).to(device).eval(),
            s_sched,
            plan[start_round - 1],
        )
    if global_start >= stop_at:
        warnings.warn(f"the run in {out_path} has finished all {len(plan)} rounds; nothing to do", stacklevel=2)

    result = DistillResult(model=cur_teacher, schedule=s_sched if start_round else schedule, steps=cur_steps,
                           step=global_start, start_step=global_start, finished=False)  # fmt: skip
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan) * spr, initial=global_start, desc="distilling", unit="step", dynamic_ncols=True)
    log_file = _open_log(out_path, DISTILL_LOG_NAME, rank, resume, global_start)
    t_start = time.perf_counter()
    ctx = _Run(
        plan=plan, s_sched=s_sched, data=data, device=device, rank=rank, world=world, lo=lo, local=local,
        batch_size=B, stop_at=stop_at, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, ema_decay=ema_decay,
        warmup=warmup, seed=seed, backend=backend, log_every=log_every, save_every=save_every, out_path=out_path,
        bar=bar, log_file=log_file, t_start=t_start, result=result,
        meta=dict(teacher_sha256=teacher_sha, hparams=hparams, data_info=data_info, plan=plan),
    )  # fmt: skip
    try:
        for r in range(start_round, len(plan)):
            if r * spr >= stop_at:
                break
            resumed = state if (state is not None and r == start_round and start_in_round > 0) else None
            rr = _run_round(ctx, r, cur_teacher, cur_sched, first if r == 0 else cur_teacher, resumed)
            if rr is None:  # stopped inside the round
                break
            result.rounds.append(rr)
            cur_teacher, cur_sched, cur_steps = rr.model, s_sched, plan[r]
            result.model, result.schedule, result.steps = cur_teacher, s_sched, cur_steps
        result.finished = result.step >= len(plan) * spr
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    result.seconds = time.perf_counter() - t_start
    return result
