"""``SamplingConfig``: validation, JSON round trip, diff, and that every option reaches every sampling path."""

from __future__ import annotations

import dataclasses
import inspect
import json
import random

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import sampling, shards
from fastddpm.config import MULTISTEP_SAMPLERS, ConfigError, SamplingConfig, field_names
from fastddpm.schedule import Schedule

FIELDS = field_names()
SHAPE = (2, 3, 5)


def _multistep() -> str:
    """A multistep sampler name, registered if the registry does not have one yet (issue 11 adds them)."""
    have = [s for s in sampling.SAMPLERS if s in MULTISTEP_SAMPLERS]
    return "unipc" if "unipc" in have else (have[0] if have else MULTISTEP_SAMPLERS[0])  # unipc takes orders 1-3


# A non-default value for every field, with the other fields it needs. A new field without an entry here
# fails test_every_field_has_a_probe, so it cannot be left out of the reach tests below.
def _probes() -> dict[str, dict]:
    ms = _multistep()
    return {
        "sampler": {"sampler": "ddim"},
        "num_inference_steps": {"num_inference_steps": random.randint(2, 9)},
        "timestep_spacing": {"timestep_spacing": random.choice(["trailing", "linspace", "ddim5"])},
        "eta": {"sampler": "ddim", "eta": random.uniform(0.1, 1.0)},
        "use_clipped_model_output": {"sampler": "ddim", "use_clipped_model_output": True},
        "seed": {"seed": random.randrange(1, 2**64)},
        "batch_size": {"batch_size": random.randint(2, 4)},
        "dtype": {"dtype": random.choice(["bfloat16", "float16"])},
        "cuda_graph": {"cuda_graph": "off"},
        "steps_per_graph": {"steps_per_graph": random.randint(2, 5)},
        "backend": {"backend": "reference"},
        "shape": {"shape": SHAPE},
        "solver_order": {"sampler": ms, "num_inference_steps": 4, "solver_order": random.choice([1, 3])},
        "use_karras_sigmas": {"sampler": ms, "num_inference_steps": 4, "use_karras_sigmas": True},
        "lower_order_final": {"sampler": "dpmpp_2m", "num_inference_steps": 4, "lower_order_final": False},
        "final_sigmas_type": {"sampler": ms, "num_inference_steps": 4, "final_sigmas_type": "sigma_min"},
    }


@pytest.fixture
def with_multistep(monkeypatch):
    """The registry with a multistep sampler name in it (validation reads ``sampling.SAMPLERS`` each time)."""
    if _multistep() not in sampling.SAMPLERS:
        monkeypatch.setattr(sampling, "SAMPLERS", (*sampling.SAMPLERS, _multistep()))


def test_every_field_has_a_probe():
    assert set(_probes()) == set(FIELDS)


def test_defaults_are_valid_and_round_trip_through_json(with_multistep):
    cfgs = [SamplingConfig()] + [SamplingConfig(**kw) for kw in _probes().values()]
    for cfg in cfgs:
        back = SamplingConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and back.diff(cfg) == []


def test_diff_names_exactly_the_changed_fields(with_multistep):
    base = SamplingConfig()
    for name, kw in _probes().items():
        changed = SamplingConfig(**kw)
        assert name in changed.diff(base)
        assert set(changed.diff(base)) == {k for k in kw if getattr(changed, k) != getattr(base, k)}
        assert changed.diff(base) == base.diff(changed)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown SamplingConfig field.*'steps'.*allowed: sampler"):
        SamplingConfig.from_dict({"steps": 10})
    with pytest.raises(TypeError):
        SamplingConfig.from_dict([("sampler", "ddpm")])


def test_sampler_names_come_from_the_registry_at_validation_time(monkeypatch):
    with pytest.raises(ConfigError, match="unknown sampler 'euler'; allowed: 'ddpm', 'ddim', 'x0'") as info:
        SamplingConfig(sampler="euler")
    assert info.value.field == "sampler"
    monkeypatch.setattr(sampling, "SAMPLERS", (*sampling.SAMPLERS, "euler"))
    assert SamplingConfig(sampler="euler").sampler == "euler"


@pytest.mark.parametrize(
    ("kw", "field", "match"),
    [
        ({"sampler": "ddpm", "eta": 0.5}, "eta", "eta=0.5 has no effect with sampler 'ddpm'; it applies to ddim"),
        ({"sampler": "x0", "eta": 0.1}, "eta", "applies to ddim"),
        ({"use_clipped_model_output": True}, "use_clipped_model_output", "applies to ddim"),
        ({"sampler": "ddim", "solver_order": 2}, "solver_order", "applies to dpmpp_2m"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas", "applies to dpmpp_2m"),
        ({"lower_order_final": False}, "lower_order_final", "applies to"),
        ({"sampler": "x0", "num_inference_steps": 10}, "num_inference_steps", "one model evaluation"),
        ({"eta": float("nan"), "sampler": "ddim"}, "eta", "finite"),
        ({"eta": -0.1, "sampler": "ddim"}, "eta", ">= 0"),
        ({"seed": -1}, "seed", r"\[0, 2\*\*64\)"),
        ({"seed": 2**64}, "seed", r"\[0, 2\*\*64\)"),
        ({"seed": 2**65}, "seed", r"\[0, 2\*\*64\)"),
        ({"num_inference_steps": 0}, "num_inference_steps", ">= 1"),
        ({"batch_size": 0}, "batch_size", ">= 1"),
        ({"steps_per_graph": 0}, "steps_per_graph", ">= 1"),
        ({"cuda_graph": "always"}, "cuda_graph", "allowed: 'auto', 'on', 'off', True, False"),
        ({"cuda_graph": None}, "cuda_graph", "allowed"),
        ({"dtype": torch.float64}, "dtype", "allowed: 'auto', 'float32', 'bfloat16', 'float16'"),
        ({"dtype": "fp16"}, "dtype", "allowed"),
        ({"backend": "gpu"}, "backend", "allowed: 'auto', 'reference'"),
        ({"timestep_spacing": "evenly"}, "timestep_spacing", "allowed: 'leading'"),
        ({"shape": (1, 8)}, "shape", r"\(C, H, W\)"),
        ({"shape": (1, 0, 8)}, "shape", ">= 1"),
        ({"solver_order": 4, "sampler": MULTISTEP_SAMPLERS[0]}, "solver_order", "one of 1, 2, 3"),
        ({"final_sigmas_type": "one"}, "final_sigmas_type", "allowed: 'zero', 'sigma_min'"),
    ],
)
def test_bad_values_raise_naming_the_field(with_multistep, kw, field, match):
    with pytest.raises(ConfigError, match=match) as info:
        SamplingConfig(**kw)
    assert info.value.field == field


@pytest.mark.parametrize(
    "kw", [{"seed": True}, {"seed": 1.0}, {"seed": "3"}, {"use_clipped_model_output": "false", "sampler": "ddim"}]
)
def test_wrong_types_raise_type_error(kw):
    with pytest.raises(TypeError):
        SamplingConfig(**kw)


def test_normalisation():
    assert SamplingConfig(cuda_graph=True).cuda_graph == "on"
    assert SamplingConfig(cuda_graph=False).cuda_graph == "off"
    assert SamplingConfig(dtype=None).dtype == SamplingConfig(dtype=torch.float32).dtype == "float32"
    cfg = SamplingConfig(dtype=torch.bfloat16)
    assert cfg.dtype == "bfloat16" and cfg.torch_dtype == torch.bfloat16 == cfg.autocast_dtype
    assert SamplingConfig(dtype="float32").autocast_dtype is None
    assert SamplingConfig().dtype == "auto"  # resolved per model and device by sampling.resolve_auto_dtype
    with pytest.raises(ValueError, match="resolve_auto_dtype"):
        _ = SamplingConfig().torch_dtype
    assert SamplingConfig(seed=np.uint64(2**64 - 1)).seed == 2**64 - 1  # numpy ints are ints
    assert SamplingConfig(shape=[1, np.int64(8), 8]).shape == (1, 8, 8)
    assert SamplingConfig(sampler="x0", num_inference_steps=1).num_inference_steps == 1
    assert SamplingConfig(sampler="ddim", eta=1).eta == 1.0 and isinstance(
        SamplingConfig(sampler="ddim", eta=1).eta, float
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingConfig().seed = 3  # type: ignore[misc]


# ------------------------------------------------------------------ every option reaches every path
def test_sample_keywords_are_config_fields_with_the_same_defaults():
    """Each keyword of sample() is a SamplingConfig field (same default) or one of a few non-config arguments;
    each field is a keyword of sample(), iter_batches() and sample_sharded()."""
    defaults = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}
    params = inspect.signature(fastddpm.sample).parameters
    assert set(params) - set(FIELDS) == set(sampling.NON_CONFIG_ARGS)
    for fn in (fastddpm.sample, sampling.iter_batches, shards.sample_sharded):
        params = inspect.signature(fn).parameters
        assert set(FIELDS) <= set(params), f"{fn.__name__} lacks {set(FIELDS) - set(params)}"
        for name in FIELDS:
            default = params[name].default
            assert default == defaults[name] or SamplingConfig(**{name: default}) == SamplingConfig(), (fn, name)


@pytest.fixture
def recorded(monkeypatch) -> list[SamplingConfig]:
    """Replaces the sampling core with a recorder: the configs that reach it (and zeros as images)."""
    seen: list[SamplingConfig] = []

    def fake(model, schedule, start, stop, *, device, progress, config):
        seen.append(config)
        yield start, torch.zeros((stop - start, *config.shape))

    monkeypatch.setattr(sampling, "iter_batches", fake)
    return seen


def _model(x, t):
    return x


@pytest.mark.parametrize("name", FIELDS)
def test_each_option_reaches_the_one_process_and_the_sharded_path(name, with_multistep, recorded, tmp_path):
    kw = _probes()[name]
    kw.setdefault("shape", SHAPE)
    schedule = Schedule(num_train_timesteps=20)
    fastddpm.sample(_model, schedule, 5, device="cpu", progress=False, **kw)
    shards.sample_sharded(_model, schedule, tmp_path / "s.npz", 5, device="cpu", progress=False, **kw)
    cfg = SamplingConfig(sampler="ddim", eta=0.3, seed=7, shape=SHAPE)
    fastddpm.sample(_model, schedule, 5, device="cpu", progress=False, config=cfg)
    assert len(recorded) == 3
    want = SamplingConfig(**kw)
    if want.dtype == "auto":  # resolved before sampling; a plain function (no parameters) gets float32
        want = want.replace(dtype="float32")
    for got in recorded[:2]:
        assert getattr(got, name) == getattr(want, name), name
    assert recorded[2] == cfg.replace(dtype="float32")
    manifest = json.loads((shards.shard_folder(tmp_path / "s.npz") / "manifest.json").read_text())
    assert SamplingConfig.from_dict(manifest["config"]["sampling"]) == recorded[1]  # recorded whole


def test_keyword_and_config_together_is_refused():
    cfg = SamplingConfig(seed=3, shape=SHAPE)
    with pytest.raises(TypeError, match=r"sample\(\) got sampler, seed both as keyword and in config="):
        fastddpm.sample(_model, Schedule(), 2, seed=4, sampler="ddim", config=cfg)
    with pytest.raises(TypeError, match="config must be a SamplingConfig"):
        fastddpm.sample(_model, Schedule(), 2, config={"seed": 3})


def test_config_and_keywords_give_the_same_images():
    schedule = Schedule(num_train_timesteps=30)
    kw = {"sampler": "ddim", "eta": 0.7, "num_inference_steps": 4, "seed": random.randrange(2**64), "shape": (1, 3, 5)}
    a = fastddpm.sample(lambda x, t: 0.3 * x, schedule, 3, progress=False, **kw)
    b = fastddpm.sample(lambda x, t: 0.3 * x, schedule, 3, progress=False, config=SamplingConfig(**kw))
    assert torch.equal(a, b)  # one code path: the keywords only build the config
