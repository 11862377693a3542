"""Launchers shared by the compiled backends (``cpu`` and ``cuda``): the same three calls into an extension.

Each extension module exposes ``step``, ``q_sample`` and ``randn`` with the argument contract of
:mod:`fastddpm.backends`; this class only normalises the Python scalars and forwards the tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class ExtensionLaunchers:
    """``step`` / ``q_sample`` / ``randn`` calling the extension returned by ``load()`` (built on first use)."""

    def __init__(self, load: Callable[[], Any]):
        self._load = load

    def step(
        self,
        x: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor | None,
        noise: torch.Tensor | None,
        prev_out: torch.Tensor | None,
        x0_out: torch.Tensor | None,
        coef: torch.Tensor,
        tval: torch.Tensor,
        rows: torch.Tensor,
        thresh: torch.Tensor | None,
        rng: torch.Tensor,
        *,
        clip_mode: int,
        clip_range: float,
        var_mode: int,
        noise_mode: int,
        x0_only: bool,
    ) -> None:
        """One fused reverse step on ``[B, N]`` views; writes ``prev_out`` and/or ``x0_out`` in place.

        Reads x, m (and v, noise) once and writes prev (and x0) once; the Philox normals are made in
        the same pass. See :mod:`fastddpm.backends` for the arguments, :mod:`fastddpm._layout` for the math.
        """
        self._load().step(
            x, m, v, noise, prev_out, x0_out, coef, tval, rows, thresh, rng,
            clip_mode=int(clip_mode), clip_range=float(clip_range) if clip_range is not None else 0.0,
            var_mode=int(var_mode), noise_mode=int(noise_mode), x0_only=bool(x0_only),
        )  # fmt: skip

    def q_sample(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor | None,
        out: torch.Tensor,
        table: torch.Tensor,
        t: torch.Tensor,
        rng: torch.Tensor,
        *,
        noise_mode: int,
    ) -> None:
        """``out = table[t, 0] * x0 + table[t, 1] * z`` on ``[B, N]`` views, in place.

        ``z`` is ``noise`` (NOISE_TENSOR), the counter-based normal of stream ``STREAM_QSAMPLE`` with
        counter timestep ``t[b]`` (NOISE_PHILOX), or 0 (NOISE_NONE). See :mod:`fastddpm.backends`.
        """
        self._load().q_sample(x0, noise, out, table, t, rng, noise_mode=int(noise_mode))

    def randn(self, out: torch.Tensor, t: torch.Tensor, rng: torch.Tensor, *, stream: int) -> None:
        """Fill ``out[b, e]`` with the counter-based normal of ``(seed, sample_offset + b, t[b], e, stream)``.

        ``out`` is ``[B, N]`` (float32/16, bfloat16 or float64, unit stride inside a sample), ``t`` int64
        ``[B]`` (stride 0 allowed), ``rng`` int64 ``[seed, sample_offset]``. See :mod:`fastddpm.backends`.
        """
        self._load().randn(out, t, rng, stream=int(stream))

    def multistep(
        self,
        x: torch.Tensor,
        m: torch.Tensor,
        xp: torch.Tensor | None,
        hist: torch.Tensor | None,
        noise: torch.Tensor | None,
        x0_out: torch.Tensor | None,
        coef: torch.Tensor,
        tval: torch.Tensor,
        step: torch.Tensor,
        thresh: torch.Tensor | None,
        rng: torch.Tensor,
        *,
        clip_mode: int,
        clip_range: float,
        noise_mode: int,
        x0_only: bool,
    ) -> None:
        """One fused multistep-solver step on ``[B, N]`` views; updates ``x``, ``xp`` and the ring ``hist``
        in place (``x0_only``: writes only ``x0_out``). See :mod:`fastddpm.backends`."""
        from .triton import check_multistep_args  # metadata only; does not import triton

        check_multistep_args(x, m, xp, hist, noise, x0_out, coef, tval, step, thresh, rng, clip_mode, noise_mode,
                             x0_only)  # fmt: skip
        self._load().multistep(
            x, m, xp, hist, noise, x0_out, coef, tval, step, thresh, rng,
            clip_mode=int(clip_mode), clip_range=float(clip_range), noise_mode=int(noise_mode), x0_only=bool(x0_only),
        )  # fmt: skip
