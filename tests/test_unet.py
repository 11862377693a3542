"""fastddpm.UNet against diffusers UNet2DModel, checkpoint I/O, presets and error handling."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastddpm import unet_io
from fastddpm.unet import PRESETS, UNet, UNetConfig, _norm_act

# REFERENCE.md section 3: google/ddpm-cifar10-32 as a diffusers UNet2DModel config.
CIFAR10_DIFFUSERS_CONFIG = {
    "_class_name": "UNet2DModel",
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
    "resnet_time_scale_shift": "default",
    "act_fn": "silu",
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
}

TINY = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "norm_eps": 1e-6,
    "attention_head_dim": None,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
}

# Diffusers configs compared layer for layer: (id, overrides of TINY, input height, input width).
DIFFUSERS_CASES = [
    ("one-head-lpb1-pad0", {}, 8, 8),
    (
        "heads-lpb2-flip-pad1-asym-attn",
        {
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "downsample_padding": 1,
            "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        },
        6,
        10,
    ),
    (
        "three-levels-scaled-mid",
        {
            "sample_size": 16,
            "in_channels": 1,
            "out_channels": 2,
            "block_out_channels": (16, 32, 24),
            "layers_per_block": 2,
            "down_block_types": ("AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
            "attention_head_dim": 8,
            "mid_block_scale_factor": 2.0,
            "center_input_sample": True,
            "attn_norm_num_groups": 4,
            "time_embedding_dim": 48,
            "freq_shift": 0,
        },
        12,
        4,
    ),
    ("mid-without-attention", {"add_attention": False, "norm_eps": 1e-5, "norm_num_groups": 4}, 8, 8),
    ("no-mid-block", {"mid_block_type": None}, 4, 8),
    (
        "single-level",
        {
            "block_out_channels": (24,),
            "down_block_types": ("AttnDownBlock2D",),
            "up_block_types": ("AttnUpBlock2D",),
            "attention_head_dim": 12,
        },
        5,
        7,
    ),
]


def _diffusers():
    return pytest.importorskip("diffusers")


def _perturb_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Random non-trivial weights everywhere (GroupNorm affines included), so a mis-wired layer shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _tiny_diffusers(**overrides):
    diffusers = _diffusers()
    return _perturb_(diffusers.UNet2DModel(**{**TINY, **overrides})).eval()


def _tiny_unet(**overrides) -> UNet:
    return _perturb_(UNet(UNetConfig(**{**TINY, **overrides}))).eval()


# --------------------------------------------------------------------------------------------------
# Numerics against diffusers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case,dtype",
    [(c, torch.float64) for c in DIFFUSERS_CASES] + [(c, torch.float32) for c in DIFFUSERS_CASES[:3]],
    ids=[f"{c[0]}-float64" for c in DIFFUSERS_CASES] + [f"{c[0]}-float32" for c in DIFFUSERS_CASES[:3]],
)
def test_forward_matches_diffusers(case, dtype):
    _, overrides, hgt, wid = case
    ref = _tiny_diffusers(**overrides).to(dtype)
    model = UNet.from_diffusers(ref, dtype=dtype)
    assert set(model.state_dict()) == set(ref.state_dict())
    cin = model.config.in_channels
    x = torch.randn(3, cin, hgt, wid, dtype=dtype)
    t = torch.randint(0, 1000, (3,))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    with torch.no_grad():
        expected = ref(x, t).sample
        out = model(x, t)
        assert out.shape == expected.shape == (3, model.config.out_channels, hgt, wid)
        assert out.dtype == dtype
        assert _rel_err(out, expected) <= tol
        # Scalar timesteps (Python int, 0-d tensor) broadcast to the batch as in diffusers.
        assert _rel_err(model(x, 517), ref(x, 517).sample) <= tol
        assert _rel_err(model(x, torch.tensor(3)), ref(x, torch.tensor(3)).sample) <= tol
        # Fractional timesteps in a float tensor are embedded as is (diffusers does the same for tensors).
        tf = torch.rand(3, dtype=torch.float64) * 999
        assert _rel_err(model(x, tf), ref(x, tf).sample) <= tol


def test_our_weights_load_into_diffusers():
    """The other direction: a fastddpm state dict loads strictly into the equivalent diffusers model."""
    diffusers = _diffusers()
    model = _tiny_unet(layers_per_block=2, attention_head_dim=16).double()
    ref = diffusers.UNet2DModel(**model.diffusers_config()).double().eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    t = torch.randint(0, 1000, (5,))
    with torch.no_grad():
        assert _rel_err(model(x, t), ref(x, t).sample) <= 1e-10
        assert _rel_err(model(x, t), model.to_diffusers()(x, t).sample) <= 1e-10


def test_diffusers_defaults_match_signature():
    diffusers = _diffusers()
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    expected = {k: p.default for k, p in params.items() if k != "self"}
    assert unet_io.DIFFUSERS_DEFAULTS == expected


# --------------------------------------------------------------------------------------------------
# Loading diffusers checkpoints from disk
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_from_diffusers_directory(tmp_path, safe):
    ref = _tiny_diffusers(layers_per_block=2)
    ref.save_pretrained(tmp_path, safe_serialization=safe)
    expected_file = "diffusion_pytorch_model." + ("safetensors" if safe else "bin")
    assert (tmp_path / expected_file).is_file()
    x = torch.randn(3, 3, 8, 8)
    t = torch.randint(0, 1000, (3,))
    with torch.no_grad():
        expected = ref(x, t).sample
        for model in (
            UNet.from_diffusers(tmp_path),
            UNet.from_pretrained(tmp_path),
            UNet.from_diffusers(str(tmp_path)),
        ):
            assert not model.training
            assert _rel_err(model(x, t), expected) <= 1e-5


def test_from_diffusers_pipeline_sharded_and_variant(tmp_path):
    diffusers = _diffusers()
    ref = _tiny_diffusers()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        expected = ref(x, t).sample

    pipe = diffusers.DDPMPipeline(unet=ref, scheduler=diffusers.DDPMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ref.save_pretrained(tmp_path / "variant", variant="fp16")

    with torch.no_grad():
        for model in (
            UNet.from_diffusers(tmp_path / "pipe"),
            UNet.from_pretrained(tmp_path / "pipe"),
            UNet.from_diffusers(pipe),
            UNet.from_diffusers(tmp_path / "sharded"),
            UNet.from_diffusers(tmp_path / "variant", variant="fp16"),
        ):
            assert _rel_err(model(x, t), expected) <= 1e-5
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        UNet.from_diffusers(tmp_path / "variant")


def test_old_attention_key_names(tmp_path):
    """query/key/value/proj_attn (some as 1x1-conv weights) load as to_q/to_k/to_v/to_out.0."""
    from safetensors.torch import save_file

    ref = _tiny_diffusers(layers_per_block=2)
    old = {}
    renamed = 0
    for key, value in ref.state_dict().items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".{new}." in key:
                key = key.replace(f".{new}.", f".{legacy}.")
                if key.endswith("weight") and legacy in ("query", "proj_attn"):
                    value = value[:, :, None, None]
                renamed += 1
                break
        old[key] = value.contiguous()
    assert renamed >= 8 * 3  # 3 attention layers with 4 linears each (weight + bias)
    save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**dict(ref.config), "_class_name": "UNet2DModel"}))
    model = UNet.from_diffusers(tmp_path)
    x, t = torch.randn(3, 3, 8, 8), torch.randint(0, 1000, (3,))
    with torch.no_grad():
        assert _rel_err(model(x, t), ref(x, t).sample) <= 1e-5


# --------------------------------------------------------------------------------------------------
# fastddpm format
# --------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    model = _tiny_unet(layers_per_block=2, dropout=0.1, attention_head_dim=16).double()
    out_dir = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
    raw = json.loads((out_dir / "config.json").read_text())
    assert raw["_class_name"] == "fastddpm.UNet"

    loaded = UNet.from_pretrained(out_dir, dtype=None)
    kept = UNet.from_pretrained(out_dir)
    assert loaded.config == model.config
    assert next(loaded.parameters()).dtype == torch.float64
    assert next(kept.parameters()).dtype == torch.float32
    x, t = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (3,))
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model.eval()(x, t))
    # Loaded parameters are independent tensors that train like any others.
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())


def test_config_dict_round_trip():
    for cfg in [*PRESETS.values(), UNetConfig(**{**TINY, "sample_size": (8, 16)})]:
        data = json.loads(json.dumps(cfg.to_dict()))
        assert UNetConfig.from_dict(data) == cfg
        with torch.device("meta"):
            assert UNet.from_config(data).config == cfg


def test_ddpm_helper_builds_the_reference_configs():
    diffusers_cfg = unet_io.config_from_diffusers(CIFAR10_DIFFUSERS_CONFIG)
    assert PRESETS["ddpm-cifar10"] == diffusers_cfg.replace(dropout=0.1)
    assert UNetConfig() == diffusers_cfg
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNetConfig.ddpm(resolution=32, attn_resolutions=(12,))
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig.ddpm(resolution=36, ch_mult=(1, 2, 2, 2, 2))


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_preset_parameter_counts():
    diffusers = _diffusers()
    with torch.device("meta"):
        ours = {name: UNet.from_preset(name) for name in PRESETS}
        ref_cifar = diffusers.UNet2DModel(**{k: v for k, v in CIFAR10_DIFFUSERS_CONFIG.items() if k[0] != "_"})
        ref_256 = diffusers.UNet2DModel(**ours["ddpm-256"].diffusers_config())
    assert _count(ours["ddpm-cifar10"]) == _count(ref_cifar) == 35_746_307
    shapes = {k: tuple(v.shape) for k, v in ours["ddpm-cifar10"].state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref_cifar.state_dict().items()}
    assert _count(ours["ddpm-256"]) == _count(ref_256) == 113_673_219
    assert ours["ddpm-256"].config.block_out_channels == (128, 128, 256, 256, 512, 512)
    digits = ours["digits"]
    assert _count(digits) < 1_000_000
    assert _count(digits) * 4 <= 5 * 2**20  # float32 checkpoint stays under 5 MB
    with pytest.raises(ValueError, match="available"):
        UNet.from_preset("nope")


def test_digits_preset_runs_and_trains():
    model = UNet.from_preset("digits")
    x = torch.randn(7, 1, 8, 8)
    t = torch.randint(0, 1000, (7,))
    out = model(x, t)
    assert out.shape == (7, 1, 8, 8)
    F.mse_loss(out, torch.randn_like(out)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters unused by forward: {no_grad}"


def test_preset_overrides():
    model = UNet.from_preset("digits", out_channels=2, dropout=0.2)
    assert model.config.out_channels == 2 and model.config.dropout == 0.2
    assert model.conv_out.out_channels == 2


# --------------------------------------------------------------------------------------------------
# Forward behaviour
# --------------------------------------------------------------------------------------------------


def test_channels_last_matches():
    model = _tiny_unet(layers_per_block=2).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t = torch.randint(0, 1000, (3,))
    with torch.no_grad():
        expected = model(x, t)
        model.to_channels_last()
        assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), t)
    assert _rel_err(out, expected) <= 1e-12


def test_strided_input_and_dropout():
    model = _tiny_unet(dropout=0.5).double()
    big = torch.randn(6, 3, 16, 24, dtype=torch.float64)
    x = big[::2, :, ::2, ::3]  # non-contiguous view, [3, 3, 8, 8]
    t = torch.randint(0, 1000, (3,))
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x.contiguous(), t))
        model.train()
        assert not torch.equal(model(x, t), model(x, t))  # dropout is active in training mode


def test_timestep_forms_agree():
    model = _tiny_unet().double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x, torch.full((3,), 250, dtype=torch.int64))
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250.0]), torch.full((3,), 250, dtype=torch.int32)):
            assert torch.equal(model(x, t), ref)


def test_bad_forward_inputs():
    model = _tiny_unet()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(2, 1, 8, 8), 1)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(2, 3, 7, 8), 1)
    with pytest.raises(ValueError, match=r"\[2\] tensor"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="t must be"):
        model(torch.randn(2, 3, 8, 8), "10")


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("with_add", [True, False])
def test_norm_act_matches_pytorch(silu, with_add):
    norm = _perturb_(torch.nn.GroupNorm(4, 12, eps=1e-6), scale=0.5).double()
    h = torch.randn(3, 12, 5, 7, dtype=torch.float64)
    add = torch.randn(3, 12, dtype=torch.float64) if with_add else None
    expected = norm(h + add[:, :, None, None] if with_add else h)
    expected = F.silu(expected) if silu else expected
    assert _rel_err(_norm_act(norm, h, add=add, silu=silu), expected) <= 1e-13


@pytest.mark.parametrize("silu", [True, False])
def test_fused_kernel_follows_norm_act_contract(silu):
    """The kernel _norm_act dispatches to on CUDA takes the same arguments and computes the same thing.

    Run here through the Triton interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1).
    """
    groupnorm = pytest.importorskip("fastddpm.kernels.groupnorm")
    norm = _perturb_(torch.nn.GroupNorm(4, 12, eps=1e-6), scale=0.5)
    h = torch.randn(3, 12, 5, 7).to(memory_format=torch.channels_last)
    add = torch.randn(3, 12)
    with torch.no_grad():
        fused = groupnorm.group_norm_silu(h, norm.weight, norm.bias, norm.num_groups, norm.eps, add=add, silu=silu)
        expected = _norm_act(norm.double(), h.double(), add=add.double(), silu=silu)
    assert fused.shape == h.shape and fused.dtype == h.dtype
    assert _rel_err(fused, expected) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_norm_path_on_cuda(monkeypatch, dtype):
    pytest.importorskip("fastddpm.kernels.groupnorm")
    model = UNet.from_preset("digits").cuda().to(dtype).eval()
    x = torch.randn(9, 1, 8, 8, device="cuda", dtype=dtype)
    t = torch.randint(0, 1000, (9,), device="cuda")
    with torch.no_grad():
        fused = model(x, t)
        monkeypatch.setenv("FASTDDPM_FUSED_NORM", "0")
        plain = model(x, t)
        exact = model.double()(x.double(), t)
    assert _rel_err(fused, exact) <= max(2 * _rel_err(plain, exact), 1e-5)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*config.json"):
        UNet.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="does not exist.*config.json"):
        UNet.from_diffusers(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        UNet.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        UNet.from_diffusers(tmp_path / "empty")
    ckpt = _tiny_unet().save_pretrained(tmp_path / "ckpt")
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        UNet.from_pretrained(ckpt)
    (tmp_path / "diff").mkdir()
    (tmp_path / "diff" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **TINY}))
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors or .*\.bin"):
        UNet.from_diffusers(tmp_path / "diff")


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_safetensors(tmp_path, keep):
    ckpt = _tiny_unet().save_pretrained(tmp_path)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated"):
        UNet.from_pretrained(ckpt)


def test_corrupt_json_and_bin(tmp_path):
    ckpt = _tiny_unet().save_pretrained(tmp_path / "a")
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="config.json is corrupt or truncated"):
        UNet.from_pretrained(ckpt)

    ref = _tiny_diffusers()
    ref.save_pretrained(tmp_path / "b", safe_serialization=False)
    weights = tmp_path / "b" / "diffusion_pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin is corrupt or truncated"):
        UNet.from_diffusers(tmp_path / "b")


def test_state_dict_mismatch_lists_keys_and_shapes(tmp_path):
    ckpt = _tiny_unet().save_pretrained(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())

    (ckpt / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 96]}))
    with pytest.raises(ValueError, match=r"shape mismatches: .*checkpoint \(64,.*vs model \(96,"):
        UNet.from_pretrained(ckpt)

    (ckpt / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    with pytest.raises(ValueError, match=r"missing keys: down_blocks\.0\.resnets\.1\.") as info:
        UNet.from_pretrained(ckpt)
    assert "in all)" in str(info.value)  # long lists are cut, with the total

    (ckpt / "config.json").write_text(json.dumps({**config, "mid_block_type": None}))
    with pytest.raises(ValueError, match=r"unexpected keys: mid_block\."):
        UNet.from_pretrained(ckpt)

    (ckpt / "config.json").write_text(json.dumps({**config, "norm_num_groups": 5}))
    with pytest.raises(ValueError, match=r"config\.json: invalid UNetConfig: .*norm_num_groups=5"):
        UNet.from_pretrained(ckpt)


UNSUPPORTED = [
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("downsample_type", "resnet"),
    ("upsample_type", "resnet"),
    ("act_fn", "gelu"),
    ("down_block_types", ["DownBlock2D", "SkipDownBlock2D"]),
    ("up_block_types", ["AttnSkipUpBlock2D", "UpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("norm_num_groups", None),
]


@pytest.mark.parametrize("key,value", UNSUPPORTED, ids=[k for k, _ in UNSUPPORTED])
def test_unsupported_diffusers_config(tmp_path, key, value):
    config = {"_class_name": "UNet2DModel", **TINY, key: value}
    with pytest.raises(ValueError, match=f"unsupported diffusers UNet2DModel config: {key}"):
        unet_io.config_from_diffusers(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=key):
        UNet.from_diffusers(tmp_path)


def test_diffusers_config_edge_cases():
    with pytest.warns(UserWarning, match="made_up_key"):
        cfg = unet_io.config_from_diffusers({**TINY, "made_up_key": 1})
    assert cfg == UNetConfig(**TINY)
    with pytest.raises(ValueError, match="only diffusers UNet2DModel"):
        unet_io.config_from_diffusers({"_class_name": "UNet2DConditionModel"})
    # Missing keys take diffusers' defaults, not fastddpm's.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = unet_io.config_from_diffusers(
            {k: TINY[k] for k in ("block_out_channels", "down_block_types", "up_block_types")}
        )
    assert (cfg.flip_sin_to_cos, cfg.freq_shift, cfg.downsample_padding, cfg.norm_eps, cfg.attention_head_dim) == (
        True,
        0,
        1,
        1e-5,
        8,
    )


@pytest.mark.parametrize(
    "change,match",
    [
        ({"norm_num_groups": 5}, "not divisible by norm_num_groups"),
        ({"block_out_channels": (32, 64, 64)}, "same length"),
        ({"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")}, "CrossAttnDownBlock2D"),
        ({"attention_head_dim": 24}, "attention_head_dim=24"),
        ({"dropout": 1.0}, "dropout"),
        ({"downsample_padding": 2}, "downsample_padding"),
        ({"attn_norm_num_groups": 7}, "attn_norm_num_groups"),
        ({"layers_per_block": 0}, "layers_per_block"),
    ],
)
def test_invalid_config(change, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**TINY, **change})


def test_from_dict_rejects_unknown_keys_and_config_is_frozen():
    with pytest.raises(ValueError, match="unknown UNetConfig key.*class_embed_type"):
        UNetConfig.from_dict({**TINY, "class_embed_type": "timestep"})
    cfg = UNetConfig(**TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.in_channels = 4  # type: ignore[misc]
    assert UNetConfig.from_dict({**cfg.to_dict(), "_class_name": "fastddpm.UNet"}) == cfg


# --------------------------------------------------------------------------------------------------
# Layout of the package
# --------------------------------------------------------------------------------------------------

# The names fastddpm/unet.py and fastddpm/unet_io.py defined before the split into fastddpm/unet/.
UNET_NAMES = (
    "PRESETS UNet UNetConfig DOWN_BLOCK_TYPES UP_BLOCK_TYPES MID_BLOCK_TYPES TimestepEmbedding ResBlock "
    "SelfAttention Downsample Upsample DownBlock MidBlock UpBlock timestep_embedding _norm_act"
).split()
UNET_IO_NAMES = (
    "CLASS_NAME CONFIG_NAME WEIGHTS_NAME DIFFUSERS_WEIGHTS DIFFUSERS_DEFAULTS config_from_diffusers "
    "config_to_diffusers convert_diffusers_state_dict from_diffusers from_pretrained load_state_dict_checked "
    "save_pretrained to_diffusers"
).split()


def test_names_stay_importable_from_where_they_were():
    import fastddpm
    from fastddpm import unet

    missing = [n for n in UNET_NAMES if not hasattr(unet, n)] + [n for n in UNET_IO_NAMES if not hasattr(unet_io, n)]
    assert not missing
    assert fastddpm.UNet is unet.UNet and fastddpm.UNetConfig is unet.UNetConfig
    assert all(hasattr(unet, n) for n in unet.__all__) and all(hasattr(unet_io, n) for n in unet_io.__all__)


def test_unet_io_functions_are_the_methods(tmp_path):
    """unet_io.from_pretrained / from_diffusers / save_pretrained give what the UNet methods give."""
    model = _tiny_unet()
    path = unet_io.save_pretrained(model, tmp_path / "ckpt")
    a, b = unet_io.from_pretrained(path), UNet.from_pretrained(path)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)  # the same stored numbers
    with pytest.raises(FileNotFoundError, match="no config.json"):
        unet_io.from_diffusers(tmp_path)
