"""Sharded, resumable sampling into one ``.npz`` (what ``fastddpm sample`` runs under torchrun).

The N global sample indices are cut into fixed-size shards: shard ``k`` holds ``[k*S, min(N, (k+1)*S))``.
Noise is keyed by global sample index, so a shard's images do not depend on which rank draws it or how
many ranks there are. Shards live in ``<out>.shards/`` next to the output::

    manifest.json        the run the shards belong to: the whole SamplingConfig, image count, shard size,
                         model and schedule (and, once merged, the output's sha256)
    shard-000000.npy     uint8 [count, H, W, C]: global samples [0, S)
    shard-000000.json    {"shard", "start", "stop", "count", "shape", "sha256", "config_sha256"}
                         (sha256 of the array bytes; config_sha256 of the manifest's config)
    ...

Temp files are named ``.<file>.<host>.<pid>.tmp``: a run removes only temp files of its own host whose
process is gone, never those of a live run writing to the same folder.

A run (1) has rank 0 check ``manifest.json`` against this run's config (a mismatch is an error naming the
differing fields: shards of different configs are never mixed; only the backend and CUDA-graph settings may
change, as they do not change the images) or write it, (2) has every rank verify a share of the shards (record,
count, shape, checksum), (3) deals the missing or corrupt shards round-robin to the ranks, which sample
them and write each one atomically (temp file + rename; the array first, its record second), and (4) has
rank 0 merge the shards in sample order into ``out``, verifying every checksum again on the way. A killed
rank loses at most the shard it was drawing; rerunning the same command (with any number of ranks)
regenerates exactly the shards that are missing or fail their checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
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
from .config import SamplingConfig, takes_config
from .images import _atomic_write, make_grid, to_uint8_nhwc

FORMAT = "fastddpm-shards"
FORMAT_VERSION = 2  # 2: the whole SamplingConfig under "sampling"; config_sha256 in every record
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


def run_config(
    model: Any, schedule: Any, config: SamplingConfig, *, num_samples: int, shard_size: int
) -> dict[str, Any]:
    """The run ``manifest.json`` records: ``config`` whole (``"sampling"``), the image count, the shard size,
    the weights' fingerprint and the schedule.

    A resume compares all of it but :data:`EXECUTION_FIELDS` (see :func:`compared`).
    """
    return _jsonable(
        {
            "sampling": config.to_dict(),
            "num_samples": num_samples,
            "shard_size": shard_size,
            "model_sha256": model_fingerprint(model),
            "schedule": schedule.to_dict(),
        }
    )


# How a run executes, not what it draws: the product guarantees the same images whatever the fused backend
# and with or without CUDA graphs (tests hold these bit-exact), so a resume may change them.
EXECUTION_FIELDS = ("backend", "cuda_graph", "steps_per_graph")


def compared(config: dict[str, Any]) -> dict[str, Any]:
    """A run config without its :data:`EXECUTION_FIELDS`: what must match for shards to be mixed."""
    config = _jsonable(config)
    sampling = config.get("sampling")
    if isinstance(sampling, dict):
        config["sampling"] = {k: v for k, v in sampling.items() if k not in EXECUTION_FIELDS}
    return config


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a run config's compared part, canonical JSON (stored in every shard record)."""
    return hashlib.sha256(json.dumps(compared(config), sort_keys=True).encode()).hexdigest()


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
    """A ``<out>.shards`` folder: the manifest, shard arrays and their records.

    ``config_sha256`` (set by :meth:`prepare`) is written into every record and checked when a shard is read.
    """

    path: Path
    config_sha256: str | None = None

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def array_path(self, k: int) -> Path:
        return self.path / f"shard-{k:06d}.npy"

    def record_path(self, k: int) -> Path:
        return self.path / f"shard-{k:06d}.json"

    def prepare(self, config: dict[str, Any], info: dict[str, Any], log: Callable[[str], None] | None = None) -> bool:
        """Create the folder and manifest, or check an existing manifest against ``config``.

        Run by one process (rank 0) before any shard is written. Returns ``True`` when resuming an
        existing folder. Raises ``ValueError`` (naming the bad file and what to do) when the folder belongs
        to another config, its manifest is unreadable, or it holds files that are not shards of this run.
        A folder whose manifest is gone but whose shard records all name this config gets a new manifest.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_sha256 = config_sha256(config)
        remove_dead_temps(self.path)
        fresh = f"delete {self.path} (or choose another --out) to start fresh"
        if self.manifest_path.exists():
            stored = self._read_manifest()
            if stored.get("version") != FORMAT_VERSION:
                raise ValueError(
                    f"{self.path} was written by shard format version {stored.get('version')!r}, this is "
                    f"version {FORMAT_VERSION}; {fresh}"
                )
            stored_config = stored.get("config")
            diffs = config_differences(
                compared(stored_config if isinstance(stored_config, dict) else {}), compared(config)
            )
            if diffs:
                raise ValueError(
                    f"{self.path} holds shards of a different sampling config, which must not be mixed:\n  "
                    + "\n  ".join(diffs)
                    + f"\nRerun with the original settings to resume, or {fresh}."
                )
            return True
        shards, others = [], []
        for p in sorted(self.path.iterdir()):
            (shards if p.name.startswith("shard-") and p.suffix in (".npy", ".json") else others).append(p.name)
        others = [n for n in others if not (n.startswith(".") and n.endswith(".tmp"))]  # a live run's temps
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise ValueError(f"{self.path} has no manifest.json and holds files that are not shards ({shown}); {fresh}")
        foreign = [
            n for n in shards if n.endswith(".json") and self._record_config(self.path / n) != self.config_sha256
        ]
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ValueError(
                f"{self.path} has no manifest.json, and the shard records {shown} do not name this run's config "
                f"(config_sha256 {self.config_sha256[:12]}...): they were drawn with other settings. Rerun with "
                f"those settings, delete those shard files, or choose another --out"
            )
        self._write_manifest({"format": FORMAT, "version": FORMAT_VERSION, "config": _jsonable(config), "info": info})
        if shards and log is not None:
            log(f"{self.manifest_path} was missing; rebuilt it: the shard records there name this run's config")
        return bool(shards)

    def _read_manifest(self) -> dict[str, Any]:
        """The manifest as a dict; a damaged one raises with the file named and a recovery that keeps the shards."""
        recover = (
            f"The shards next to it are untouched (each carries its own checksum and config_sha256). To recover, "
            f"move the manifest away (mv {self.manifest_path} {self.manifest_path}.bad) and rerun the original "
            "command: a new manifest is written and every intact shard drawn with that config is reused"
        )
        try:
            stored = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise ValueError(f"{self.manifest_path} is unreadable ({e}). {recover}") from None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise ValueError(f"{self.manifest_path} is not a {FORMAT} manifest. {recover}")
        return stored

    @staticmethod
    def _record_config(path: Path) -> str | None:
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None
        return rec.get("config_sha256") if isinstance(rec, dict) else None

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        atomic_write_owned(self.manifest_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def record_output(self, out: Path, sha256: str, count: int) -> None:
        """Note the merged output (path, image count, sha256 of its array bytes) in the manifest."""
        manifest = self._read_manifest()
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
        if self.config_sha256 is not None and rec.get("config_sha256") != self.config_sha256:
            return None, "drawn with another config (config_sha256 differs)"
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
        atomic_write_owned(self.array_path(k), lambda tmp: _save_npy(tmp, arr))
        rec = {"shard": k, "start": start, "stop": start + arr.shape[0], "count": int(arr.shape[0]),
               "shape": list(arr.shape), "dtype": "uint8", "sha256": _sha256(arr),
               "config_sha256": self.config_sha256}  # fmt: skip
        text = json.dumps(rec, sort_keys=True) + "\n"
        atomic_write_owned(self.record_path(k), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------- owned temp files
def _host() -> str:
    """This machine's name as it appears in temp file names (no dots: they separate the name's parts)."""
    return "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname()) or "host"


def temp_name(path: Path, pid: int | None = None) -> Path:
    """The temp file a process writes ``path`` through: ``.<name>.<host>.<pid>.tmp`` in the same folder."""
    return path.with_name(f".{path.name}.{_host()}.{os.getpid() if pid is None else pid}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_dead_temps(folder: Path) -> list[Path]:
    """Remove ``.<name>.<host>.<pid>.tmp`` files of this host whose process is gone; returns them.

    Temp files of live processes (another run writing to the same folder) and of other hosts (a shared
    filesystem; their liveness cannot be checked from here) are left alone.
    """
    removed = []
    host = _host()
    for p in folder.glob(".*.tmp"):
        parts = p.name[: -len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid != os.getpid() and not _pid_alive(pid):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_owned(path: Path, write: Callable[[str], Any]) -> None:
    """Write ``path`` through :func:`temp_name` (this process's own temp file), then rename over ``path``."""
    tmp = temp_name(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


@takes_config
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
    use_clipped_model_output: bool = False,
    timestep_spacing: str | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = "auto",
    cuda_graph: Any = "auto",
    steps_per_graph: int = 1,
    backend: str = "auto",
    shape: tuple[int, int, int] | None = None,
    solver_order: int | None = None,
    use_karras_sigmas: bool = False,
    lower_order_final: bool = True,
    final_sigmas_type: str = "zero",
    progress: bool = True,
    info: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    config: SamplingConfig | None = None,
) -> ShardedResult:
    """Sample ``num_samples`` images into ``out`` (``.npz`` of uint8 NHWC, or a ``.png`` grid) through shards.

    Call it on every rank of an initialised ``torch.distributed`` job (or in one process without one):
    ranks draw disjoint shards of global sample indices, written to ``<out>.shards/``; rank 0 merges them
    in sample order. Rerunning with the same arguments skips intact shards and redraws missing or corrupt
    ones. The images equal ``to_uint8_nhwc(sample(model, schedule, num_samples, config=config))`` of one
    process; bit for bit when ``shard_size`` is a multiple of the batch size (batches then start at the
    same global indices as in one process with that batch size).

    Args:
        shard_size: images per shard (default env ``FASTDDPM_SHARD_SIZE``, else 4 batches).
        info: extra JSON-able provenance for the manifest (not compared on resume).
        log: where rank 0 reports resumption (e.g. ``print``); silent by default.
        config: the run options whole (:class:`~fastddpm.SamplingConfig`), or the same keywords as
            :func:`fastddpm.sample` (seed mode; the batch size defaults to ``min(num_samples, 256)``).
            The manifest records it whole: resuming with any field changed is refused.
    Returns:
        a :class:`ShardedResult`; every rank returns after its shards are written, rank 0 after the merge.
    """
    from .progress import progress_bar
    from .sampling import _resolve_device, infer_shape, plan_steps, resolve_auto_dtype

    assert config is not None  # set by @takes_config
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    out = Path(out)
    if out.suffix.lower() not in (".npz", ".png"):
        raise ValueError(f"out must end in .npz or .png, got {str(out)!r}")
    rank, ws = D.world()
    device = _resolve_device(model, device)
    chw = infer_shape(model, config.shape)
    hwc = (chw[1], chw[2], chw[0])
    config = config.replace(shape=chw, batch_size=config.batch_size or min(num_samples, 256))
    batch = config.batch_size
    config, _ = resolve_auto_dtype(model, config, device, batch)  # the manifest records the dtype used
    shard_size = resolve_shard_size(shard_size, batch)
    ranges = shard_ranges(num_samples, shard_size)
    folder = ShardFolder(shard_folder(out))
    say = log if (log is not None and rank == 0) else (lambda _msg: None)
    run = run_config(model, schedule, config, num_samples=num_samples, shard_size=shard_size)

    # 1. Rank 0 checks or writes the manifest; a refusal is raised on every rank (none waits forever).
    error = None
    if rank == 0:
        meta = {"world_size": ws, "device": device.type, "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})}  # fmt: skip
        try:
            folder.prepare(run, _jsonable(meta), say)
        except (ValueError, TypeError, OSError) as e:
            error = str(e)
    else:
        folder.config_sha256 = config_sha256(run)
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
    from . import sampling

    mine = assign_shards(list(regenerate), rank, ws)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    my_samples = sum(ranges[k][1] - ranges[k][0] for k in mine)
    try:
        with torch.inference_mode(), progress_bar(
            progress and bool(mine), my_samples, plan_steps(schedule, config), batch
        ) as bar:  # fmt: skip
            for k in mine:
                start, stop = ranges[k]
                folder.discard(k)
                batches = sampling.iter_batches(
                    model, schedule, start, stop, device=device, progress=bar, config=config
                )
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
