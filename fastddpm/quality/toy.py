"""A 2-D toy problem with a known density: a ring of Gaussians, a small MLP denoiser, and its exact denoiser.

Points are handled as images of shape ``[B, 2, 1, 1]`` (two channels, one pixel), so the same
:func:`fastddpm.sample` loop, schedule and samplers run on them as on real images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..schedule import Schedule

#: Shape of one toy "image": two channels (x, y) of one pixel.
TOY_SHAPE = (2, 1, 1)
#: The shipped MLP weights (made by :func:`build_shipped_toy_denoiser`).
TOY_WEIGHTS = Path(__file__).resolve().parent / "toy_denoiser.safetensors"
TOY_TRAIN_STEPS = 15000


@dataclass(frozen=True)
class RingMixture:
    """Equal-weight mixture of ``num_modes`` isotropic Gaussians (std ``std``) centred on a circle of ``radius``.

    The default (8 modes, radius 0.75, std 0.05) lies well inside [-1, 1], the range the samplers clip to.
    """

    num_modes: int = 8
    radius: float = 0.75
    std: float = 0.05

    def __post_init__(self) -> None:
        if self.num_modes < 1 or self.radius < 0 or self.std <= 0:
            raise ValueError(f"need num_modes >= 1, radius >= 0, std > 0; got {self}")

    def means(self) -> torch.Tensor:
        """Mode centres, float64 ``[K, 2]``."""
        a = torch.arange(self.num_modes, dtype=torch.float64) * (2 * math.pi / self.num_modes)
        return self.radius * torch.stack([a.cos(), a.sin()], dim=1)

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` points, float32 ``[n, 2]``, from a generator seeded with ``seed``."""
        g = torch.Generator().manual_seed(seed)
        k = torch.randint(0, self.num_modes, (n,), generator=g)
        z = torch.randn(n, 2, generator=g, dtype=torch.float64)
        return (self.means()[k] + self.std * z).to(torch.float32)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of points ``x`` ``[N, 2]`` (any float dtype), float64 ``[N]`` on ``x``'s device.

        Differentiable: ``torch.autograd.grad`` of it gives the score ``grad_x log p(x)``.
        """
        x = x.to(torch.float64).reshape(-1, 2)
        d2 = ((x.unsqueeze(1) - self.means().to(x.device).unsqueeze(0)) ** 2).sum(-1)  # [N, K]
        log_comp = -d2 / (2 * self.std**2) - math.log(2 * math.pi * self.std**2)
        return torch.logsumexp(log_comp, dim=1) - math.log(self.num_modes)

    def coordinate_variance(self) -> float:
        """Variance of each coordinate: ``radius^2 / 2 + std^2`` (the centres are symmetric, K >= 3)."""
        return self.radius**2 / 2 + self.std**2

    def entropy_separated(self) -> float:
        """Entropy (nats) when the modes do not overlap: ``log K + 1 + log(2 pi std^2)``.

        Exact up to the modes' overlap, of order 1e-8 nats for the default ring (neighbouring centres are
        11.5 standard deviations apart; a point passes the midpoint with probability 5e-9).
        """
        return math.log(self.num_modes) + 1.0 + math.log(2 * math.pi * self.std**2)


def _time_features(t: torch.Tensor, dim: int, num_train_timesteps: int) -> torch.Tensor:
    """Sinusoidal features of ``t / T``, float32 ``[B, dim]`` (frequencies 1 .. 2^(dim/2 - 1) times pi)."""
    freqs = math.pi * 2.0 ** torch.arange(dim // 2, dtype=torch.float32, device=t.device)
    arg = (t.to(torch.float32) / num_train_timesteps).unsqueeze(1) * freqs
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class ToyDenoiser(nn.Module):
    """MLP predicting the noise epsilon of a 2-D point: ``(x [B, 2, 1, 1], t [B]) -> [B, 2, 1, 1]``.

    The MLP ``F`` predicts ``v`` (Salimans & Ho 2022) from the point scaled to unit variance and 16
    sinusoidal features of ``t / T``; the output is converted to epsilon:

        eps(x, t) = sqrt(abar_t) F(x / s_t, t) + sqrt(1 - abar_t) x,   s_t^2 = abar_t v_data + 1 - abar_t.

    Errors of ``F`` reach epsilon damped by ``sqrt(abar_t)`` at high noise, and its LayerNorm-ed hidden
    layers (three, SiLU, ``width`` wide) keep ``F`` bounded for points far from the data, like the U-Net's
    GroupNorm. Both matter to DDIM: its direction term uses the unclipped epsilon, so over hundreds of
    deterministic steps at high noise any growth of epsilon with ``|x|`` compounds (a plain
    epsilon-predicting SiLU MLP produced NaN in DDIM at 1000 steps here).
    """

    def __init__(
        self, data_var: float = 0.5, width: int = 128, time_dim: int = 16, schedule: Schedule | None = None
    ) -> None:
        super().__init__()
        schedule = schedule if schedule is not None else Schedule()
        self.data_var, self.time_dim, self.num_train_timesteps = data_var, time_dim, schedule.num_train_timesteps
        self.register_buffer("abar", schedule.alphas_cumprod.to(torch.float32), persistent=False)
        layers: list[nn.Module] = []
        d = 2 + time_dim
        for _ in range(3):
            layers += [nn.Linear(d, width), nn.LayerNorm(width), nn.SiLU()]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b).long()
        p = x.reshape(b, 2).float()
        a = self.abar[t].unsqueeze(1)
        s2 = a * self.data_var + 1 - a
        h = torch.cat([p / s2.sqrt(), _time_features(t, self.time_dim, self.num_train_timesteps)], dim=1)
        eps = a.sqrt() * self.net(h) + (1 - a).sqrt() * p
        return eps.reshape(x.shape).to(x.dtype)


class ExactMixtureDenoiser(nn.Module):
    """The exact epsilon-prediction ``E[eps | x_t]`` for a :class:`RingMixture` under ``schedule``.

    With ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``, ``x_t`` is a mixture of ``N(sqrt(abar) mu_k, s^2 I)``
    with ``s^2 = abar std^2 + 1 - abar``, and ``E[eps | x_t] = sqrt(1 - abar) * sum_k w_k(x_t) (x_t -
    sqrt(abar) mu_k) / s^2`` (Tweedie's formula). A sampler error with this model is the sampler's alone.
    """

    def __init__(self, mixture: RingMixture, schedule: Schedule) -> None:
        super().__init__()
        self.register_buffer("mu", mixture.means())
        self.register_buffer("abar", schedule.alphas_cumprod.clone())
        self.std = mixture.std

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b).long()
        p = x.reshape(b, 2).to(torch.float64)
        a = self.abar[t].unsqueeze(1)  # [B, 1]
        s2 = a * self.std**2 + 1 - a
        centred = p.unsqueeze(1) - a.sqrt().unsqueeze(1) * self.mu.unsqueeze(0)  # [B, K, 2]
        w = torch.softmax(-(centred**2).sum(-1) / (2 * s2), dim=1)  # [B, K]
        eps = (1 - a).sqrt() * (w.unsqueeze(-1) * centred).sum(1) / s2
        return eps.to(x.dtype).reshape(x.shape)


def train_toy_denoiser(
    mixture: RingMixture,
    schedule: Schedule,
    *,
    steps: int = 3000,
    batch_size: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 128,
) -> ToyDenoiser:
    """Train a :class:`ToyDenoiser` on fresh mixture samples with the DDPM loss ``|eps - eps_theta(x_t, t)|^2``.

    Adam with a cosine learning-rate decay; t uniform in ``[0, T)``; every batch is new data, so there is
    no overfitting to watch. Deterministic for a given ``seed`` on one machine (CPU, float32). Returns
    the model in eval mode on the CPU.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyDenoiser(data_var=mixture.coordinate_variance(), width=width, schedule=schedule)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    coef = schedule.table("q_sample", "cpu", torch.float32)  # [T, 2]: sqrt(abar), sqrt(1 - abar)
    means = mixture.means().to(torch.float32)
    T = schedule.num_train_timesteps
    model.train()
    for _ in range(steps):
        k = torch.randint(0, mixture.num_modes, (batch_size,), generator=g)
        x0 = means[k] + mixture.std * torch.randn(batch_size, 2, generator=g)
        t = torch.randint(0, T, (batch_size,), generator=g)
        eps = torch.randn(batch_size, 2, generator=g)
        xt = coef[t, :1] * x0 + coef[t, 1:] * eps
        loss = ((model(xt.reshape(batch_size, *TOY_SHAPE), t).reshape(batch_size, 2) - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def load_toy_denoiser(path: str | Path | None = None) -> ToyDenoiser:
    """The shipped toy MLP (trained with :func:`build_shipped_toy_denoiser`), in eval mode on the CPU."""
    from safetensors.torch import load_file

    f = Path(path) if path is not None else TOY_WEIGHTS
    if not f.is_file():
        raise FileNotFoundError(f"no toy denoiser weights at {f}; rebuild with `python -m fastddpm.quality.toy`")
    model = ToyDenoiser(data_var=RingMixture().coordinate_variance())
    model.load_state_dict(load_file(str(f)))
    return model.eval()


def build_shipped_toy_denoiser(path: str | Path = TOY_WEIGHTS, steps: int = TOY_TRAIN_STEPS) -> Path:
    """Train the toy MLP for ``steps`` steps (seed 0) on the default :class:`RingMixture` and save it."""
    from safetensors.torch import save_file

    model = train_toy_denoiser(RingMixture(), Schedule(), steps=steps, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


if __name__ == "__main__":
    print(build_shipped_toy_denoiser())
