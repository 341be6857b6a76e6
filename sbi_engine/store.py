"""Chunked, checksummed, resumable dataset store on zarr.

A dataset is a zarr group directory::

    PATH/
      zarr.json                 zarr group metadata
      theta/ nu/ x/ valid/      zarr arrays, chunked along rows with the same chunk size
      manifest.json             what produced the data (see below), written atomically
      chunks/<i>.json           one completion record per finished chunk (atomic)

``manifest.json`` holds the *identity* of the dataset — simulator name, version and
spec, the prior (or proposal) spec, the θ source (prior draws, or the sha256 of an
explicit θ array), the nuisance mode, seed, number of rows, chunk size, dtype and the
engine version — plus, once complete, per-chunk checksums and the counts of invalid
rows. A chunk is *done* when its record exists and its sha256 (over the raw
little-endian bytes of ``theta``, ``nu``, ``x``, ``valid`` of that row range) matches.
Chunk data are written through zarr's local store (write to a temporary file, then
rename), and the record only after, so an interrupted run (Ctrl-C, ``kill -9``,
power loss) leaves at most one chunk unrecorded, which a rerun recomputes; row ``i``
depends only on the seed and ``i``, so a resumed run writes exactly the bytes an
uninterrupted one would. Nothing in the store is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sbi_engine.errors import ConfigError, DatasetError, SbiEngineError

__all__ = [
    "Chunk",
    "Dataset",
    "DatasetStore",
    "atomic_write_bytes",
    "atomic_write_dir",
    "load_dataset",
    "read_toml",
]

FORMAT = "sbi-engine-dataset"
FORMAT_VERSION = 1
ARRAYS = ("theta", "nu", "x", "valid")
# Fields that must agree for a rerun to resume an existing store.
IDENTITY_FIELDS = (
    "simulator", "simulator_version", "simulator_spec", "prior", "theta_source", "nu_source",
    "seed", "num", "chunk_size", "dtype",
)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Permissions of files and directories the engine writes: what ``open``/``mkdir`` would
#: give under the process umask (``tempfile`` creates them private, 0600/0700).
FILE_MODE, DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


def read_toml(path: str | os.PathLike, field: str) -> dict[str, Any]:
    """Parse a TOML file into a dict.

    Raises:
        ConfigError: naming ``field``, when the file is missing, is not UTF-8 text or is
            not valid TOML.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{field}: {path} is not valid TOML ({err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{field}: {path} is not UTF-8 text ({err})") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: Files of the engine's model directories (either NPE backend, both classifier formats):
#: a directory holding nothing else may be replaced by a new model.
MODEL_FILES = frozenset({"posterior.json", "classifier.json", "params.msgpack", "weights.npz"})


def check_replaceable(path: str | os.PathLike, names: Iterable[str] = ()) -> None:
    """Refuse to let a write replace ``path`` unless it is missing, an empty directory,
    or a directory of nothing but files named in ``names`` or :data:`MODEL_FILES` (an
    earlier model): ``--out`` pointing at a dataset or a folder of one's own files must
    not delete it. Call it before long work whose result goes to ``path``.

    Raises:
        SbiEngineError: ``path`` is a file, or a directory holding anything else.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise SbiEngineError(f"{path} exists and is not a directory; choose another path "
                             "for the model directory, or remove it")
    allowed = MODEL_FILES | set(names)
    other = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                   if p.name not in allowed or not p.is_file() or p.is_symlink())
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise SbiEngineError(f"{path} exists and holds {shown}, which writing a model there "
                             "would delete; choose another path, or remove it first")


def atomic_write_dir(path: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Write a directory of ``files`` (name → bytes) atomically, replacing an old one.

    The files are written and fsynced in a temporary sibling directory, which is then
    renamed into place; an existing directory is moved aside first and deleted after,
    so a reader sees the old directory or the new one, never a mixture. Only a directory
    that :func:`check_replaceable` allows is replaced.

    Raises:
        SbiEngineError: ``path`` holds something other than an earlier such directory.
    """
    path = Path(path)
    check_replaceable(path, files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        os.chmod(tmp, DIR_MODE)
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def jsonable(obj: Any, *, nan_to_none: bool = False) -> Any:
    """``obj`` as plain JSON data: numpy / JAX arrays and scalars become lists and Python numbers,
    mappings get string keys, tuples become lists; with ``nan_to_none``, non-finite floats
    become ``None`` (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, nan_to_none=nan_to_none) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v, nan_to_none=nan_to_none) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    elif isinstance(obj, np.ndarray) or (hasattr(obj, "__array__") and hasattr(obj, "shape")):
        return jsonable(np.asarray(obj).tolist(), nan_to_none=nan_to_none)  # numpy, JAX arrays
    if nan_to_none and isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_sha256(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (:func:`jsonable`, sorted keys, no spaces): the
    identity of a config or a header, equal for equal content however it was built."""
    text = json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{what}: {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{what}: {path} is not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{what}: {path} does not hold a JSON object")
    return obj


def chunk_checksum(arrays: dict[str, np.ndarray | None]) -> str:
    """sha256 over the little-endian bytes of ``theta, nu, x, valid`` (absent ones skipped)."""
    h = hashlib.sha256()
    for name in ARRAYS:
        arr = arrays.get(name)
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of a dataset. ``theta (n, D)``, ``nu (n, K) | None``, ``x (n, X)``,
    ``valid (n,)`` bool."""

    index: int
    start: int
    stop: int
    theta: np.ndarray
    nu: np.ndarray | None
    x: np.ndarray
    valid: np.ndarray


class DatasetStore:
    """Low-level writer/reader of one dataset directory. Use :func:`load_dataset` to read."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    # -- creation / opening ---------------------------------------------------------

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike, identity: dict[str, Any],
                         dims: dict[str, int]) -> DatasetStore:
        """Create a new store with ``identity`` or reopen one with the same identity.

        Args:
            path: dataset directory.
            identity: values of :data:`IDENTITY_FIELDS` (plus any descriptive extras).
            dims: ``{"theta": D, "nu": K, "x": X}`` (``K = 0`` means no ``nu`` array).

        Raises:
            DatasetError: ``path`` holds a different dataset, or something that is not one.
        """
        import zarr

        path = Path(path)
        mpath = path / "manifest.json"
        if mpath.exists():
            manifest = _read_json(mpath, "dataset manifest")
            _check_format(manifest, path)
            diffs = [f for f in IDENTITY_FIELDS if manifest.get(f) != identity.get(f)]
            if diffs:
                f = diffs[0]
                raise DatasetError(
                    f"{path} already holds a different dataset ({', '.join(diffs)} differ; "
                    f"{f}: existing {_short(manifest.get(f))}, requested {_short(identity.get(f))})"
                    "; choose another --out or delete it")
            return cls(path, manifest)
        if path.exists() and any(path.iterdir()):
            raise DatasetError(f"{path} exists, is not empty and is not an sbi-engine dataset; "
                               "choose another --out")
        num, chunk = identity["num"], identity["chunk_size"]
        group = zarr.open_group(str(path), mode="w")
        dtype = identity["dtype"]
        for name in ("theta", "nu", "x"):
            width = dims[name]
            if name == "nu" and width == 0:
                continue
            group.create_array(name, shape=(num, width), chunks=(chunk, width), dtype=dtype,
                               fill_value=np.nan)
        group.create_array("valid", shape=(num,), chunks=(chunk,), dtype=bool, fill_value=False)
        from sbi_engine import __version__

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "engine_version": __version__,
            **identity,
            "num_chunks": -(-num // chunk),
            "complete": False,
        }
        _write_json(mpath, manifest)
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | os.PathLike) -> DatasetStore:
        """Open the dataset directory ``path`` (complete or not) and check its manifest.

        Raises:
            DatasetError: ``path`` is missing, not a directory, or not a dataset.
        """
        path = Path(path)
        if not path.exists():
            raise DatasetError(f"dataset {path} does not exist")
        if not path.is_dir():
            raise DatasetError(f"dataset {path} is a file; a dataset is a directory holding "
                               "manifest.json (the simulate command's --out)")
        manifest = _read_json(path / "manifest.json", "dataset manifest")
        _check_format(manifest, path)
        return cls(path, manifest)

    # -- geometry -----------------------------------------------------------------------

    @property
    def num(self) -> int:
        return int(self.manifest["num"])

    @property
    def chunk_size(self) -> int:
        return int(self.manifest["chunk_size"])

    @property
    def num_chunks(self) -> int:
        return int(self.manifest["num_chunks"])

    def bounds(self, index: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of chunk ``index``."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.num)

    def _record_path(self, index: int) -> Path:
        return self.path / "chunks" / f"{index}.json"

    def _group(self, mode: str = "r"):
        import zarr

        try:
            return zarr.open_group(str(self.path), mode=mode)
        except Exception as err:  # noqa: BLE001 - zarr raises several types for broken metadata
            raise DatasetError(f"dataset {self.path}: cannot open zarr group ({err})") from None

    # -- chunks ------------------------------------------------------------------------------

    def read_record(self, index: int) -> dict | None:
        """Chunk ``index``'s completion record; None if it is missing or unreadable
        (the chunk then counts as not done, and a resumed run simulates it again)."""
        p = self._record_path(index)
        if not p.exists():
            return None
        try:
            rec = _read_json(p, f"chunk {index} record")
        except DatasetError:
            return None
        if not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("invalid"), int):
            return None  # damaged: redone on resume
        return rec

    def count_records(self) -> int:
        """Completed chunks, counted from the record files (not by a loop over a count
        that a damaged manifest could make huge)."""
        return sum(1 for p in (self.path / "chunks").glob("*.json")
                   if p.stem.isdigit() and int(p.stem) < self.num_chunks)

    def write_chunk(self, index: int, arrays: dict[str, np.ndarray | None],
                    extra: dict[str, Any] | None = None) -> dict:
        """Write rows of chunk ``index``, then its completion record. Returns the record."""
        record = self.write_chunk_data(index, arrays, extra)
        self.commit_chunk(record, verify=False)
        return record

    def write_chunk_data(self, index: int, arrays: dict[str, np.ndarray | None],
                         extra: dict[str, Any] | None = None) -> dict:
        """Write rows of chunk ``index`` but no record; return the record to commit.

        Used by distributed runs: a worker writes the data, the client that owns the
        dataset commits the record (:meth:`commit_chunk`) once the chunk is checked.
        Writing the same chunk twice writes the same bytes.
        """
        start, stop = self.bounds(index)
        group = self._group("r+")
        for name in ARRAYS:
            arr = arrays.get(name)
            if arr is None:
                continue
            if arr.shape[0] != stop - start:
                raise DatasetError(f"chunk {index}: {name} has {arr.shape[0]} rows, "
                                   f"expected {stop - start}")
            group[name][start:stop] = arr
        record = {
            "index": index,
            "start": start,
            "stop": stop,
            "sha256": chunk_checksum(arrays),
            "invalid": int((~np.asarray(arrays["valid"])).sum()),
            **(extra or {}),
        }
        return record

    def commit_chunk(self, record: dict, *, verify: bool = True) -> None:
        """Write the completion record of a chunk written by :meth:`write_chunk_data`.

        Args:
            record: the dict :meth:`write_chunk_data` returned (``index``, ``sha256``, ...).
            verify: first read the chunk back and check its data match ``record["sha256"]``.

        Raises:
            DatasetError: with ``verify``, the data on disk do not match the record.
        """
        index = int(record["index"])
        if verify:
            start, stop = self.bounds(index)
            chunk = self.read_chunk(index, verify=False)
            found = chunk_checksum({"theta": chunk.theta, "nu": chunk.nu, "x": chunk.x,
                                    "valid": chunk.valid})
            if found != record["sha256"]:
                raise DatasetError(f"dataset {self.path}: chunk {index} (rows {start}-{stop}) "
                                   "on disk does not match the checksum its writer reported")
        _write_json(self._record_path(index), record)

    def read_chunk(self, index: int, *, verify: bool = True) -> Chunk:
        """Read chunk ``index``; with ``verify`` check its checksum against the record."""
        start, stop = self.bounds(index)
        group = self._group("r")
        arrays: dict[str, np.ndarray | None] = {}
        for name in ARRAYS:
            if name == "nu" and "nu" not in group:
                arrays[name] = None
                continue
            try:
                arrays[name] = np.asarray(group[name][start:stop])
            except Exception as err:  # noqa: BLE001 - codec errors on corrupted bytes
                raise DatasetError(
                    f"dataset {self.path}: chunk {index} (rows {start}-{stop}) of {name!r} "
                    f"is corrupted and cannot be decoded ({type(err).__name__})") from None
        if verify:
            expected = self._expected_checksum(index)
            if expected is None:
                raise DatasetError(f"dataset {self.path}: chunk {index} (rows {start}-{stop}) "
                                   "was never completed; rerun the simulate command to finish it")
            if chunk_checksum(arrays) != expected:
                raise DatasetError(f"dataset {self.path}: chunk {index} (rows {start}-{stop}) "
                                   "is corrupted (checksum mismatch)")
        return Chunk(index, start, stop, arrays["theta"], arrays["nu"], arrays["x"],
                     arrays["valid"].astype(bool))

    def _expected_checksum(self, index: int) -> str | None:
        sums = self.manifest.get("chunk_sha256")
        if sums is not None:
            if not isinstance(sums, list) or not all(isinstance(v, str) for v in sums):
                raise DatasetError(f"dataset {self.path}: manifest field 'chunk_sha256' must "
                                   f"be a list of checksums, got {_short(sums)}")
            return sums[index] if index < len(sums) else None
        rec = self.read_record(index)
        return rec["sha256"] if rec else None

    def is_done(self, index: int, *, verify: bool = True) -> bool:
        """Whether chunk ``index`` has a record (and, with ``verify``, matching data)."""
        rec = self.read_record(index)
        if rec is None:
            return False
        if not verify:
            return True
        try:
            self.read_chunk(index, verify=True)
        except DatasetError:
            return False
        return True

    def finalize(self, report: dict[str, Any] | None = None) -> dict:
        """Consolidate chunk records into the manifest and mark the dataset complete."""
        records = [self.read_record(i) for i in range(self.num_chunks)]
        missing = [i for i, r in enumerate(records) if r is None]
        if missing:
            raise DatasetError(f"dataset {self.path}: chunks {missing[:10]} are not complete")
        invalid = sum(r["invalid"] for r in records)
        errors: dict[str, int] = {}
        for r in records:
            for k, v in r.get("errors", {}).items():
                errors[k] = errors.get(k, 0) + v
        self.manifest.update(
            complete=True,
            chunk_sha256=[r["sha256"] for r in records],
            counts={"total": self.num, "valid": self.num - invalid, "invalid": invalid},
            errors=dict(sorted(errors.items())),
            **(report or {}),
        )
        _write_json(self.path / "manifest.json", self.manifest)
        return self.manifest


def _check_format(manifest: dict, path: Path) -> None:
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: manifest.json is not an sbi-engine dataset manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{path}: dataset format version {version!r} is not supported "
                           f"(this engine reads version {FORMAT_VERSION})")
    for field in ("num", "chunk_size", "num_chunks"):
        if not isinstance(manifest.get(field), int) or manifest[field] <= 0:
            raise DatasetError(f"{path}: manifest field {field!r} must be a positive integer, "
                               f"got {manifest.get(field)!r}")
    if manifest["num_chunks"] != -(-manifest["num"] // manifest["chunk_size"]):
        raise DatasetError(f"{path}: manifest num_chunks {manifest['num_chunks']} does not "
                           f"match num {manifest['num']} in chunks of {manifest['chunk_size']}")
    for field, kind, what in _MANIFEST_FIELDS:
        value = manifest.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DatasetError(f"{path}: manifest field {field!r} must be {what}, got "
                               f"{_short(value)}")
    counts = manifest.get("counts")
    if manifest.get("complete") and not (isinstance(counts, dict) and all(
            isinstance(counts.get(k), int) and counts[k] >= 0
            for k in ("total", "valid", "invalid"))):
        raise DatasetError(f"{path}: manifest field 'counts' must hold non-negative integers "
                           f"'total', 'valid' and 'invalid', got {_short(counts)}")


#: Manifest fields the readers use, with their JSON types (checked when a dataset opens).
_MANIFEST_FIELDS = (
    ("simulator", str, "a string"), ("simulator_version", str, "a string"),
    ("simulator_spec", dict, "an object"), ("prior", dict, "an object"),
    ("theta_source", dict, "an object"), ("nu_source", dict, "an object"),
    ("seed", int, "an integer"), ("dtype", str, "a string"),
)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


class Dataset:
    """A simulated dataset on disk. Arrays are read (and checksum-verified) on first access.

    Attributes:
        path: the dataset directory.
        manifest: the parsed ``manifest.json``.
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False):
        self._store = DatasetStore.open(path)
        self.path = self._store.path
        self.manifest = self._store.manifest
        if not self.manifest.get("complete") and not allow_incomplete:
            done = self._store.count_records()
            raise DatasetError(
                f"dataset {self.path} is incomplete ({done} of {self._store.num_chunks} chunks); "
                "rerun the same simulate command to finish it")
        self._cache: dict[str, np.ndarray | None] | None = None

    def __len__(self) -> int:
        return self._store.num

    @property
    def num_chunks(self) -> int:
        return self._store.num_chunks

    def iter_chunks(self, *, verify: bool = True) -> Iterator[Chunk]:
        """Yield chunks in order, each checksum-verified (for data larger than memory)."""
        for i in range(self._store.num_chunks):
            yield self._store.read_chunk(i, verify=verify)

    def read_chunk(self, index: int, *, verify: bool = True) -> Chunk:
        """Chunk ``index`` (``0 <= index < num_chunks``), checksum-verified by default."""
        if not 0 <= index < self._store.num_chunks:
            raise DatasetError(f"chunk index: expected 0 <= index < {self._store.num_chunks}, "
                               f"got {index}")
        return self._store.read_chunk(index, verify=verify)

    def _load(self) -> dict[str, np.ndarray | None]:
        if self._cache is None:
            chunks = list(self.iter_chunks())
            self._cache = {
                "theta": np.concatenate([c.theta for c in chunks]),
                "nu": None if chunks[0].nu is None else np.concatenate([c.nu for c in chunks]),
                "x": np.concatenate([c.x for c in chunks]),
                "valid": np.concatenate([c.valid for c in chunks]),
            }
        return self._cache

    @property
    def theta(self) -> np.ndarray:
        """``(N, D)`` parameters."""
        return self._load()["theta"]

    @property
    def nu(self) -> np.ndarray | None:
        """``(N, K)`` nuisance parameters, or ``None``."""
        return self._load()["nu"]

    @property
    def x(self) -> np.ndarray:
        """``(N, X)`` simulated data (NaN rows are failed simulations)."""
        return self._load()["x"]

    @property
    def valid(self) -> np.ndarray:
        """``(N,)`` bool: every entry of ``x`` finite."""
        return self._load()["valid"]

    def arrays(self, *, valid_only: bool = False) -> dict[str, np.ndarray | None]:
        """Arrays ``theta``, ``nu``, ``x``, ``valid`` as a dict, optionally valid rows only."""
        data = dict(self._load())
        if valid_only:
            m = data["valid"]
            data = {k: (None if v is None else v[m]) for k, v in data.items()}
        return data

    def __repr__(self) -> str:
        c = self.manifest.get("counts", {})
        return (f"Dataset({str(self.path)!r}, simulator={self.manifest.get('simulator')!r}, "
                f"num={len(self)}, invalid={c.get('invalid', '?')})")


def load_dataset(path: str | os.PathLike, *, lazy: bool = False,
                 allow_incomplete: bool = False) -> Dataset:
    """Open a dataset written by :func:`sbi_engine.simulate.simulate`.

    Args:
        path: dataset directory.
        lazy: if False (default), read and verify all arrays now, so a corrupted chunk
            is reported here; if True, read nothing yet (use ``iter_chunks()``).
        allow_incomplete: open a dataset whose run was interrupted (reading an
            unfinished chunk still raises).

    Raises:
        DatasetError: missing, not a dataset, incomplete, or a corrupted chunk (named).
    """
    ds = Dataset(path, allow_incomplete=allow_incomplete)
    if not lazy:
        ds._load()
    return ds
