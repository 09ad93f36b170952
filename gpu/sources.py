"""Where a model repository's files come from: a local directory (the default) or an
S3-compatible bucket (``gpu/s3_source.py``), behind one small interface.

``ModelRepository`` (``gpu/repository.py``) reads configs and version listings through
a source, and the worker asks it for a version's artifact as a verified local file
(``artifact``) just before loading it. A local source verifies the file in place; the
S3 source fetches it into the bounded cache (``gpu/artifact_cache.py``) first.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from modelpool.gpu.checksums import Declared, Hasher, verify

S3_SCHEME = "s3://"
DEFAULT_CACHE_BYTES = 20 << 30


@dataclass(frozen=True)
class StoredFile:
    """One file of a model as its source lists it.

    ``stamp`` changes whenever the content does (size and mtime locally, the ETag on
    S3); ``path`` is where the file is, or where it will be once fetched."""

    size: int
    stamp: str
    path: Path


@dataclass(frozen=True)
class ModelFiles:
    """A model directory as listed: ``files`` maps paths relative to it
    (``config.pbtxt``, ``1/model.pt``, ``1/model.pt.sha256``) to what is known of
    them; ``read_text`` reads a small one. ``where`` names the directory in messages."""

    name: str
    where: str
    files: Mapping[str, StoredFile]
    read_text: Callable[[str], str]
    #: Set when the directory could not be listed (a permission denied, say).
    error: str | None = None


@dataclass(frozen=True)
class Artifact:
    """One version's artifact, as ``ModelRepository.artifact`` hands it to a source."""

    model: str
    version: int
    relpath: str  # "1/model.pt"
    file: StoredFile
    declared: tuple[Declared, ...]

    @property
    def what(self) -> str:
        return f"model '{self.model}' version {self.version} ({self.relpath})"


@dataclass(frozen=True)
class RepositorySettings:
    """Flags of remote repositories. ``cache_dir`` None: ``$XDG_CACHE_HOME/modelpool/
    repository`` (else ``~/.cache/...``); ``s3_endpoint_url`` and ``s3_region`` None:
    boto3's own settings (AWS_ENDPOINT_URL, AWS_REGION, ~/.aws/config ...)."""

    cache_dir: str | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().resolve()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "modelpool" / "repository"

    def worker_args(self) -> list[str]:
        """The same settings as ``modelpool worker`` flags (serve starts its workers)."""
        args = ["--repository-cache", str(self.resolved_cache_dir())]
        args += ["--repository-cache-size", str(self.cache_bytes)]
        if self.s3_endpoint_url:
            args += ["--s3-endpoint-url", self.s3_endpoint_url]
        if self.s3_region:
            args += ["--s3-region", self.s3_region]
        return args


class RepositorySource(Protocol):
    #: What the operator named: a resolved directory or ``s3://bucket/prefix``.
    location: str
    #: A local directory that stands for the repository on this host (the directory
    #: itself; for S3 its folder in the cache): warm-restart state is keyed by it.
    root: Path

    def models(self) -> dict[str, ModelFiles]:
        """Every model directory, listed now. Raises RepositoryUnavailable."""
        ...

    def model(self, name: str) -> ModelFiles | None:
        """One model directory listed now; None when absent. Raises RepositoryUnavailable."""
        ...

    def artifact(self, artifact: Artifact) -> contextlib.AbstractContextManager[Path]:
        """The artifact as a local file whose sha256 matched ``artifact.declared``,
        kept in place until the block ends.

        Raises:
            ModelLoadError: the checksum does not match.
            RepositoryUnavailable: it had to be fetched and could not be.
        """
        ...


def is_s3(location: str) -> bool:
    return location.startswith(S3_SCHEME)


def open_source(location: str | Path, settings: RepositorySettings | None) -> RepositorySource:
    """The source for ``--model-repository``. Raises ValueError (a start-up error with
    the reason) for a directory that is not one, or a bucket that cannot be read."""
    settings = settings or RepositorySettings()
    if isinstance(location, str) and is_s3(location):
        from modelpool.gpu.s3_source import S3Source

        return S3Source(location, settings)
    return LocalSource(Path(location))


class LocalSource:
    """A repository directory on this host: files are read in place."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise ValueError(f"model repository '{self.root}' is not a directory")
        self.location = self.root.as_posix()
        self.hasher = Hasher()

    def models(self) -> dict[str, ModelFiles]:
        dirs = [d for d in sorted(self.root.iterdir()) if not d.name.startswith(".")]
        return {d.name: local_files(d) for d in dirs if _is_dir(d)}

    def model(self, name: str) -> ModelFiles | None:
        d = self.root / name
        return local_files(d) if _is_dir(d) else None

    @contextlib.contextmanager
    def artifact(self, artifact: Artifact) -> Iterator[Path]:
        verify(self.hasher, artifact.file.path, artifact.declared, artifact.what)
        yield artifact.file.path


def local_files(model_dir: Path) -> ModelFiles:
    """A model directory's config and version files (``error`` set when unreadable)."""
    files: dict[str, StoredFile] = {}

    def read_text(rel: str) -> str:
        return (model_dir / rel).read_text()

    try:
        listed = [model_dir / "config.pbtxt", *_version_files(model_dir)]
    except OSError as e:
        # Unreadable, or changed under us while being read: listed with the reason.
        return ModelFiles(model_dir.name, model_dir.as_posix(), {}, read_text,
                          error=f"{model_dir}: {e.strerror or e}")  # fmt: skip
    for p in listed:
        try:
            if not p.is_file():
                continue
            st = p.stat()
        except OSError:
            continue  # gone (or unreadable) between listing and stat: not on disk
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        files[p.relative_to(model_dir).as_posix()] = StoredFile(st.st_size, stamp, p)
    return ModelFiles(model_dir.name, model_dir.as_posix(), files, read_text)


def _version_files(model_dir: Path) -> list[Path]:
    found: list[Path] = []
    for v in model_dir.iterdir():
        if v.name.isascii() and v.name.isdigit() and _is_dir(v):
            with contextlib.suppress(OSError):
                found.extend(v.iterdir())
    return found


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False
