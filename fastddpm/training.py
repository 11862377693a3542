"""The DDPM training loop (Ho et al. 2020, Algorithm 1), on one device or under ``torchrun``.

Each optimizer step ``s`` works on one *global* batch of ``B`` examples:

1. Example indices: positions ``s*B .. s*B+B-1`` of the stream made by concatenating one seeded permutation
   of the data per epoch (so the order is a function of ``seed`` and ``s`` only).
2. Timesteps ``t ~ U{0, ..., T-1}``, ``[B]``, from a CPU ``torch.Generator`` seeded from ``seed``.
3. ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with the fused :func:`fastddpm.q_sample`, whose ``eps``
   is counter-based noise keyed by ``(seed, k, t)`` where ``k`` is the example's global counter
   ``s*B + j`` (``j`` its position in the global batch): every example ever drawn gets its own noise. The
   regression target for ``prediction_type="epsilon"`` is that same ``eps``, re-made with
   ``randn(..., seed=seed, sample_offset=k, t=t, stream=STREAM_QSAMPLE)``.
4. Loss ``mean((model(x_t, t) - target)^2)``, AdamW, gradient-norm clipping, linear warm-up, EMA.

Under ``torch.distributed`` (``W`` ranks) every rank draws the same global indices and timesteps and takes
the contiguous slice ``[r*B/W, (r+1)*B/W)``; DDP averages the gradients, so the run equals a one-process
run with the same global batch up to float summation order. Rank 0 writes the checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
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
import torch.nn.functional as F
from torch import nn

from ._layout import STREAM_QSAMPLE
from ._version import __version__
from .data import load_dataset
from .noise import check_seed
from .ops import q_sample, randn
from .schedule import LEARNED_VARIANCES, Schedule
from .unet import PRESETS, UNet, UNetConfig

__all__ = ["STATE_NAME", "SCHEDULER_NAME", "LOG_NAME", "TrainResult", "train", "training_target"]

STATE_NAME = "training_state.pt"
SCHEDULER_NAME = "scheduler_config.json"
LOG_NAME = "training_log.jsonl"
_STATE_FORMAT = 1
# Data larger than this stays in host memory and is copied to the device one batch at a time.
_MAX_DEVICE_DATA_BYTES = 1 << 30


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the EMA weights as a :class:`UNet` in eval mode (what the checkpoints hold; use it to sample).
        raw_model: the optimised weights (the model that was passed in, trained in place).
        schedule: the noise schedule trained with.
        step: optimizer steps done in total (including those before a resume).
        start_step: the step this call started from (0, or the resumed step).
        losses: global-batch mean loss of each step run by this call (``step - start_step`` floats).
        out_dir: checkpoint directory, or ``None``.
        checkpoints: steps at which checkpoints were written by this call.
        seconds: wall time of this call's training loop.
    """

    model: UNet
    raw_model: UNet
    schedule: Schedule
    step: int
    start_step: int
    losses: list[float]
    out_dir: Path | None
    checkpoints: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float | None:
        """Mean loss over the last ``min(100, len(losses))`` steps (``None`` when no step ran)."""
        if not self.losses:
            return None
        tail = self.losses[-100:]
        return sum(tail) / len(tail)


# ----------------------------------------------------------------------------- helpers
def _derive_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed for one use (``tags``) of ``seed``, stable across platforms and versions."""
    digest = hashlib.blake2b(repr((int(seed), *tags)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _DataOrder:
    """Global example order: the concatenation, over epochs, of a seeded permutation of ``range(n)``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(_derive_seed(self.seed, "data-order", epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old]
        return self._perms[epoch]

    def set_perm(self, epoch: int, perm: torch.Tensor) -> None:
        if perm.shape != (self.n,):
            raise ValueError(f"saved data order has {perm.numel()} entries but the data has {self.n} examples")
        self._perms[epoch] = perm.to(torch.int64)

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Example indices at stream positions ``start .. start + count - 1`` (int64 ``[count]``)."""
        pos = torch.arange(start, start + count, dtype=torch.int64)
        epochs = pos // self.n
        out = torch.empty(count, dtype=torch.int64)
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self.perm(e)[pos[sel] % self.n]
        return out


def training_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Regression target of the model for ``schedule.prediction_type``.

    Args:
        x0: clean data ``[B, ...]``; noise: the ``eps`` used to make ``x_t`` (same shape); t: int64 ``[B]``.
    Returns:
        ``eps`` (epsilon), ``x0`` (sample) or ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (v_prediction,
        Salimans & Ho 2022), float32, shaped like ``x0``.
    """
    kind = schedule.prediction_type
    if kind == "epsilon":
        return noise.float()
    if kind == "sample":
        return x0.float()
    qs = schedule.table("q_sample", x0.device)[t]  # [B, 2] = (sqrt(abar), sqrt(1 - abar))
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return qs[:, 0].reshape(shape) * noise.float() - qs[:, 1].reshape(shape) * x0.float()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resolve_device(device: torch.device | str | None, model: Any, world: int) -> torch.device:
    if device is None:
        if isinstance(model, nn.Module):
            p = next(model.parameters(), None)
            if p is not None and p.device.type != "cpu":
                device = p.device
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if world > 1 and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        elif torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available in this torch build / machine")
    return device


def _preset_or_dir(name: str) -> UNet | UNetConfig:
    if name in PRESETS:
        return PRESETS[name]
    if Path(name).expanduser().is_dir():
        return UNet.from_pretrained(Path(name).expanduser())
    raise ValueError(
        f"unknown model {name!r}: not a UNet preset ({', '.join(sorted(PRESETS))}) and not a checkpoint directory"
    )


def _place_data(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 training data where the loop reads it: on ``device`` when it fits ``_MAX_DEVICE_DATA_BYTES``,
    else left on the CPU (pinned when the loop runs on CUDA, for asynchronous batch copies)."""
    data = data.detach().to(torch.float32)
    if data.device != device and data.numel() * 4 <= _MAX_DEVICE_DATA_BYTES:
        return data.to(device)
    if data.device.type == "cpu" and device.type == "cuda":
        return data.pin_memory()
    return data


def _open_log(out_path: Path | None, name: str, rank: int, resume: bool, start: int):
    """Rank 0's JSON-lines log ``out_path/name`` (None elsewhere or without ``out_path``); a resume keeps the
    records up to ``start`` (see :func:`_truncate_log`) and appends."""
    if out_path is None or rank != 0:
        return None
    out_path.mkdir(parents=True, exist_ok=True)
    if resume:
        _truncate_log(out_path / name, start)
    return open(out_path / name, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log records of steps after ``step`` (the checkpoint a resume starts from): a run killed
    after its last checkpoint logged steps that the resumed run trains again, and logs once more."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _image_size(cfg: UNetConfig) -> int | None:
    s = cfg.sample_size
    if isinstance(s, tuple):
        if s[0] != s[1]:
            raise ValueError(f"the model's sample_size {s} is not square; pass a data tensor of that shape instead")
        return s[0]
    return s


def _check_data(data: torch.Tensor, cfg: UNetConfig) -> None:
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.dim() != 4:
        got = (
            f"{data.dtype} tensor of shape {tuple(data.shape)}"
            if isinstance(data, torch.Tensor)
            else type(data).__name__
        )
        raise ValueError(f"data must be a float tensor [N, C, H, W] in [-1, 1]; got a {got}")
    n, c, h, w = data.shape
    if n == 0:
        raise ValueError("data holds no examples")
    if c != cfg.in_channels:
        raise ValueError(f"data has {c} channels but the model takes in_channels={cfg.in_channels}")
    f = cfg.downsample_factor
    if h % f or w % f:
        raise ValueError(f"data images are {h}x{w}; this model needs height and width that are multiples of {f}")
    lo, hi = float(data.min()), float(data.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(f"data must be finite and in [-1, 1]; got values in [{lo}, {hi}]")


def _check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    ok_type = (isinstance(value, int) and not isinstance(value, bool)) if integer else isinstance(value, (int, float))
    if (
        not ok_type
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        kind = "an int" if integer else "a number"
        raise ValueError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_checkpoint(out_dir: Path, ema: UNet, schedule: Schedule, state: dict[str, Any]) -> None:
    """EMA model (``save_pretrained``), ``scheduler_config.json`` and ``training_state.pt``, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out_dir)
    sched = {"_class_name": "DDPMScheduler", **schedule.to_dict()}
    text = json.dumps(sched, indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(out_dir / SCHEDULER_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    _atomic_write_bytes(out_dir / STATE_NAME, lambda p: torch.save(state, p))


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


# ----------------------------------------------------------------------------- the loop
def train(
    model: UNet | str,
    schedule: Schedule | None = None,
    data: torch.Tensor | str | os.PathLike = "digits",
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    warmup: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
    out_dir: str | os.PathLike | None = None,
    save_every: int | None = 1000,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 50,
    backend: str = "auto",
    flip: bool = False,
    image_size: int | None = None,
) -> TrainResult:
    """Train a DDPM U-Net with the simple loss (Ho et al. 2020, Algorithm 1); see the module docstring.

    Args:
        model: a :class:`UNet` (trained in place, moved to ``device``), a preset name (``"digits"``, ...) or a
            checkpoint directory to fine-tune. With ``resume=True`` a name is ignored and the architecture
            comes from the saved state.
        schedule: the noise schedule (default: the resumed run's, else ``Schedule()``). Learned variances are
            not supported (they need the variational-bound loss).
        data: float ``[N, C, H, W]`` tensor in ``[-1, 1]``, or a name/folder for
            :func:`fastddpm.data.load_dataset` (resized to the model's ``sample_size`` and channels).
        steps: total optimizer steps of the run; with ``resume=True`` training continues from the saved
            step up to ``steps`` (so re-running the same call after a crash finishes the job).
        batch_size: global batch size ``B`` (split evenly over ``torch.distributed`` ranks).
        lr, weight_decay: AdamW settings (betas 0.9, 0.999).
        grad_clip: maximum global gradient norm (``None`` or 0: no clipping).
        ema_decay: EMA decay; step ``s`` uses ``min(ema_decay, (1 + s) / (10 + s))`` so early weights fade fast.
        warmup: steps of linear learning-rate warm-up from ``lr / warmup`` to ``lr`` (0: none).
        seed: key of the data order, the timestep generator and the counter-based noise.
        device: where to train (default: the model's device, else CUDA if available, else CPU; under
            ``torchrun`` with CUDA, ``cuda:LOCAL_RANK``).
        out_dir: checkpoint directory: the EMA model (``config.json`` + ``model.safetensors``),
            ``scheduler_config.json``, ``training_state.pt`` (everything to resume) and ``training_log.jsonl``.
        save_every: write a checkpoint every this many steps (and always at the end); ``None``/0: end only.
        resume: continue from ``out_dir/training_state.pt``. Without it, an existing state there is an error.
        progress: show a tqdm bar with the loss (rank 0 only).
        log_every: steps between loss read-backs (the bar, the log file, the NaN check).
        backend: fused-op backend for :func:`fastddpm.q_sample` / :func:`fastddpm.randn`.
        flip: random horizontal flips (off by default: digits must not be mirrored).
        image_size: size to resize a named/folder dataset to (default: the model's ``sample_size``).

    Returns:
        :class:`TrainResult` (``result.model`` holds the EMA weights).
    """
    rank, world = _world()
    # ---- arguments
    _check_positive("steps", steps, integer=True)
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    _check_positive("warmup", warmup, integer=True, allow_zero=True)
    _check_positive("log_every", log_every, integer=True)
    if grad_clip is not None:
        _check_positive("grad_clip", grad_clip, allow_zero=True)
    if save_every is not None:
        _check_positive("save_every", save_every, integer=True, allow_zero=True)
    if not isinstance(ema_decay, (int, float)) or isinstance(ema_decay, bool) or not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
    seed = check_seed(seed)
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of ranks ({world})")
    device = _resolve_device(device, model, world)
    if world > 1 and dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"torch.distributed uses NCCL but the training device is {device}; use gloo for CPU training")

    # ---- saved state
    out_path = Path(out_dir).expanduser() if out_dir is not None else None
    state: dict[str, Any] | None = None
    if resume:
        if out_path is None:
            raise ValueError("resume=True needs out_dir (the directory holding training_state.pt)")
        if not (out_path / STATE_NAME).is_file():
            raise FileNotFoundError(f"cannot resume: {out_path / STATE_NAME} does not exist")
        state = torch.load(out_path / STATE_NAME, map_location="cpu", weights_only=True)
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"{out_path / STATE_NAME} has state format {state.get('format')!r}, expected {_STATE_FORMAT}"
            )
    elif out_path is not None and (out_path / STATE_NAME).is_file():
        raise FileExistsError(
            f"{out_path} already holds a training run ({STATE_NAME}); pass resume=True (--resume) to continue it "
            "or choose another directory"
        )

    # ---- schedule
    if state is not None:
        saved_schedule = Schedule.from_diffusers(state["schedule"])
        if schedule is not None and schedule != saved_schedule:
            raise ValueError("the schedule differs from the one the resumed run was trained with")
        schedule = saved_schedule
    schedule = schedule if schedule is not None else Schedule()
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastddpm.Schedule, got {type(schedule).__name__}")
    if schedule.variance_type in LEARNED_VARIANCES:
        raise ValueError(
            f"variance_type={schedule.variance_type!r} needs the variational-bound loss, which train() does not "
            "implement; use a fixed variance ('fixed_small', 'fixed_large', ...)"
        )

    # ---- model
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if isinstance(model, str):
        if state is not None:
            built: UNet | UNetConfig = UNetConfig.from_dict(state["unet_config"])
        else:
            built = _preset_or_dir(model)
        if isinstance(built, UNet):
            model = built
        else:  # a preset: the initial weights are a function of ``seed`` (the global generator is left as it was)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_derive_seed(seed, "init"))
                model = UNet(built)
    if not isinstance(model, UNet):
        raise TypeError(f"model must be a fastddpm.UNet or a preset name, got {type(model).__name__}")
    cfg = model.config
    if state is not None and UNetConfig.from_dict(state["unet_config"]) != cfg:
        raise ValueError("the model's config differs from the one the resumed run was trained with")
    if cfg.out_channels != cfg.in_channels:
        raise ValueError(
            f"the model outputs {cfg.out_channels} channels for {cfg.in_channels} input channels; train() fits "
            "epsilon/sample/v targets, which need out_channels == in_channels"
        )

    # ---- data
    if not isinstance(data, torch.Tensor):
        data = load_dataset(data, image_size=image_size or _image_size(cfg), channels=cfg.in_channels)
    _check_data(data, cfg)
    data = _place_data(data, device)
    n_data = data.shape[0]
    if state is not None:
        saved = state["data"]
        if saved["num_examples"] != n_data or list(saved["shape"]) != list(data.shape[1:]):
            raise ValueError(
                f"data has {n_data} examples of shape {tuple(data.shape[1:])} but the resumed run had "
                f"{saved['num_examples']} of shape {tuple(saved['shape'])}"
            )
        for key, now in (("batch_size", batch_size), ("seed", seed)):
            if state["hparams"][key] != now:
                raise ValueError(f"{key}={now} differs from the resumed run's {state['hparams'][key]}")

    # ---- optimisation state
    was_training = model.training
    model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    t_gen = torch.Generator().manual_seed(_derive_seed(seed, "timesteps"))
    order = _DataOrder(n_data, seed)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # this call's settings win over the saved ones
            group["weight_decay"] = weight_decay
        t_gen.set_state(state["t_generator"])
        order.set_perm(int(state["data"]["epoch"]), state["data"]["perm"])
        start = int(state["step"])
    if start >= steps:
        warnings.warn(f"the run in {out_path} is already at step {start} >= steps={steps}; nothing to do", stacklevel=2)

    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if state is None:  # DDP broadcast rank 0's initial weights; the EMA starts from them too
            ema.load_state_dict(model.state_dict())
    ema_params = [p for p in ema.parameters()]
    raw_params = [p for p in model.parameters()]
    ema_buffers = list(ema.buffers())
    raw_buffers = list(model.buffers())

    B, T = batch_size, schedule.num_train_timesteps
    local = B // world
    lo = rank * local
    hparams = dict(
        steps=steps, batch_size=B, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, ema_decay=ema_decay,
        warmup=warmup, seed=seed, flip=flip, world_size=world,
    )  # fmt: skip

    def state_dict_now(step: int) -> dict[str, Any]:
        epoch = (step * B) // n_data
        return {
            "format": _STATE_FORMAT,
            "fastddpm_version": __version__,
            "torch_version": str(torch.__version__),
            "step": step,
            "model": _cpu_state(model),
            "ema": _cpu_state(ema),
            "optimizer": optimizer.state_dict(),
            "t_generator": t_gen.get_state(),
            "data": {"num_examples": n_data, "shape": list(data.shape[1:]), "epoch": epoch, "perm": order.perm(epoch)},
            "unet_config": cfg.to_dict(),
            "schedule": schedule.to_dict(),
            "hparams": hparams,
        }

    def checkpoint(step: int) -> None:
        if rank == 0:
            _save_checkpoint(out_path, ema, schedule, state_dict_now(step))
        if world > 1:
            dist.barrier()

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=min(start, steps), desc="training", unit="step", dynamic_ncols=True)
    log_file = _open_log(out_path, LOG_NAME, rank, resume, start)

    losses: list[float] = []
    saved_at: list[int] = []
    window = torch.zeros(log_every, dtype=torch.float32, device=device)
    n_window = 0
    dropout = _has_dropout(model)
    fork_devices = [device.index] if device.type == "cuda" else []
    t0 = time.perf_counter()

    def flush(step: int) -> None:
        nonlocal n_window
        if n_window == 0:
            return
        vals = window[:n_window].clone()
        if world > 1:
            dist.all_reduce(vals)
            vals /= world
        vals_list = vals.tolist()
        n_window = 0
        bad = [i for i, v in enumerate(vals_list) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"the loss became {vals_list[bad[0]]} at step {step - len(vals_list) + bad[0] + 1}; "
                "try a lower lr, more warmup or gradient clipping"
            )
        losses.extend(vals_list)
        mean = sum(vals_list) / len(vals_list)
        if bar is not None:
            bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
        if log_file is not None:
            rec = {"step": step, "loss": mean, "lr": optimizer.param_groups[0]["lr"],
                   "elapsed_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    try:
        with torch.random.fork_rng(devices=fork_devices, enabled=dropout):
            for step in range(start, steps):
                # 1. the global batch: example indices, timesteps (and flips), identical on every rank
                idx = order.indices(step * B, B)[lo : lo + local]
                t_all = torch.randint(0, T, (B,), generator=t_gen, dtype=torch.int64)
                flips = torch.rand(B, generator=t_gen) < 0.5 if flip else None
                x0 = data[idx.to(data.device)].to(device, non_blocking=True)
                t = t_all[lo : lo + local].to(device, non_blocking=True)
                if flips is not None:
                    f = flips[lo : lo + local].to(device).view(-1, 1, 1, 1)
                    x0 = torch.where(f, x0.flip(-1), x0)
                # 2. x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (eq. 4), eps keyed by the global example counter k
                k = step * B + lo
                x_t = q_sample(x0, t, schedule, seed=seed, sample_offset=k, backend=backend)
                if schedule.prediction_type == "sample":
                    target = x0
                else:
                    eps = randn(x0.shape, seed=seed, sample_offset=k, t=t, stream=STREAM_QSAMPLE, device=device,
                                dtype=x0.dtype, backend=backend)  # fmt: skip
                    target = training_target(x0, eps, t, schedule)
                # 3. loss, backward, clip, AdamW with warm-up
                if dropout:
                    torch.manual_seed(_derive_seed(seed, "dropout", step, rank))
                out = net(x_t, t)
                loss = F.mse_loss(out.float(), target.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
                optimizer.step()
                # 4. EMA of the weights
                decay = min(ema_decay, (1.0 + step) / (10.0 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, raw_params, 1.0 - decay)
                    for eb, rb in zip(ema_buffers, raw_buffers):
                        eb.copy_(rb)
                window[n_window] = loss.detach()
                n_window += 1
                done = step + 1
                if n_window == log_every or done == steps:
                    flush(done)
                if bar is not None:
                    bar.update(1)
                if out_path is not None and save_every and done % save_every == 0 and done != steps:
                    checkpoint(done)
                    saved_at.append(done)
        end = max(start, steps)
        if out_path is not None and end > start:
            checkpoint(end)
            saved_at.append(end)
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    seconds = time.perf_counter() - t0
    model.train(was_training)
    return TrainResult(
        model=ema,
        raw_model=model,
        schedule=schedule,
        step=max(start, steps),
        start_step=start,
        losses=losses,
        out_dir=out_path,
        checkpoints=saved_at,
        seconds=seconds,
    )
