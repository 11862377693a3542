"""Sharded, resumable sampling into one ``.npz`` (what ``fastddpm sample`` runs under torchrun).

The N global sample indices are cut into fixed-size shards: shard ``k`` holds ``[k*S, min(N, (k+1)*S))``.
Noise is keyed by global sample index, so a shard's images do not depend on which rank draws it or how
many ranks there are. Shards live in ``<out>.shards/`` next to the output::

    manifest.json        the sampling config the shards belong to (and, once merged, the output's sha256)
    shard-000000.npy     uint8 [count, H, W, C]: global samples [0, S)
    shard-000000.json    {"shard", "start", "stop", "count", "shape", "sha256"} (sha256 of the array bytes)
    ...

A run (1) has rank 0 check ``manifest.json`` against this run's config (a mismatch is an error: shards of
different configs are never mixed) or write it, (2) has every rank verify a share of the shards (record,
count, shape, checksum), (3) deals the missing or corrupt shards round-robin to the ranks, which sample
them and write each one atomically (temp file + rename; the array first, its record second), and (4) has
rank 0 merge the shards in sample order into ``out``, verifying every checksum again on the way. A killed
rank loses at most the shard it was drawing; rerunning the same command (with any number of ranks)
regenerates exactly the shards that are missing or fail their checksum.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as D
from .images import _atomic_write, make_grid, to_uint8_nhwc

FORMAT = "fastddpm-shards"
FORMAT_VERSION = 1
SHARD_SIZE_ENV = "FASTDDPM_SHARD_SIZE"
BATCHES_PER_SHARD = 4  # default shard size, in batches: small enough that a killed rank loses little


# --------------------------------------------------------------------------------------- layout
def shard_folder(out: str | os.PathLike) -> Path:
    """The shard folder of output ``out``: ``<out>.shards`` (``samples.npz`` -> ``samples.npz.shards/``)."""
    out = Path(out)
    return out.with_name(out.name + ".shards")


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every shard: fixed size ``shard_size``, the last one possibly shorter."""
    if num_samples < 1 or shard_size < 1:
        raise ValueError(f"need num_samples >= 1 and shard_size >= 1, got {num_samples} and {shard_size}")
    return [(s, min(num_samples, s + shard_size)) for s in range(0, num_samples, shard_size)]


def assign_shards(todo: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of the shards still to draw: ``todo`` dealt round-robin (balanced on resume too)."""
    return sorted(todo)[rank::world_size]


def resolve_shard_size(shard_size: int | None, batch_size: int) -> int:
    """``shard_size`` if given, else env ``FASTDDPM_SHARD_SIZE``, else ``4 * batch_size``."""
    if shard_size is None:
        raw = os.environ.get(SHARD_SIZE_ENV, "")
        if raw:
            try:
                shard_size = int(raw)
            except ValueError:
                raise ValueError(f"{SHARD_SIZE_ENV}={raw!r} is not an integer") from None
    if shard_size is None:
        return BATCHES_PER_SHARD * batch_size
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard size must be a positive int, got {shard_size!r}")
    return shard_size


# ------------------------------------------------------------------------------------- identity
def model_fingerprint(model: Any) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes) and its ``config``, as hex.

    Identifies the weights, not the path they were loaded from: a moved checkpoint still matches, a
    retrained one does not. Non-modules hash their ``repr``.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(repr(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg).encode())
    if not isinstance(model, torch.nn.Module):
        h.update(repr(model).encode())
        return h.hexdigest()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sampling_config(
    model: Any,
    schedule: Any,
    *,
    num_samples: int,
    shard_size: int,
    image_shape: tuple[int, int, int],
    seed: int,
    num_inference_steps: int | None,
    sampler: str,
    eta: float,
    timestep_spacing: str | None,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Everything that decides the images of a shard: the config ``manifest.json`` records and compares."""
    return _jsonable(
        {
            "num_samples": num_samples,
            "shard_size": shard_size,
            "image_shape": list(image_shape),
            "seed": seed,
            "steps": num_inference_steps,
            "sampler": sampler,
            "eta": float(eta),
            "spacing": timestep_spacing,
            "dtype": str(dtype or torch.float32).removeprefix("torch."),
            "model_sha256": model_fingerprint(model),
            "schedule": schedule.to_dict(),
        }
    )


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out if d else {prefix: d}


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable ``key: old in the shards, new now`` lines for every differing (nested) field."""
    a, b = _flatten(stored), _flatten(_jsonable(current))
    return [
        f"{k.rstrip('.')}: {a.get(k, '(absent)')!r} in the shards, {b.get(k, '(absent)')!r} now"
        for k in sorted(set(a) | set(b))
        if a.get(k, "(absent)") != b.get(k, "(absent)")
    ]


# ---------------------------------------------------------------------------------- the folder
@dataclass
class ShardFolder:
    """A ``<out>.shards`` folder: the manifest, shard arrays and their records."""

    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def array_path(self, k: int) -> Path:
        return self.path / f"shard-{k:06d}.npy"

    def record_path(self, k: int) -> Path:
        return self.path / f"shard-{k:06d}.json"

    def prepare(self, config: dict[str, Any], info: dict[str, Any]) -> bool:
        """Create the folder and manifest, or check an existing manifest against ``config``.

        Run by one process (rank 0) before any shard is written. Returns ``True`` when resuming an
        existing folder. Raises ``ValueError`` (with what to do) when the folder belongs to another
        config, its manifest is unreadable, or it is not a shard folder at all.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".shard-*.tmp"):  # temp files of a killed run
            stale.unlink(missing_ok=True)
        for stale in self.path.glob(".manifest.json.*.tmp"):
            stale.unlink(missing_ok=True)
        fresh = f"delete {self.path} (or choose another --out) to start fresh"
        if self.manifest_path.exists():
            try:
                stored = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
                raise ValueError(f"{self.manifest_path} is unreadable ({e}); {fresh}") from None
            if not isinstance(stored, dict) or stored.get("format") != FORMAT:
                raise ValueError(f"{self.manifest_path} is not a {FORMAT} manifest; {fresh}")
            if stored.get("version") != FORMAT_VERSION:
                raise ValueError(
                    f"{self.path} was written by shard format version {stored.get('version')!r}, this is "
                    f"version {FORMAT_VERSION}; {fresh}"
                )
            diffs = config_differences(stored.get("config", {}), config)
            if diffs:
                raise ValueError(
                    f"{self.path} holds shards of a different sampling config, which must not be mixed:\n  "
                    + "\n  ".join(diffs)
                    + f"\nRerun with the original settings to resume, or {fresh}."
                )
            return True
        others = sorted(p.name for p in self.path.iterdir())
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise ValueError(f"{self.path} exists but has no manifest.json (it holds {shown}); {fresh}")
        self._write_manifest({"format": FORMAT, "version": FORMAT_VERSION, "config": _jsonable(config), "info": info})
        return False

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        _atomic_write(self.manifest_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def record_output(self, out: Path, sha256: str, count: int) -> None:
        """Note the merged output (path, image count, sha256 of its array bytes) in the manifest."""
        manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        manifest["output"] = {"path": str(out), "count": count, "sha256": sha256}
        self._write_manifest(manifest)

    def check(self, k: int, start: int, stop: int, hwc: tuple[int, int, int]) -> str | None:
        """``None`` if shard ``k`` is complete and intact, else why not (``"missing"`` if never written)."""
        return self._load(k, start, stop, hwc)[1]

    def load(self, k: int, start: int, stop: int, hwc: tuple[int, int, int]) -> np.ndarray:
        """Shard ``k``'s uint8 ``[stop - start, H, W, C]`` array, checksum verified (``RuntimeError`` if not)."""
        arr, why = self._load(k, start, stop, hwc)
        if why is not None:
            raise RuntimeError(
                f"shard {k} ({self.array_path(k)}) is {why} after sampling. On several nodes, --out must be "
                "on a filesystem every node shares. Rerun the same command to regenerate it."
            )
        return arr

    def _load(self, k: int, start: int, stop: int, hwc: tuple[int, int, int]) -> tuple[Any, str | None]:
        rec_path, arr_path = self.record_path(k), self.array_path(k)
        if not rec_path.exists() and not arr_path.exists():
            return None, "missing"
        shape = [stop - start, *hwc]
        try:
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, "incomplete (no record: interrupted while writing)"
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            return None, f"corrupt (record unreadable: {e})"
        want = {"shard": k, "start": start, "stop": stop, "count": stop - start, "shape": shape}
        if not isinstance(rec, dict) or any(rec.get(key) != v for key, v in want.items()):
            return None, "corrupt (record does not match this shard)"
        try:
            arr = np.load(arr_path, allow_pickle=False)
        except FileNotFoundError:
            return None, "missing (array deleted)"
        except Exception as e:  # a damaged .npy fails in many ways (bad header, short data, ...)
            return None, f"corrupt (array unreadable: {type(e).__name__})"
        if arr.dtype != np.uint8 or list(arr.shape) != shape:
            return None, f"corrupt (array is {arr.dtype} {list(arr.shape)}, expected uint8 {shape})"
        if _sha256(arr) != rec.get("sha256"):
            return None, "corrupt (checksum mismatch)"
        return arr, None

    def discard(self, k: int) -> None:
        """Remove shard ``k``'s record, then its array (the record goes first: no record, no shard)."""
        self.record_path(k).unlink(missing_ok=True)
        self.array_path(k).unlink(missing_ok=True)

    def write(self, k: int, start: int, arr: np.ndarray) -> None:
        """Write shard ``k`` (uint8 ``[count, H, W, C]`` starting at global index ``start``) atomically."""
        arr = np.ascontiguousarray(arr)
        _atomic_write(self.array_path(k), lambda tmp: _save_npy(tmp, arr))
        rec = {"shard": k, "start": start, "stop": start + arr.shape[0], "count": int(arr.shape[0]),
               "shape": list(arr.shape), "dtype": "uint8", "sha256": _sha256(arr)}  # fmt: skip
        text = json.dumps(rec, sort_keys=True) + "\n"
        _atomic_write(self.record_path(k), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _bytes(arr: np.ndarray) -> memoryview:
    """The array's bytes in C order, as a flat buffer (``len`` is the byte count)."""
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(_bytes(arr)).hexdigest()


def _save_npy(tmp: str, arr: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temp name
        np.save(f, arr, allow_pickle=False)


def write_npz_stream(tmp: str, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> str:
    """Write uint8 ``chunks`` (concatenated along axis 0 they form ``shape``) as ``arr_0`` of an ``.npz``.

    The archive is what ``np.savez(f, arr)`` writes (stored, zip64, a version 1.0 ``.npy`` header), but
    built one chunk at a time so only one shard is in memory. Returns the sha256 of the array bytes.
    """
    header = np.lib.format.header_data_from_array_1_0(np.empty((0, *shape[1:]), dtype=np.uint8))
    header["shape"] = tuple(int(s) for s in shape)
    h, rows = hashlib.sha256(), 0
    with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for chunk in chunks:
                if chunk.dtype != np.uint8 or chunk.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"chunk {chunk.dtype} {chunk.shape} does not fit uint8 {tuple(shape)}")
                data = _bytes(chunk)
                f.write(data)
                h.update(data)
                rows += chunk.shape[0]
    if rows != shape[0]:
        raise ValueError(f"chunks hold {rows} images, the header says {shape[0]}")
    return h.hexdigest()


# ------------------------------------------------------------------------------------- sampling
@dataclass
class ShardedResult:
    """What :func:`sample_sharded` did. ``path`` and ``sha256`` (of the merged array) are set on rank 0 only."""

    num_samples: int
    num_shards: int
    shard_size: int
    reused: int
    generated: list[int] = field(default_factory=list)  # shards this rank drew
    regenerated: dict[int, str] = field(default_factory=dict)  # shard -> why it was redrawn (all ranks)
    path: Path | None = None
    sha256: str | None = None


def sample_sharded(
    model: Callable[..., Any],
    schedule: Any,
    out: str | os.PathLike,
    num_samples: int,
    *,
    shard_size: int | None = None,
    batch_size: int | None = None,
    num_inference_steps: int | None = None,
    sampler: str = "ddpm",
    eta: float = 0.0,
    timestep_spacing: str | None = "leading",
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cuda_graph: Any = "auto",
    backend: str = "auto",
    shape: tuple[int, int, int] | None = None,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> ShardedResult:
    """Sample ``num_samples`` images into ``out`` (``.npz`` of uint8 NHWC, or a ``.png`` grid) through shards.

    Call it on every rank of an initialised ``torch.distributed`` job (or in one process without one):
    ranks draw disjoint shards of global sample indices, written to ``<out>.shards/``; rank 0 merges them
    in sample order. Rerunning with the same arguments skips intact shards and redraws missing or corrupt
    ones. The images equal ``to_uint8_nhwc(sample(model, schedule, num_samples, seed=seed, ...))`` of one
    process; bit for bit when ``shard_size`` is a multiple of ``batch_size`` (batches then start at the
    same global indices as in one process with that ``batch_size``).

    Args:
        shard_size: images per shard (default env ``FASTDDPM_SHARD_SIZE``, else 4 batches).
        batch_size: images per model batch (default ``min(num_samples, 256)``).
        info: extra JSON-able provenance for the manifest (not compared on resume).
        log: where rank 0 reports resumption (e.g. ``print``); silent by default.
        Other arguments are those of :func:`fastddpm.sample` (seed mode).
    Returns:
        a :class:`ShardedResult`; every rank returns after its shards are written, rank 0 after the merge.
    """
    from .progress import progress_bar
    from .sampling import _resolve_device, infer_shape, iter_batches

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    out = Path(out)
    if out.suffix.lower() not in (".npz", ".png"):
        raise ValueError(f"out must end in .npz or .png, got {str(out)!r}")
    rank, ws = D.world()
    device = _resolve_device(model, device)
    chw = infer_shape(model, shape)
    hwc = (chw[1], chw[2], chw[0])
    batch = batch_size or min(num_samples, 256)
    shard_size = resolve_shard_size(shard_size, batch)
    ranges = shard_ranges(num_samples, shard_size)
    folder = ShardFolder(shard_folder(out))
    say = log if (log is not None and rank == 0) else (lambda _msg: None)

    # 1. Rank 0 checks or writes the manifest; a refusal is raised on every rank (none waits forever).
    error = None
    if rank == 0:
        meta = {"world_size": ws, "device": device.type, "backend": backend, "batch_size": batch,
                "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})}  # fmt: skip
        try:
            config = sampling_config(
                model, schedule, num_samples=num_samples, shard_size=shard_size, image_shape=chw, seed=seed,
                num_inference_steps=num_inference_steps, sampler=sampler, eta=eta,
                timestep_spacing=timestep_spacing, dtype=dtype,
            )  # fmt: skip
            folder.prepare(config, _jsonable(meta))
        except (ValueError, TypeError, OSError) as e:
            error = str(e)
    error = D.broadcast_object(error)
    if error is not None:
        raise ValueError(error if rank == 0 else f"rank 0 refused {folder.path} (see its message)")
    if rank == 0 and shard_size % batch and shard_size < num_samples:
        warnings.warn(
            f"fastddpm: shard size {shard_size} is not a multiple of batch size {batch}: the images match a "
            "single-process run only to float rounding (model outputs depend slightly on batch composition); "
            "use a multiple for bit-identical images",
            stacklevel=2,
        )

    # 2. Every rank verifies a round-robin share of the shards; all ranks learn which need drawing.
    bad = {k: why for k in range(rank, len(ranges), ws) if (why := folder.check(k, *ranges[k], hwc)) is not None}
    regenerate: dict[int, str] = {}
    for part in D.all_gather_object(bad):
        regenerate.update(part)
    reused = len(ranges) - len(regenerate)
    damaged = {k: why for k, why in regenerate.items() if not why.startswith("missing")}
    if not regenerate:
        say(f"all {len(ranges)} shards in {folder.path} are intact; nothing to draw")
    elif reused or damaged:
        say(f"resuming from {folder.path}: {reused} of {len(ranges)} shards intact; drawing {len(regenerate)} "
            f"({len(regenerate) - len(damaged)} missing, {len(damaged)} damaged)")  # fmt: skip
        for k, why in sorted(regenerate.items()):
            if why != "missing":
                say(f"  shard {k} [{ranges[k][0]}, {ranges[k][1]}): {why}; redrawing it")

    # 3. Draw this rank's share, one atomic shard at a time.
    mine = assign_shards(list(regenerate), rank, ws)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    steps = 1 if sampler == "x0" else len(schedule.timesteps(num_inference_steps, timestep_spacing))
    my_samples = sum(ranges[k][1] - ranges[k][0] for k in mine)
    try:
        with torch.inference_mode(), progress_bar(progress and bool(mine), my_samples, steps, batch) as bar:
            for k in mine:
                start, stop = ranges[k]
                folder.discard(k)
                batches = iter_batches(
                    model, schedule, start, stop, num_inference_steps=num_inference_steps, sampler=sampler, eta=eta,
                    timestep_spacing=timestep_spacing, batch_size=batch, seed=seed, device=device, dtype=dtype,
                    cuda_graph=cuda_graph, shape=chw, backend=backend, progress=bar,
                )  # fmt: skip
                folder.write(k, start, np.concatenate([to_uint8_nhwc(images) for _, images in batches]))
    finally:
        if was_training:
            model.train()
    result = ShardedResult(num_samples, len(ranges), shard_size, reused, mine, regenerate)

    # 4. Rank 0 merges once every rank is done.
    D.barrier()
    if rank == 0:
        result.path, result.sha256 = out, merge_shards(folder, ranges, hwc, out)
        folder.record_output(out.resolve(), result.sha256, num_samples)
    return result


def merge_shards(folder: ShardFolder, ranges: list[tuple[int, int]], hwc: tuple[int, int, int], out: Path) -> str:
    """Concatenate the verified shards in sample order into ``out`` atomically; returns the sha256 of the images."""
    n = ranges[-1][1]
    chunks = (folder.load(k, start, stop, hwc) for k, (start, stop) in enumerate(ranges))
    if out.suffix.lower() == ".npz":
        digest: list[str] = []
        _atomic_write(out, lambda tmp: digest.append(write_npz_stream(tmp, (n, *hwc), chunks)))
        return digest[0]
    from PIL import Image

    arr = np.concatenate(list(chunks))
    grid = make_grid(arr)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    _atomic_write(out, lambda tmp: img.save(tmp, format="PNG"))
    return _sha256(arr)


# ------------------------------------------------------------------------------------------ CLI
def run_sharded_sample(args: argparse.Namespace, out: Path, device: torch.device) -> int:
    """``fastddpm sample`` under torchrun: join the process group, sample through shards, merge on rank 0.

    Creates the process group from the torchrun environment when none exists (NCCL on ``cuda:LOCAL_RANK``,
    gloo on CPU) and destroys it at the end. Reads ``args.shard_size`` (if the parser has it), else env
    ``FASTDDPM_SHARD_SIZE``.
    """
    from .cli import DTYPES, prepare_unet
    from .registry import load_model
    from .sampling import infer_shape

    device, created = D.init_from_env(device)
    try:
        rank, ws = D.world()
        model, schedule, desc = load_model(args.model, device)
        model = prepare_unet(model, getattr(args, "compile", None))  # as `fastddpm sample` does: the same images
        t0 = time.perf_counter()
        res = sample_sharded(
            model, schedule, out, args.num_samples, shard_size=getattr(args, "shard_size", None),
            batch_size=args.batch_size, num_inference_steps=args.steps, sampler=args.sampler, eta=args.eta,
            timestep_spacing=args.spacing, seed=args.seed, device=device, dtype=getattr(torch, DTYPES[args.dtype]),
            cuda_graph=not args.no_cuda_graph and "auto", backend=args.backend, progress=not args.quiet,
            info={"model": args.model}, log=print,
        )  # fmt: skip
        if rank == 0:
            dt = time.perf_counter() - t0
            steps = 1 if args.sampler == "x0" else (args.steps or schedule.num_train_timesteps)
            c, h, w = infer_shape(model, None)
            print(f"wrote {res.num_samples} images ({c}x{h}x{w}) to {out.resolve()} in {dt:.1f} s "
                  f"[{desc}; {args.sampler}, {steps} steps, seed {args.seed}, {ws} x {device.type}; "
                  f"{res.num_shards} shards of {res.shard_size} in {shard_folder(out)}, {res.reused} reused]")  # fmt: skip
        return 0
    finally:
        if created:
            D.destroy()
