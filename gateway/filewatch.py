"""Watching a config file for changes: the auth config and the routing file are both
reloaded when their file changes, checked every second by default."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

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
