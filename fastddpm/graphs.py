"""Runners for a :class:`fastddpm.sampling.Trajectory`: eager, or replayed CUDA graphs.

CUDA-graph rules followed here (flash-attention's ``capture_graph``): warm up on a side stream, use
static buffers (the trajectory's ``x``, ``step``, ``rng``), read everything that changes per step from
device memory (step counter -> timestep, coefficient row and noise counter), and never sync during
capture. One graph holds ``steps_per_graph`` consecutive steps; a one-step graph covers the remainder.
Graph and eager runs execute the same kernels on the same buffers, so they give the same images.
"""

from __future__ import annotations

from typing import Any

import torch


class EagerRunner:
    """Runs every step from Python (CPU, or CUDA without graphs)."""

    def __init__(self, traj: Any):
        self.traj = traj
        self.graphed = False

    def run(self, progress: Any = None) -> None:
        for _ in range(self.traj.plan.num_steps):
            self.traj.step_once()
            if progress is not None:
                progress.update(1)


class GraphRunner:
    """Captures ``steps_per_graph`` steps (U-Net forward + fused update) once, then replays."""

    def __init__(self, traj: Any, steps_per_graph: int = 1):
        self.traj = traj
        self.graphed = True
        num_steps = traj.plan.num_steps
        self.k = max(1, min(int(steps_per_graph), num_steps))
        # Warm-up on a side stream: lazy initialisation, cuDNN/Triton autotuning and allocator growth
        # happen here, not during capture.
        side = torch.cuda.Stream(device=traj.device)
        side.wait_stream(torch.cuda.current_stream(traj.device))
        with torch.cuda.stream(side):
            for _ in range(min(2, num_steps)):
                traj.step_once()
        torch.cuda.current_stream(traj.device).wait_stream(side)
        torch.cuda.synchronize(traj.device)
        traj.step.zero_()
        self.pool = torch.cuda.graph_pool_handle()
        self.graph_k = self._capture(self.k)
        self.graph_1 = self._capture(1) if num_steps % self.k else None

    def _capture(self, steps: int) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            for _ in range(steps):
                self.traj.step_once()
        return graph

    def run(self, progress: Any = None) -> None:
        full, rest = divmod(self.traj.plan.num_steps, self.k)
        for _ in range(full):
            self.graph_k.replay()
            if progress is not None:
                progress.update(self.k)
        for _ in range(rest):
            self.graph_1.replay()
            if progress is not None:
                progress.update(1)


def replay_schedule(num_steps: int, steps_per_graph: int) -> list[int]:
    """Steps covered by each replay, in order (e.g. ``(10, 4) -> [4, 4, 1, 1]``); used for bookkeeping tests."""
    k = max(1, min(steps_per_graph, num_steps))
    full, rest = divmod(num_steps, k)
    return [k] * full + [1] * rest
