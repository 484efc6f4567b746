"""A specialist on disk: one `.npz` file (no pickles) holding its arrays and a JSON header.

The header names the format and its version, the specialist's kind, the identity of the embedder
its vectors came from, its calibration and its training report, and a sha256 checksum over the
header and every array. A file that does not open, has another format or version, or whose bytes
do not match its checksum raises `WeightsCorruptedError`, never a half-read specialist.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.errors import WeightsCorruptedError

FORMAT = "shoal-specialist"
VERSION = 1


@dataclass(frozen=True)
class SpecialistFile:
    meta: dict[str, Any]
    arrays: dict[str, npt.NDArray[Any]]


def checksum(meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> str:
    digest = hashlib.sha256()
    header = {k: v for k, v in meta.items() if k != "checksum"}
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()


def save(path: Path, meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> str:
    """Write a specialist file atomically; returns its checksum."""
    meta = {"format": FORMAT, "version": VERSION, **meta}
    meta["checksum"] = checksum(meta, arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        np.savez(handle, __meta__=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return str(meta["checksum"])


def _open(path: Path) -> Any:
    if not path.is_file():
        raise WeightsCorruptedError(f"specialist file {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsCorruptedError(f"specialist file {path} cannot be read: {exc}") from exc


def _meta(path: Path, data: Any) -> dict[str, Any]:
    try:
        meta = json.loads(str(data["__meta__"]))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsCorruptedError(f"{path} has no readable specialist header: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightsCorruptedError(f"{path} is not a specialist file (no {FORMAT!r} header)")
    if meta.get("version") != VERSION:
        raise WeightsCorruptedError(
            f"{path} is a specialist file of format v{meta.get('version')}; this shoal reads "
            f"v{VERSION}: distil it again"
        )
    return meta


def read_meta(path: Path) -> dict[str, Any]:
    """The header alone (for a card or a listing): its arrays are neither read nor checked."""
    with _open(path) as data:
        return _meta(path, data)


def load(path: Path) -> SpecialistFile:
    """Every array and the header, checked against the checksum."""
    with _open(path) as data:
        meta = _meta(path, data)
        try:
            arrays = {k: data[k] for k in data.files if k != "__meta__"}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise WeightsCorruptedError(f"specialist file {path} cannot be read: {exc}") from exc
    if checksum(meta, arrays) != meta.get("checksum"):
        raise WeightsCorruptedError(
            f"specialist file {path} does not match its checksum (changed or damaged since it "
            "was written): distil it again"
        )
    return SpecialistFile(meta, arrays)
