"""CUDA-graph runner and step-progress bookkeeping, with the CUDA calls replaced by recording fakes.

No GPU is needed: ``torch.cuda.Stream``, ``graph``, ``CUDAGraph``, ``device``, ``stream``,
``current_stream``, ``synchronize``, ``graph_pool_handle`` and ``Event`` are monkeypatched with fakes
that log every call together with the device that is "current" at that moment (the innermost
``torch.cuda.device`` context, else ``cuda:0``). A fake trajectory counts its ``step_once`` calls and
notes the current device and stream of each, so the tests check which device and stream the warm-up
and every capture used, and the replay order.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from fastddpm import graphs
from fastddpm.progress import StepProgress


class FakeCuda:
    """Stands in for the parts of ``torch.cuda`` the graph runner and the progress tracker call."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.device_stack = [torch.device("cuda", 0)]
        self.stream_stack: list[FakeStream] = []
        self.capturing: FakeGraph | None = None
        self.pools: list[object] = []
        self.events: list[FakeEvent] = []
        self.default_streams: dict[str, FakeStream] = {}

    @property
    def current_device(self) -> torch.device:
        return self.device_stack[-1]

    def install(self, mp: pytest.MonkeyPatch) -> None:
        cuda = self

        class Stream(FakeStream):
            def __init__(self, device=None):
                super().__init__(cuda, torch.device(device) if device is not None else cuda.current_device)

        class CUDAGraph(FakeGraph):
            def __init__(self):
                super().__init__(cuda)

        class Event(FakeEvent):
            def __init__(self, *a, **k):
                super().__init__(cuda)

        mp.setattr(torch.cuda, "Stream", Stream)
        mp.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        mp.setattr(torch.cuda, "Event", Event)
        mp.setattr(torch.cuda, "device", self.device_ctx)
        mp.setattr(torch.cuda, "stream", self.stream_ctx)
        mp.setattr(torch.cuda, "graph", self.graph_ctx)
        mp.setattr(torch.cuda, "current_stream", self.current_stream)
        mp.setattr(torch.cuda, "synchronize", self.synchronize)
        mp.setattr(torch.cuda, "graph_pool_handle", self.graph_pool_handle)

    # -- context managers ----------------------------------------------------------------------
    def device_ctx(self, device):
        cuda = self

        class Ctx:
            def __enter__(self):
                cuda.device_stack.append(torch.device(device))
                cuda.log.append(("device_enter", torch.device(device)))

            def __exit__(self, *exc):
                cuda.device_stack.pop()

        return Ctx()

    def stream_ctx(self, stream):
        cuda = self

        class Ctx:
            def __enter__(self):
                cuda.stream_stack.append(stream)

            def __exit__(self, *exc):
                cuda.stream_stack.pop()

        return Ctx()

    def graph_ctx(self, graph, pool=None, stream=None, **kw):
        cuda = self
        cuda.log.append(("capture", graph, pool, stream, cuda.current_device))

        class Ctx:
            def __enter__(self):
                cuda.capturing = graph
                cuda.stream_stack.append(stream if stream is not None else "<process-wide capture stream>")

            def __exit__(self, *exc):
                cuda.stream_stack.pop()
                cuda.capturing = None

        return Ctx()

    # -- functions -----------------------------------------------------------------------------
    def current_stream(self, device=None):
        dev = torch.device(device) if device is not None else self.current_device
        if self.stream_stack and (device is None or self.stream_stack[-1] == "<process-wide capture stream>"
                                  or self.stream_stack[-1].device == dev):  # fmt: skip
            return self.stream_stack[-1]
        return FakeStream.default(self, dev)

    def synchronize(self, device=None):
        self.log.append(("synchronize", torch.device(device) if device is not None else self.current_device))

    def graph_pool_handle(self):
        pool = object()
        self.pools.append(pool)
        return pool


class FakeStream:
    def __init__(self, cuda: FakeCuda, device: torch.device):
        self.cuda, self.device = cuda, device
        cuda.log.append(("stream_new", self, device, cuda.current_device))

    @classmethod
    def default(cls, cuda: FakeCuda, device: torch.device) -> FakeStream:
        """The default stream of ``device`` (one per fake and device)."""
        key = str(device)
        if key not in cuda.default_streams:
            s = cls.__new__(cls)
            s.cuda, s.device = cuda, device
            cuda.default_streams[key] = s
        return cuda.default_streams[key]

    def wait_stream(self, other):
        self.cuda.log.append(("wait_stream", self, other))


class FakeGraph:
    def __init__(self, cuda: FakeCuda):
        self.cuda = cuda
        self.steps: list[int] = []  # step counters captured into this graph

    def replay(self):
        self.cuda.log.append(("replay", self, self.cuda.current_device))


class FakeEvent:
    """A CUDA event whose completion the test decides (``done``)."""

    def __init__(self, cuda: FakeCuda):
        self.cuda, self.done, self.stream = cuda, False, None
        cuda.events.append(self)

    def record(self, stream=None):
        self.stream = stream

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


class FakeTraj:
    """A trajectory whose ``step_once`` only counts and notes where it ran."""

    def __init__(self, cuda: FakeCuda, device: str, num_steps: int):
        self.cuda = cuda
        self.device = torch.device(device)
        self.plan = SimpleNamespace(num_steps=num_steps)
        self.step = torch.zeros(1, dtype=torch.int64)
        self.calls: list[tuple] = []  # (device, stream, capturing graph)

    def step_once(self):
        stream = self.cuda.current_stream()
        self.calls.append((self.cuda.current_device, stream, self.cuda.capturing))
        if self.cuda.capturing is not None:  # captured work does not run: the counter stays
            self.cuda.capturing.steps.append(int(self.step))
        else:
            self.step.add_(1)


@pytest.fixture
def fake_cuda(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    return cuda


@pytest.mark.parametrize("device", ["cuda:1", "cuda:0", "cuda"])
@pytest.mark.parametrize("num_steps,k", [(10, 4), (7, 1), (9, 3), (1, 5)])
def test_graph_runner_captures_on_one_stream_of_the_trajectory_device(fake_cuda, device, num_steps, k):
    traj = FakeTraj(fake_cuda, device, num_steps)
    runner = graphs.GraphRunner(traj, k)
    dev = torch.device(device)

    # One side stream, made for the trajectory's device while that device is current.
    made = [e for e in fake_cuda.log if e[0] == "stream_new"]
    assert len(made) == 1 and made[0][1] is runner.stream and made[0][2] == dev and made[0][3] == dev
    # Warm-up: two steps (or fewer), on that stream, with the device current.
    warm = [c for c in traj.calls if c[2] is None]
    assert len(warm) == min(2, num_steps)
    assert all(d == dev and s is runner.stream for d, s, _ in warm)
    default = FakeStream.default(fake_cuda, dev)  # the device's current stream: ordered before and after
    waits = [(e[1], e[2]) for e in fake_cuda.log if e[0] == "wait_stream"]
    assert waits == [(runner.stream, default), (default, runner.stream)]
    # Every capture: that device current, that stream and the runner's one pool handed to torch.cuda.graph.
    captures = [e for e in fake_cuda.log if e[0] == "capture"]
    assert len(captures) == (2 if num_steps % runner.k else 1)
    assert all(c[2] is runner.pool and c[3] is runner.stream and c[4] == dev for c in captures)
    assert fake_cuda.pools == [runner.pool]
    captured = [c for c in traj.calls if c[2] is not None]
    assert all(d == dev and s is runner.stream for d, s, _ in captured)
    # The warm-up's step counter was reset before the captures.
    assert runner.graph_k.steps == [0] * runner.k
    assert runner.graph_1 is None or runner.graph_1.steps == [0]
    assert ("synchronize", dev if dev.index is not None else torch.device("cuda")) in fake_cuda.log

    # Replay: the device current, k-step graphs first, then the remainder one by one.
    fake_cuda.log.clear()
    calls_before = len(traj.calls)
    runner.run()
    replays = [e for e in fake_cuda.log if e[0] == "replay"]
    expected = graphs.replay_schedule(num_steps, k)
    assert [runner.k if g is runner.graph_k else 1 for _, g, _ in replays] == expected
    assert [g is runner.graph_k for _, g, _ in replays] == [n == runner.k and i < num_steps // runner.k
                                                            for i, n in enumerate(expected)]  # fmt: skip
    assert all(d == dev for *_, d in replays)
    assert len(traj.calls) == calls_before  # replay never calls back into Python


def test_second_device_runner_does_not_reuse_the_first_devices_stream(fake_cuda):
    a = graphs.GraphRunner(FakeTraj(fake_cuda, "cuda:0", 5), 2)
    b = graphs.GraphRunner(FakeTraj(fake_cuda, "cuda:1", 5), 2)
    assert a.stream is not b.stream and a.stream.device.index == 0 and b.stream.device.index == 1
    caps = [e for e in fake_cuda.log if e[0] == "capture"]
    assert [(c[3].device.index, c[4].index) for c in caps] == [(0, 0), (0, 0), (1, 1), (1, 1)]


class Bar:
    def __init__(self):
        self.n = 0
        self.updates: list[int] = []

    def update(self, n):
        self.n += n
        self.updates.append(n)


def test_progress_advances_only_when_cuda_events_complete(fake_cuda):
    bar = Bar()
    tracker = StepProgress(bar, "cuda:1")
    for _ in range(5):
        tracker.queued(2)
    assert bar.n == 0 and len(fake_cuda.events) == 5  # queued, none complete: the bar stays
    assert all(e.stream.device == torch.device("cuda:1") for e in fake_cuda.events)
    fake_cuda.events[1].done = True  # out of order: the bar waits for the first
    tracker.poll()
    assert bar.n == 0
    fake_cuda.events[0].done = True
    tracker.poll()
    assert bar.n == 4
    tracker.finish()
    assert bar.n == 10 and all(e.done for e in fake_cuda.events)


def test_progress_keeps_a_bounded_number_of_events_in_flight(fake_cuda):
    bar = Bar()
    tracker = StepProgress(bar, "cuda")
    total = StepProgress.MAX_IN_FLIGHT + random.randint(3, 20)
    for _ in range(total):
        tracker.queued(1)
        assert len(tracker.pending) <= StepProgress.MAX_IN_FLIGHT
    assert bar.n == total - StepProgress.MAX_IN_FLIGHT  # the host waited for exactly the overflow
    tracker.finish()
    assert bar.n == total


def test_graph_runner_progress_counts_completed_replays(fake_cuda):
    traj = FakeTraj(fake_cuda, "cuda:1", 10)
    runner = graphs.GraphRunner(traj, 4)
    fake_cuda.events.clear()
    bar = Bar()
    runner.run(bar)
    assert bar.updates == [4, 4, 1, 1]  # each replay's steps, once its event completed (finish waits)
    assert len(fake_cuda.events) == 4


def test_progress_on_cpu_and_without_a_bar(fake_cuda):
    bar = Bar()
    tracker = StepProgress(bar, "cpu")
    tracker.queued(3)
    assert bar.n == 3 and not fake_cuda.events  # a CPU step is done when its call returns
    quiet = StepProgress(None, "cuda")
    quiet.queued(3)
    quiet.finish()
    assert not fake_cuda.events  # no bar: nothing recorded, nothing waited for
    runner = graphs.EagerRunner(FakeTraj(fake_cuda, "cpu", 6))
    runner.run(bar)
    assert bar.n == 9
