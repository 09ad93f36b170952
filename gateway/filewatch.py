"""The operator's YAML files (the auth config, the routing file): reading one with
errors that name it, and watching it for changes (checked every second by default)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


def read_yaml(path: str | os.PathLike[str], what: str, error: type[Exception]) -> object:
    """The YAML document in ``path``; ``error`` naming ``what`` and the file for one
    that cannot be read or parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{what} {path}: cannot read it: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{what} {path}: not valid YAML: {e}") from None


#: (mtime ns, size, inode): an edit in place changes the first two, an atomic rename
#: (how editors and Kubernetes ConfigMap updates write) the inode.
Signature = tuple[int, int, int]


def signature(path: str) -> Signature | None:
    """What changes when the file does; None while it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


async def watch(
    path: str,
    seen: Callable[[], Signature | None],
    reload: Callable[[], object],
    what: str,
    interval_s: float = 1.0,
) -> None:
    """Call ``reload`` whenever ``path``'s signature differs from ``seen()`` (the one
    the last reload read), checking every ``interval_s`` seconds; runs until
    cancelled. A missing file is not a change: the last good config stays."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            now = await asyncio.to_thread(signature, path)
            if now is not None and now != seen():
                reload()
        except Exception:  # a bug here must not end the watching
            log.exception("checking the %s %s failed", what, path)
