"""Runners for a :class:`fastddpm.sampling.Trajectory`: eager, or replayed CUDA graphs.

CUDA-graph rules followed here (flash-attention's ``capture_graph``): warm up on a side stream, use
static buffers (the trajectory's ``x``, ``step``, ``rng``), read everything that changes per step from
device memory (step counter -> timestep, coefficient row and noise counter), and never sync during
capture. One graph holds ``steps_per_graph`` consecutive steps; a one-step graph covers the remainder.
Graph and eager runs execute the same kernels on the same buffers, so they give the same images.

Device: warm-up, capture and replay all run under ``torch.cuda.device(traj.device)``, and every
capture of a runner (the ``k``-step graph and the one-step remainder graph, which share one memory
pool) is made on the one side stream the warm-up used, created for that device. Without this,
``torch.cuda.graph`` captures on a process-wide stream of whichever device was current at the first
capture, and sampling on ``cuda:1`` while ``cuda:0`` is current fails to capture.

Progress: on CUDA the bar advances when steps *complete*, not when they are queued (see
:class:`fastddpm.progress.StepProgress`).
"""

from __future__ import annotations

from typing import Any

import torch

from .progress import StepProgress


class EagerRunner:
    """Runs every step from Python (CPU, or CUDA without graphs)."""

    def __init__(self, traj: Any):
        self.traj = traj
        self.graphed = False

    def run(self, progress: Any = None) -> None:
        """Run the trajectory's ``plan.num_steps`` steps from its current state; ``progress.update(n)``
        is called as steps complete (on CUDA: as the GPU finishes them)."""
        tracker = StepProgress(progress, self.traj.device)
        for _ in range(self.traj.plan.num_steps):
            self.traj.step_once()
            tracker.queued(1)
        tracker.finish()


class GraphRunner:
    """Captures ``steps_per_graph`` steps (U-Net forward + fused update) once, then replays.

    Args:
        traj: a Trajectory on a CUDA device (its ``step_once`` must not sync with the host).
        steps_per_graph: steps per captured graph, clamped to ``[1, plan.num_steps]``.
    """

    def __init__(self, traj: Any, steps_per_graph: int = 1):
        self.traj = traj
        self.graphed = True
        self.device = torch.device(traj.device)
        num_steps = traj.plan.num_steps
        self.k = max(1, min(int(steps_per_graph), num_steps))
        with torch.cuda.device(self.device):
            # One side stream for warm-up and every capture of this runner (captures sharing a pool
            # must be made on the same stream); created for the trajectory's device.
            self.stream = torch.cuda.Stream(device=self.device)
            current = torch.cuda.current_stream(self.device)
            # Warm-up: lazy initialisation, cuDNN/Triton autotuning and allocator growth happen here,
            # not during capture.
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                for _ in range(min(2, num_steps)):
                    traj.step_once()
            current.wait_stream(self.stream)
            torch.cuda.synchronize(self.device)
            traj.step.zero_()
            self.pool = torch.cuda.graph_pool_handle()
            self.graph_k = self._capture(self.k)
            self.graph_1 = self._capture(1) if num_steps % self.k else None

    def _capture(self, steps: int) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            for _ in range(steps):
                self.traj.step_once()
        return graph

    def run(self, progress: Any = None) -> None:
        """Replay the graphs for ``plan.num_steps`` steps on the device's current stream (ordered after
        the trajectory's ``reset`` copies, before ``result()``); ``progress`` as in :class:`EagerRunner`."""
        full, rest = divmod(self.traj.plan.num_steps, self.k)
        with torch.cuda.device(self.device):
            tracker = StepProgress(progress, self.device)
            for _ in range(full):
                self.graph_k.replay()
                tracker.queued(self.k)
            for _ in range(rest):
                self.graph_1.replay()
                tracker.queued(1)
            tracker.finish()


def replay_schedule(num_steps: int, steps_per_graph: int) -> list[int]:
    """Steps covered by each replay, in order (e.g. ``(10, 4) -> [4, 4, 1, 1]``); used for bookkeeping tests."""
    k = max(1, min(steps_per_graph, num_steps))
    full, rest = divmod(num_steps, k)
    return [k] * full + [1] * rest
