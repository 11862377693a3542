"""Checkpoint files of :class:`fastddpm.UNet`: diffusers checkpoints in, fastddpm checkpoints in and out.

fastddpm format: a directory with ``config.json`` (:meth:`UNetConfig.to_dict` plus
``"_class_name": "fastddpm.UNet"``) and ``model.safetensors`` (the state dict, diffusers key names).

diffusers format: ``config.json`` of a ``UNet2DModel`` and ``diffusion_pytorch_model.safetensors``
(or ``.bin``, optionally sharded with an ``.index.json``, optionally a ``variant`` such as ``fp16``),
either directly in the directory or in its ``unet/`` subdirectory (a saved pipeline). Reading a
directory never imports diffusers: the config is plain JSON, weights are read with safetensors or
``torch.load(weights_only=True)``.

Every failure is reported as one exception that names the file: ``FileNotFoundError`` for a missing
directory or file (listing what was expected), ``ValueError("checkpoint ... is corrupt or truncated:
...")`` for unreadable JSON or weights, ``ValueError`` listing missing / unexpected / mis-shaped keys
when the weights do not fit the config.

This module reads and writes files and state dicts; it never names the model class, so it sits below
:mod:`fastddpm.unet.model` (whose ``from_pretrained`` / ``from_diffusers`` / ``save_pretrained`` call it)
in the import graph. :func:`build` takes the class to instantiate.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from .config import UNetConfig

__all__ = [
    "CLASS_NAME",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "config_from_diffusers",
    "config_to_diffusers",
    "convert_diffusers_state_dict",
    "Checkpoint",
    "build",
    "load_state_dict_checked",
    "read_checkpoint",
    "read_diffusers",
    "save_pretrained",
    "to_diffusers",
]

CLASS_NAME = "fastddpm.UNet"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # + [.variant] + .safetensors | .bin (+ .index.json if sharded)

# diffusers UNet2DModel.__init__ defaults (diffusers 0.42.1; a test checks them against the signature).
# A key missing from a diffusers config.json takes these values, exactly as diffusers does.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# diffusers keys that change the architecture, with the only values fastddpm.UNet builds.
_FIXED_DIFFUSERS_KEYS: dict[str, tuple[Any, ...]] = {
    "time_embedding_type": ("positional",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}
# Used by diffusers only for time_embedding_type="learned", which is rejected above.
_IGNORED_DIFFUSERS_KEYS = frozenset({"num_train_timesteps"})


# --------------------------------------------------------------------------------------------------
# Config conversion
# --------------------------------------------------------------------------------------------------


def _strip_unetres(name: Any) -> Any:
    # diffusers get_down_block/get_up_block accept a "UNetRes" prefix on every block type.
    return name[7:] if isinstance(name, str) and name.startswith("UNetRes") else name


def config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """Translate a diffusers ``UNet2DModel`` config (its ``config.json`` or ``model.config``).

    Missing keys take diffusers' defaults. Keys starting with ``_`` are metadata and ignored; keys
    diffusers does not know either are ignored with a warning (diffusers does the same).

    Raises:
        ValueError: naming the key, when the config asks for an architecture fastddpm.UNet does not
            build (``class_embed_type``, ``time_embedding_type="fourier"``,
            ``resnet_time_scale_shift="scale_shift"``, ``downsample_type="resnet"``, skip blocks, ...).
    """
    cfg = dict(config)
    class_name = cfg.get("_class_name")
    if class_name not in (None, "UNet2DModel"):
        raise ValueError(f"config has _class_name={class_name!r}; only diffusers UNet2DModel configs can be converted")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        warnings.warn(f"ignoring unknown diffusers UNet2DModel config key(s) {unknown}", stacklevel=2)
    full = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if k in DIFFUSERS_DEFAULTS}}

    for key, allowed in _FIXED_DIFFUSERS_KEYS.items():
        if full[key] not in allowed:
            raise ValueError(
                f"unsupported diffusers UNet2DModel config: {key}={full[key]!r}; fastddpm.UNet supports only "
                f"{key} in {list(allowed)}"
            )
    if full["norm_num_groups"] is None:
        raise ValueError("unsupported diffusers UNet2DModel config: norm_num_groups=None; give an int")
    for key, allowed in (
        ("down_block_types", ("DownBlock2D", "AttnDownBlock2D")),
        ("up_block_types", ("UpBlock2D", "AttnUpBlock2D")),
    ):
        for name in full[key]:
            if _strip_unetres(name) not in allowed:
                raise ValueError(
                    f"unsupported diffusers UNet2DModel config: {key} contains {name!r}; fastddpm.UNet supports "
                    f"only {list(allowed)}"
                )
    if full["mid_block_type"] not in ("UNetMidBlock2D", None):
        raise ValueError(
            f"unsupported diffusers UNet2DModel config: mid_block_type={full['mid_block_type']!r}; fastddpm.UNet "
            "supports only 'UNetMidBlock2D' or None"
        )

    fields = {
        name: full[name]
        for name in (
            "sample_size",
            "in_channels",
            "out_channels",
            "block_out_channels",
            "layers_per_block",
            "mid_block_type",
            "add_attention",
            "dropout",
            "norm_num_groups",
            "norm_eps",
            "attn_norm_num_groups",
            "attention_head_dim",
            "flip_sin_to_cos",
            "freq_shift",
            "downsample_padding",
            "mid_block_scale_factor",
            "time_embedding_dim",
            "center_input_sample",
        )
    }
    fields["down_block_types"] = tuple(_strip_unetres(n) for n in full["down_block_types"])
    fields["up_block_types"] = tuple(_strip_unetres(n) for n in full["up_block_types"])
    # An int mid_block_scale_factor / freq_shift is stored as given; cast scalars to the config types.
    fields["mid_block_scale_factor"] = float(fields["mid_block_scale_factor"])
    fields["norm_eps"] = float(fields["norm_eps"])
    fields["dropout"] = float(fields["dropout"])
    return UNetConfig(**fields)


def config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The diffusers ``UNet2DModel`` keyword arguments that build the same network as ``config``."""
    out = config.to_dict()
    out.update(
        time_embedding_type="positional",
        act_fn="silu",
        resnet_time_scale_shift="default",
        downsample_type="conv",
        upsample_type="conv",
    )
    return out


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------

# Old diffusers AttentionBlock names (diffusers renames them on load, modeling_utils._fix_state_dict_keys_on_load).
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTENTION_LINEAR_RE = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def convert_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old diffusers attention keys and reshape conv-shaped attention weights.

    ``*.attentions.N.{query,key,value,proj_attn}.*`` become ``to_q``, ``to_k``, ``to_v``, ``to_out.0``;
    a ``[C, C, 1, 1]`` attention projection weight (1x1-conv form of older checkpoints) becomes
    ``[C, C]``. Other keys are passed through unchanged (the layouts are otherwise identical).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _OLD_ATTENTION_RE.match(key)
        if m:
            key = f"{m.group(1)}.{_OLD_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
        if _ATTENTION_LINEAR_RE.search(key) and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        if key in out:
            raise ValueError(f"state dict holds both the old and the new name of {key!r}")
        out[key] = value
    return out


def _preview(items: list[str], n: int = 5) -> str:
    head = ", ".join(items[:n])
    return f"{head}, ... ({len(items)} in all)" if len(items) > n else head


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "", assign: bool = False
) -> None:
    """Load ``state_dict`` into ``model`` after checking keys and shapes.

    ``assign=True`` makes the given tensors the parameters (no copy; for a model built on the meta
    device), as ``nn.Module.load_state_dict(assign=True)``.

    Raises:
        ValueError: listing (the first few) missing keys, unexpected keys and shape mismatches, so a
            checkpoint that does not fit the config fails with one readable message.
    """
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_preview(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_preview(mismatched)}")
        where = f" {source}" if source else ""
        raise ValueError(f"checkpoint{where} does not match the model config; " + "; ".join(parts))
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=True, assign=assign)


def build(
    cls: type[nn.Module],
    config: UNetConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    source: str,
) -> nn.Module:
    """``cls(config)`` holding ``state_dict``'s tensors (owned by the caller: no copy), in eval mode.

    The model is built on the meta device (no random init), the checked state dict assigned, then
    moved to ``device`` / ``dtype`` (``None``: keep the stored ones).
    """
    with torch.device("meta"):  # skip the random init: every parameter is replaced below
        model = cls(config)
    load_state_dict_checked(model, state_dict, source=source, assign=True)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _corrupt(path: Path, reason: object) -> ValueError:
    return ValueError(f"checkpoint {path} is corrupt or truncated: {reason}")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``ValueError`` naming the file when it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None
    if not isinstance(data, dict):
        raise _corrupt(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError on bad headers or short files
        raise _corrupt(path, e) from None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, disallowed globals
        raise _corrupt(path, e) from None
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise _corrupt(path, "expected a mapping of parameter names to tensors")
    return dict(data)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)


def _require_dir(path: Path, expected: str) -> None:
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(f"checkpoint directory {path} {what}; expected a directory holding {expected}")


def _diffusers_model_dir(path: Path) -> Path:
    """The directory holding the UNet2DModel ``config.json``: ``path`` itself or ``path/unet``."""
    expected = f"{CONFIG_NAME} and {DIFFUSERS_WEIGHTS}.safetensors (or .bin), or a unet/ subdirectory with them"
    _require_dir(path, expected)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "unet" / CONFIG_NAME).is_file():
        return path / "unet"
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path} or {path / 'unet'}; expected {expected}")


def _read_diffusers_weights(model_dir: Path, variant: str | None) -> tuple[dict[str, torch.Tensor], Path]:
    stem = DIFFUSERS_WEIGHTS if variant is None else f"{DIFFUSERS_WEIGHTS}.{variant}"
    for ext in (".safetensors", ".bin"):
        single = model_dir / f"{stem}{ext}"
        if single.is_file():
            return _read_weights(single), single
        index = model_dir / f"{stem}{ext}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise _corrupt(index, "no 'weight_map' object")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = model_dir / shard
                if not shard_path.is_file():
                    raise FileNotFoundError(f"shard {shard_path} listed in {index} does not exist")
                state.update(_read_weights(shard_path))
            return state, index
    raise FileNotFoundError(
        f"no weights in {model_dir}; expected {stem}.safetensors or {stem}.bin (or a sharded .index.json)"
    )


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint directory (or diffusers object) holds, read and checked, ready for :func:`build`.

    Attributes:
        config: The architecture.
        state_dict: Parameter name -> CPU tensor (diffusers key names), owned by this object.
        source: The weights file (or object) read, for messages.
        kind: ``"fastddpm"`` or ``"diffusers"``.
        model_dir: The directory holding ``config.json`` (``<pipeline>/unet`` for a pipeline), or None
            for an in-memory diffusers object.
    """

    config: UNetConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    kind: str
    model_dir: Path | None


def read_diffusers(path_or_model: str | os.PathLike | nn.Module, *, variant: str | None = None) -> Checkpoint:
    """Read a diffusers ``UNet2DModel``: an object (or pipeline object with ``.unet``), a model directory
    (``config.json`` + ``diffusion_pytorch_model.safetensors`` / ``.bin``) or a pipeline directory with
    ``unet/``. ``variant`` picks e.g. ``diffusion_pytorch_model.fp16.safetensors``. Never imports diffusers.
    """
    if isinstance(path_or_model, nn.Module) or hasattr(path_or_model, "unet"):
        obj = path_or_model
        if not isinstance(obj, nn.Module) or (hasattr(obj, "unet") and isinstance(obj.unet, nn.Module)):
            obj = obj.unet
        if not hasattr(obj, "config"):
            raise TypeError(f"{type(obj).__name__} has no diffusers config; pass a diffusers UNet2DModel")
        config = config_from_diffusers({"_class_name": type(obj).__name__, **dict(obj.config)})
        # Copies, so the two models never share storage.
        state = convert_diffusers_state_dict({k: v.detach().clone() for k, v in obj.state_dict().items()})
        return Checkpoint(config, state, f"from {type(obj).__name__} object", "diffusers", None)
    if not isinstance(path_or_model, str | os.PathLike):
        raise TypeError(f"expected a path or a diffusers UNet2DModel, got {type(path_or_model).__name__}")
    model_dir = _diffusers_model_dir(Path(path_or_model))
    config_path = model_dir / CONFIG_NAME
    try:
        config = config_from_diffusers(read_json(config_path))
    except (TypeError, ValueError) as e:
        if "corrupt or truncated" in str(e):
            raise
        raise ValueError(f"{config_path}: {e}") from None
    state, weights_path = _read_diffusers_weights(model_dir, variant)
    return Checkpoint(config, convert_diffusers_state_dict(state), str(weights_path), "diffusers", model_dir)


def read_checkpoint(path: str | os.PathLike, *, variant: str | None = None) -> Checkpoint:
    """Read a checkpoint directory of either kind, told apart by ``config.json``'s ``_class_name``.

    ``path`` holds ``config.json`` itself or (a pipeline) in ``unet/``. ``"fastddpm.UNet"``: a directory
    written by :func:`save_pretrained`; ``"UNet2DModel"``: a diffusers model (see :func:`read_diffusers`).

    Raises:
        FileNotFoundError: ``path`` is missing or not a directory, holds neither kind of checkpoint, or
            lacks the weights file (the message lists what was expected).
        ValueError: ``config.json`` is not a JSON object, names another class, or does not fit the weights.
    """
    path = Path(path)
    expected = (
        f"a fastddpm checkpoint ({CONFIG_NAME} + {WEIGHTS_NAME}) or a diffusers UNet2DModel model or pipeline "
        f"directory ({CONFIG_NAME} + {DIFFUSERS_WEIGHTS}.safetensors, directly or in unet/)"
    )
    _require_dir(path, expected)
    if (path / CONFIG_NAME).is_file():
        model_dir = path
    elif (path / "unet" / CONFIG_NAME).is_file():
        model_dir = path / "unet"
    else:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path} or {path / 'unet'}; expected {expected}")
    config_path = model_dir / CONFIG_NAME
    raw = read_json(config_path)
    class_name = raw.get("_class_name")
    if class_name == "UNet2DModel":
        return read_diffusers(model_dir, variant=variant)
    if class_name != CLASS_NAME:
        raise ValueError(
            f"{config_path} is neither a fastddpm.UNet config (_class_name {CLASS_NAME!r}) nor a diffusers "
            f"UNet2DModel config; found _class_name={class_name!r}"
        )
    if variant is not None:
        raise ValueError(f"variant={variant!r}: fastddpm checkpoints have one weights file, {WEIGHTS_NAME}")
    try:
        config = UNetConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from None
    weights_path = model_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {model_dir}; expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    return Checkpoint(config, _read_safetensors(weights_path), str(weights_path), "fastddpm", model_dir)


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (a :class:`fastddpm.UNet`) as ``path/config.json`` + ``path/model.safetensors`` (directory
    created); returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": CLASS_NAME, "_fastddpm_version": __version__, **model.config.to_dict()}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Write to temporary names, then rename, so an interrupted save never leaves a half-written checkpoint.
    tmp_weights, tmp_config = path / f".{WEIGHTS_NAME}.tmp", path / f".{CONFIG_NAME}.tmp"
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_weights, path / WEIGHTS_NAME)
    os.replace(tmp_config, path / CONFIG_NAME)
    return path


def to_diffusers(model: nn.Module) -> nn.Module:
    """A diffusers ``UNet2DModel`` with ``model``'s weights, on its device and dtype (imports diffusers)."""
    from diffusers import UNet2DModel

    param = next(model.parameters())
    out = UNet2DModel(**config_to_diffusers(model.config))
    out.load_state_dict(model.state_dict(), strict=True)
    return out.to(device=param.device, dtype=param.dtype).train(model.training)
