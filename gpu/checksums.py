"""Declared sha256 digests of model artifacts, and their verification before a load.

A digest is declared by the model's config (``parameters { key: "modelpool.sha256"
value { string_value: "<hex>" } }``: every version's artifact) or by a sidecar file
next to the artifact (``1/model.pt.sha256``, as ``sha256sum model.pt`` writes it).
Local and S3 repositories verify through the same ``verify``; a mismatch is a
ModelLoadError naming the model, version and both digests (the gateway re-raises
worker errors by their class in placement/errors.py), so that version is reported UNAVAILABLE with
the reason and is never served.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from modelpool.placement.errors import ModelLoadError

CONFIG_PARAMETER = "modelpool.sha256"
SIDECAR_SUFFIX = ".sha256"
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Declared:
    """A digest and where it was declared (for the error message). ``digest`` is ''
    when the declaration is not a sha256 at all: verification then fails, naming it."""

    digest: str
    source: str


def parse_digest(text: str) -> str:
    """The hex digest of a config value or a sidecar's text (``<hex>  <file>`` as
    ``sha256sum`` writes it, or the bare digest); '' when it is not one."""
    words = text.split()
    token = words[0].lower() if words else ""
    return token if _HEX_RE.fullmatch(token) else ""


def config_digest(text: str) -> str:
    """The config parameter's digest. Raises ValueError (a config error) when invalid."""
    digest = parse_digest(text)
    if not digest or len(text.split()) != 1:
        raise ValueError(
            f"parameter {CONFIG_PARAMETER} must be a sha256 hex digest (64 hex digits), "
            f"not '{text.strip()[:80]}'"
        )
    return digest


class Hasher:
    """sha256 of files, remembered per (path, size, mtime, inode) so that verifying an
    unchanged multi-gigabyte artifact before every load costs a ``stat``."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int, int], str] = {}
        self._lock = threading.Lock()

    def digest(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            return known
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        self.remember(path, h.hexdigest())
        return h.hexdigest()

    def remember(self, path: Path, digest: str) -> None:
        """Record ``digest`` for ``path`` as it is now (a download hashed as it streamed)."""
        st = os.stat(path)
        with self._lock:
            self._known[(str(path), st.st_size, st.st_mtime_ns, st.st_ino)] = digest


def check(digest: str, declared: tuple[Declared, ...], what: str) -> None:
    """Raise ModelLoadError (400 / FAILED_PRECONDITION) unless ``digest`` matches every declaration.

    ``what`` names the model, version and artifact for the message."""
    for d in declared:
        if not d.digest:
            raise ModelLoadError(f"{what}: checksum declared by {d.source} is not a sha256 digest")
        if d.digest != digest:
            raise ModelLoadError(
                f"{what}: checksum mismatch: sha256 is {digest}, {d.source} declares {d.digest}"
            )


def verify(hasher: Hasher, path: Path, declared: tuple[Declared, ...], what: str) -> None:
    """Hash ``path`` (unless nothing is declared) and ``check`` it."""
    if declared:
        check(hasher.digest(path), declared, what)
