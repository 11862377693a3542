"""The identity checks of ``benchmarks/gpu_check.py`` (its ``checks`` section), one function per check.

Each check takes the device to check on and returns a JSON-able dict with ``ok``; it raises
:class:`Skip` (with the reason) when it cannot run here. :data:`CHECKS` lists them with whether they
need a GPU and the seconds they are expected to take on one (the dry run prints these for the
checks it skips). Imported only inside the ``checks`` child process (torch is imported lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Skip(Exception):
    """The check cannot run here; the message says why."""


def _cuda_backends(device: Any) -> list[str]:
    """The fused backends to check: on CUDA both ``triton`` and ``cuda``, and a missing one is an error
    (a check must not pass on one backend while claiming two); on CPU (``--allow-cpu``) ``cpu``."""
    from fastddpm.dispatch import availability

    names = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    missing = {b: why for b in names for ok, why in [availability(b, device)] if not ok}
    if missing:
        raise RuntimeError(f"backend(s) unavailable on {device}: {missing}")
    return list(names)


def check_noise_identity(device: Any) -> dict[str, Any]:
    """fastddpm.randn of every fused backend vs the plain-torch Philox spec and vs each other, on
    an odd shape, seeds with high bits, per-sample timesteps; plus batch-composition independence."""
    import torch

    import fastddpm
    from fastddpm import _layout as L
    from fastddpm.noise import philox_normal

    backends = _cuda_backends(device)
    if not backends:
        raise Skip(f"no fused backend runs on {device}")
    b, shape = 5, (3, 7, 11)
    n = 3 * 7 * 11
    seed, offset = 0x9E3779B97F4A7C15, (1 << 33) + 7
    t = torch.randint(0, 1000, (b,), dtype=torch.int64)
    ref = philox_normal(seed, torch.arange(offset, offset + b), t, n, L.STREAM_STEP).reshape(b, *shape)
    out: dict[str, Any] = {}
    got = {}
    for name in backends:
        z = fastddpm.randn((b, *shape), seed=seed, sample_offset=offset, t=t.to(device), stream=L.STREAM_STEP,
                           device=device, backend=name)  # fmt: skip
        got[name] = z.cpu()
        part = fastddpm.randn((3, *shape), seed=seed, sample_offset=offset + 2, t=t[2:].to(device),
                              stream=L.STREAM_STEP, device=device, backend=name)  # fmt: skip
        out[name] = dict(max_abs_vs_spec=float((got[name] - ref).abs().max()),
                         batch_independent=bool(torch.equal(part.cpu(), got[name][2:])))  # fmt: skip
    if len(got) == 2:
        a, c = got.values()
        out["max_abs_triton_vs_cuda"] = float((a - c).abs().max())
    out["ok"] = all(v["max_abs_vs_spec"] <= 1e-4 and v["batch_independent"] for k, v in out.items() if k in got)
    out["ok"] = out["ok"] and out.get("max_abs_triton_vs_cuda", 0.0) <= 1e-4
    return out


def check_step_identity(device: Any) -> dict[str, Any]:
    """fastddpm.ddpm_step on each fused backend (Philox noise) vs the float64 reference."""
    import torch

    import fastddpm
    from fastddpm import Schedule

    backends = _cuda_backends(device)
    if not backends:
        raise Skip(f"no fused backend runs on {device}")
    schedule = Schedule()
    b, shape = 3, (5, 7, 11)
    x = torch.randn(b, *shape, device=device)
    m = torch.randn(b, *shape, device=device)
    t = torch.tensor([999, 500, 1], device=device)
    ref, ref0 = fastddpm.ddpm_step(m.double(), t, x.double(), schedule, seed=42, sample_offset=3, backend="reference")
    out: dict[str, Any] = {}
    got = {}
    for name in backends:
        prev, x0 = fastddpm.ddpm_step(m, t, x, schedule, seed=42, sample_offset=3, backend=name)
        got[name] = prev
        out[name] = dict(max_abs_prev=float((prev.double() - ref).abs().max()),
                         max_abs_x0=float((x0.double() - ref0).abs().max()))  # fmt: skip
    if len(got) == 2:
        a, c = got.values()
        out["max_abs_triton_vs_cuda"] = float((a - c).abs().max())
    out["ok"] = all(v["max_abs_prev"] <= 1e-4 and v["max_abs_x0"] <= 1e-4 for k, v in out.items() if k in got)
    return out


def check_graph_vs_eager(device: Any) -> dict[str, Any]:
    """fastddpm.sample with CUDA graphs (1 and 5 steps per graph) gives the same images as eager."""
    import torch

    import fastddpm
    from fastddpm.registry import load_model

    if device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    # The bundled trained model (real digits, not saturated noise), channels_last as the CLI runs it;
    # 7 images in batches of 4: a second runner (and graphs) for the remainder batch of 3.
    model, schedule, _ = load_model("digits", device)
    model = model.to(memory_format=torch.channels_last)
    out: dict[str, Any] = {}
    ok = True
    for backend in _cuda_backends(device):
        for dtype in (torch.float32, torch.bfloat16):
            kw = dict(num_inference_steps=12, seed=7, device=device, dtype=dtype, progress=False, backend=backend,
                      batch_size=4)  # fmt: skip
            eager = fastddpm.sample(model, schedule, 7, cuda_graph=False, **kw)
            res = {}
            for k in (1, 5):
                g = fastddpm.sample(model, schedule, 7, cuda_graph=True, steps_per_graph=k, **kw)
                res[f"k{k}_equal"] = bool(torch.equal(g, eager))
                res[f"k{k}_max_abs"] = float((g - eager).abs().max())
                ok = ok and res[f"k{k}_equal"]
            res["finite"] = bool(torch.isfinite(eager).all())
            res["unsaturated_fraction"] = float((eager.abs() < 0.99).double().mean())  # not all clamped
            ok = ok and res["finite"] and res["unsaturated_fraction"] > 0.05
            out[f"{backend}/{str(dtype).replace('torch.', '')}"] = res
    out["ok"] = ok
    return out


def check_images_across_devices(device: Any) -> dict[str, Any]:
    """How far the bundled model's images on the GPU are from the CPU's, for the README's identity statement.

    Noise and step are bitwise identical on every backend (``bitwise_identity``); whole images across devices
    are not, because the U-Net's own arithmetic differs (cuDNN vs CPU convolutions). Same seed, float32, DDPM
    100 steps and 64 images, on ``device`` and on the CPU: records the largest
    absolute difference in [-1, 1] units and the fraction of uint8 pixels that differ. ``ok`` only asks that
    both runs are finite: this is a measurement, not a promise.
    """
    import torch

    import fastddpm
    from fastddpm.registry import load_model

    if device.type != "cuda":
        raise Skip("needs a CUDA device to compare with the CPU")
    images = {}
    for dev in (device, torch.device("cpu")):
        model, schedule, _ = load_model("digits", dev)
        model = model.to(memory_format=torch.channels_last)
        images[dev.type] = fastddpm.sample(
            model, schedule, 64, num_inference_steps=100, seed=0, device=dev, dtype="float32", progress=False
        ).cpu()
    a, b = images["cuda"], images["cpu"]
    to8 = lambda x: ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    diff8 = to8(a) != to8(b)
    return {
        "ok": bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
        "max_abs": float((a - b).abs().max()),
        "mean_abs": float((a - b).abs().mean()),
        "uint8_pixels_differing": float(diff8.double().mean()),
        "images_differing": int(diff8.flatten(1).any(1).sum()),
        "bitwise_equal": bool(torch.equal(a, b)),
    }


def check_opcheck(device: Any) -> dict[str, Any]:
    """torch.library.opcheck of the three custom ops with CUDA tensors, for each fused backend."""
    import torch

    import fastddpm.ops  # noqa: F401  (registers torch.ops.fastddpm.*)
    from fastddpm import Schedule
    from fastddpm import _layout as L

    backends = _cuda_backends(device)
    if not backends:
        raise Skip(f"no fused backend runs on {device}")
    b, n = 3, 35
    out: dict[str, Any] = {}
    for name in backends:
        x, m, v = (torch.randn(b, n, device=device) for _ in range(3))
        coef = torch.rand(b, L.NCOEF, device=device)
        tval = torch.tensor([3, 2, 1], device=device)
        rows = torch.arange(b, device=device)
        rng = torch.tensor([5, 0], device=device)
        table = Schedule().table("q_sample", device)
        try:
            torch.library.opcheck(torch.ops.fastddpm.fused_step.default,
                                  (x, m, v, None, coef, tval, rows, None, rng, L.CLIP_RANGE, 1.0, L.VAR_LEARNED,
                                   L.NOISE_PHILOX, True, False, name))  # fmt: skip
            torch.library.opcheck(torch.ops.fastddpm.fused_q_sample.default,
                                  (x, None, table, tval, rng, L.NOISE_PHILOX, name))  # fmt: skip
            torch.library.opcheck(torch.ops.fastddpm.fused_randn.default, (tval, rng, b, n, 0, torch.float32, name))
            out[name] = "ok"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e)[:500]}"
    out["ok"] = all(out[name] == "ok" for name in backends)
    return out


# ----------------------------------------------------------------------------------------------------
# Bitwise identity of the public ops across backends (issue 13: the noise and the step, bitwise)
# ----------------------------------------------------------------------------------------------------


def _identity_cases(schedule: Any) -> list[tuple[str, Callable[[str, Any, dict], Any]]]:
    """``(name, run(backend, device, inputs))`` per op, dtype and noise mode; ``inputs`` are CPU tensors
    made once per case and moved to ``device`` inside ``run``."""
    import torch

    import fastddpm
    from fastddpm import _layout as L

    seed, offset = 0x9E3779B97F4A7C15, (1 << 33) + 7

    def on(inputs: dict, device: Any) -> dict:
        return {k: v.to(device) for k, v in inputs.items()}

    def randn(dtype, stream):
        def run(backend, device, inputs):
            t = inputs["t"].to(device)
            return fastddpm.randn((5, 3, 7, 11), seed=seed, sample_offset=offset, t=t, stream=stream, device=device,
                                  dtype=dtype, backend=backend)  # fmt: skip

        return run

    def q_sample(dtype, tensor_noise):
        def run(backend, device, inputs):
            d = on(inputs, device)
            noise = d["z"].to(dtype) if tensor_noise else None
            return fastddpm.q_sample(d["x"].to(dtype), d["t"], schedule, noise, seed=seed, sample_offset=offset,
                                     backend=backend)  # fmt: skip

        return run

    def ddpm(dtype, tensor_noise):
        def run(backend, device, inputs):
            d = on(inputs, device)
            noise = d["z"].to(dtype) if tensor_noise else None
            return fastddpm.ddpm_step(d["m"].to(dtype), d["t"], d["x"].to(dtype), schedule, noise=noise, seed=seed,
                                      sample_offset=offset, backend=backend)  # fmt: skip

        return run

    def ddim(dtype, eta):
        def run(backend, device, inputs):
            d = on(inputs, device)
            return fastddpm.ddim_step(d["m"].to(dtype), d["t"], d["x"].to(dtype), schedule, prev_t=(d["t"] - 7).clamp(min=-1),
                                      eta=eta, seed=seed, sample_offset=offset, backend=backend)  # fmt: skip

        return run

    f32, bf16 = torch.float32, torch.bfloat16
    return [
        ("randn/fp32/step", randn(f32, L.STREAM_STEP)),
        ("randn/bf16/init", randn(bf16, L.STREAM_INIT)),
        ("q_sample/fp32/philox", q_sample(f32, False)),
        ("q_sample/bf16/tensor", q_sample(bf16, True)),
        ("ddpm_step/fp32/philox", ddpm(f32, False)),
        ("ddpm_step/bf16/philox", ddpm(bf16, False)),
        ("ddpm_step/fp32/tensor", ddpm(f32, True)),
        ("ddim_step/fp32/eta0.5", ddim(f32, 0.5)),
        ("ddim_step/bf16/eta0", ddim(bf16, 0.0)),
    ]


def identity_backends(device: Any) -> list[tuple[str, Any]]:
    """``(backend, device)`` pairs compared by :func:`check_bitwise_identity`.

    On CUDA: ``triton`` and ``cuda`` on the GPU, and ``cpu`` on a CPU copy of the same inputs (each
    must be available: a check must not pass on fewer backends than it claims). On CPU (the dry run,
    which builds no extension): ``triton`` under the interpreter, else ``reference``, on two copies of
    the inputs -- the check's plumbing and the determinism of one backend.
    """
    import torch

    from fastddpm.dispatch import availability

    cpu = torch.device("cpu")
    if device.type == "cuda":
        pairs = [("triton", device), ("cuda", device), ("cpu", cpu)]
        missing = {b: why for b, d in pairs for ok, why in [availability(b, d)] if not ok}
        if missing:
            raise RuntimeError(f"backend(s) unavailable: {missing}")
        return pairs
    for name in ("triton", "reference"):
        if availability(name, cpu)[0]:
            return [(name, cpu), (name, cpu)]
    raise Skip("no backend runs on CPU")


def check_bitwise_identity(device: Any) -> dict[str, Any]:
    """``randn``, ``q_sample``, ``ddpm_step`` and ``ddim_step`` through the public ops on every backend of
    :func:`identity_backends`, from the same CPU-made inputs: every output must be ``torch.equal`` to the
    first backend's. Per case and backend pair: ``equal``, the number of mismatching elements and the
    largest absolute difference (for a report of how far apart they are when they are not equal)."""
    import torch

    from fastddpm import Schedule

    pairs = identity_backends(device)
    schedule = Schedule()
    gen = torch.Generator().manual_seed(1234)
    shape = (5, 3, 7, 11)
    inputs = dict(x=torch.randn(shape, generator=gen), m=torch.randn(shape, generator=gen),
                  z=torch.randn(shape, generator=gen), t=torch.tensor([999, 500, 31, 8, 1]))  # fmt: skip
    out: dict[str, Any] = {"backends": [f"{b}@{d}" for b, d in pairs]}
    ok = True
    for name, run in _identity_cases(schedule):
        got = []
        for backend, dev in pairs:
            res = run(backend, dev, inputs)
            got.append([r.cpu() for r in (res if isinstance(res, tuple) else (res,))])
        case: dict[str, Any] = {}
        base_name = f"{pairs[0][0]}@{pairs[0][1]}"
        for (backend, dev), outs in zip(pairs[1:], got[1:]):
            for i, (a, b) in enumerate(zip(got[0], outs)):
                equal = bool(torch.equal(a, b))
                diff = (a.double() - b.double()).abs()
                diff = torch.where(torch.isnan(a.double()) & torch.isnan(b.double()), 0.0, diff)
                case[f"{backend}@{dev} vs {base_name} [out {i}]"] = dict(
                    equal=equal, mismatches=int((a != b).sum()) if not equal else 0,
                    max_abs=float(diff.max()) if diff.numel() else 0.0,
                )  # fmt: skip
                ok = ok and equal
        out[name] = case
    out["ok"] = ok
    return out


def check_two_gpu_graphs(device: Any) -> dict[str, Any]:
    """CUDA-graph sampling on ``cuda:1`` while ``cuda:0`` is the current device: the capture must work
    (``cuda_graph=True`` raises instead of falling back) and give the eager images, bit for bit; the
    current device must still be ``cuda:0`` afterwards."""
    import torch

    import fastddpm
    from fastddpm.registry import load_model

    if device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    n = torch.cuda.device_count()
    if n < 2:
        raise Skip(f"needs two GPUs; {n} visible")
    torch.cuda.set_device(0)
    second = torch.device("cuda", 1)
    model, schedule, _ = load_model("digits", second)
    model = model.to(second).to(memory_format=torch.channels_last)
    out: dict[str, Any] = {}
    ok = True
    for k in (1, 4):
        kw = dict(num_inference_steps=10, seed=3, device=second, progress=False, batch_size=4, steps_per_graph=k)
        eager = fastddpm.sample(model, schedule, 6, cuda_graph=False, **kw)
        graphed = fastddpm.sample(model, schedule, 6, cuda_graph=True, **kw)
        equal = bool(torch.equal(graphed, eager))
        out[f"k{k}"] = dict(equal=equal, max_abs=float((graphed - eager).abs().max()), device=str(graphed.device))
        ok = ok and equal and graphed.device == second
    out["current_device_after"] = torch.cuda.current_device()
    out["ok"] = ok and out["current_device_after"] == 0
    return out


# ----------------------------------------------------------------------------------------------------
# The multistep solvers (issue 11): graphs vs eager, and the fused launchers bitwise
# ----------------------------------------------------------------------------------------------------


def check_multistep_graph_vs_eager(device: Any) -> dict[str, Any]:
    """``fastddpm.sample(sampler="dpmpp_2m_sde")`` in seed mode (in-kernel Philox SDE noise) with CUDA graphs (1
    and 4 steps per graph) ``torch.equal`` to eager, per fused backend; the bundled digits model, channels_last,
    7 images in batches of 4 (a remainder batch with graphs of its own), 10 steps; plus ``unipc`` at k=1."""
    import torch

    import fastddpm
    from fastddpm.registry import load_model

    if device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    model, schedule, _ = load_model("digits", device)
    model = model.to(memory_format=torch.channels_last)
    out: dict[str, Any] = {}
    ok = True
    for backend in _cuda_backends(device):
        for sampler, ks in (("dpmpp_2m_sde", (1, 4)), ("unipc", (1,))):
            kw = dict(sampler=sampler, num_inference_steps=10, seed=11, device=device, dtype=torch.float32,
                      progress=False, backend=backend, batch_size=4)  # fmt: skip
            eager = fastddpm.sample(model, schedule, 7, cuda_graph=False, **kw)
            res: dict[str, Any] = {}
            for k in ks:
                g = fastddpm.sample(model, schedule, 7, cuda_graph=True, steps_per_graph=k, **kw)
                res[f"k{k}_equal"] = bool(torch.equal(g, eager))
                res[f"k{k}_max_abs"] = float((g - eager).abs().max())
                ok = ok and res[f"k{k}_equal"]
            res["finite"] = bool(torch.isfinite(eager).all())
            res["unsaturated_fraction"] = float((eager.abs() < 0.99).double().mean())
            ok = ok and res["finite"] and res["unsaturated_fraction"] > 0.05
            out[f"{backend}/{sampler}"] = res
    out["ok"] = ok
    return out


def multistep_backends(device: Any) -> list[str]:
    """The fused backends :func:`check_multistep_launchers` compares: ``triton`` and ``cuda`` on CUDA (both
    required); on CPU (the dry run, no extension build) ``triton`` under the interpreter twice, else
    ``reference`` twice: the check's plumbing and one backend's determinism."""
    import torch

    from fastddpm.dispatch import availability

    if device.type == "cuda":
        return _cuda_backends(device)
    for name in ("triton", "reference"):
        if availability(name, torch.device("cpu"))[0]:
            return [name, name]
    raise Skip("no backend runs on CPU")


def check_multistep_launchers(device: Any) -> dict[str, Any]:
    """The fused multistep step (``fastddpm.driver.fused_multistep``) of each backend of
    :func:`multistep_backends` from the same inputs, every solver over a whole 6-step plan (warm-up rows,
    full-order rows, the lower-order final row; a fresh model output per step, Philox noise for the SDE
    variant): x, the corrector's xp and the history ring must be ``torch.equal`` across backends. The float32
    result's distance to the float64 ``reference`` run of the same loop is recorded (not bitwise: a bound)."""
    import torch

    from fastddpm import Schedule
    from fastddpm.driver import MULTISTEP_SAMPLERS, Stepper, fused_multistep, make_plan

    backends = multistep_backends(device)
    schedule = Schedule()
    b, shape, steps = 3, (5, 7, 11), 6
    gen = torch.Generator().manual_seed(4321)
    x_T = torch.randn((b, *shape), generator=gen)
    ms = torch.randn((steps, b, *shape), generator=gen)
    out: dict[str, Any] = {"backends": backends}
    ok = True
    for sampler in MULTISTEP_SAMPLERS:
        states = []
        for backend, dtype, dev in [(n, torch.float32, device) for n in backends] + [
            ("reference", torch.float64, torch.device("cpu"))
        ]:
            plan = make_plan(schedule, sampler, steps, "linspace", 0.0, dev)
            st = Stepper(plan, schedule, b, shape, dev, backend)
            st.x, st.xp, st.hist = st.x.to(dtype), st.xp.to(dtype), st.hist.to(dtype)
            st.reset(x_T.to(dev, dtype), 0x9E3779B97F4A7C15, 5)
            coef = plan.coef64.to(dev) if dtype == torch.float64 else plan.coef  # the float64 spec's own table
            for i in range(steps):
                fused_multistep(backend, st.x.view(b, -1), ms[i].to(dev, dtype).reshape(b, -1), st.xp, st.hist, None,
                                coef, plan.tval, st.step, st.rng, schedule=schedule, clip=plan.clip_mode,
                                noise_mode=plan.noise_mode)  # fmt: skip
                st.step.add_(1)
            states.append([t.cpu() for t in (st.x, st.xp, st.hist)])
        res: dict[str, Any] = {}
        for j, name in enumerate(("x", "xp", "hist")):
            a, c = states[0][j], states[1][j]
            equal = bool(torch.equal(a, c))
            res[f"{name}_equal"] = equal
            res[f"{name}_mismatches"] = 0 if equal else int((a != c).sum())
            ok = ok and equal
        res["x_max_abs_vs_float64"] = float((states[0][0].double() - states[-1][0]).abs().max())
        res["x_scale"] = float(states[-1][0].abs().max())
        res["finite"] = bool(torch.isfinite(states[0][0]).all())
        ok = ok and res["finite"] and res["x_max_abs_vs_float64"] <= 1e-4 * max(1.0, res["x_scale"])
        out[sampler] = res
    out["ok"] = ok
    return out


@dataclass(frozen=True)
class Check:
    """A check, whether it needs a CUDA device, and its expected seconds on one (printed by the dry run)."""

    fn: Callable[[Any], dict[str, Any]]
    gpu_only: bool
    expected_s: float


CHECKS: dict[str, Check] = {
    "noise_identity": Check(check_noise_identity, True, 10.0),
    "step_identity": Check(check_step_identity, True, 10.0),
    "bitwise_identity": Check(check_bitwise_identity, False, 15.0),
    "graph_vs_eager": Check(check_graph_vs_eager, True, 40.0),
    "two_gpu_graphs": Check(check_two_gpu_graphs, True, 20.0),
    "opcheck": Check(check_opcheck, True, 20.0),
    "multistep_graph_vs_eager": Check(check_multistep_graph_vs_eager, True, 25.0),
    "multistep_launchers": Check(check_multistep_launchers, False, 10.0),
    "images_across_devices": Check(check_images_across_devices, True, 20.0),
}
