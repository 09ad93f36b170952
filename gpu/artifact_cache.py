"""A bounded on-disk cache of fetched artifacts, least recently used out first.

Shared by every process of a host that points at the same directory (a gateway's
workers, several ``serve`` processes). Each entry ``<root>/<key>`` has a lock file
``<root>/.locks/<key>.lock``, taken with ``flock``:

- a fetch holds the entry's lock exclusively while it downloads to a temporary file
  in the same directory and renames it into place, so a reader never sees half a
  file; a second fetch of the same entry (another thread, another process) waits on
  the lock, finds the file there, and does not download it again;
- the lock stays held while the caller uses the file (``with cache.entry(...)``), and
  eviction only takes entries whose lock it gets without waiting, so a file being
  loaded is never deleted under its reader.

Entries are used in least-recently-used order by their mtime, touched on every use.
The size may be overshot by the downloads in progress: room is made when a download
has succeeded, so that a failed one (an outage) never evicts what still works.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from modelpool.placement.errors import Unavailable

log = logging.getLogger(__name__)

LOCKS = ".locks"
TMP_MARK = ".part-"
#: How long a fetch waits for another process's download of the same entry.
DEFAULT_WAIT_S = 3600.0


class ArtifactCache:
    """Args:
    root: the cache directory (created if missing).
    max_bytes: the size the cached files are kept under.
    wait_s: how long ``entry`` waits for another holder of the same entry.
    """

    def __init__(self, root: Path, max_bytes: int, wait_s: float = DEFAULT_WAIT_S) -> None:
        if max_bytes <= 0:
            raise ValueError("--repository-cache-size must be positive")
        self.root = root
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        root.mkdir(parents=True, exist_ok=True)
        (root / LOCKS).mkdir(exist_ok=True)

    def path(self, key: str) -> Path:
        """Where entry ``key`` (a relative path, '/'-separated) lives once fetched."""
        return self.root / key

    @contextlib.contextmanager
    def entry(self, key: str, size: int, fill: Callable[[Path], None]) -> Iterator[Path]:
        """The file of ``key``, fetched with ``fill(temporary path)`` if not cached, held
        (never evicted) until the block ends. ``size`` is its expected size, for the log.

        Raises:
            Unavailable: another process held the entry for longer than ``wait_s``.
            Whatever ``fill`` raises; nothing is left in the cache then.
        """
        path = self.path(key)
        with self._locked(key, wait=True):
            if path.is_file():
                os.utime(path)  # most recently used
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{TMP_MARK}{os.getpid()}-{path.name}")
                log.debug("artifact cache: fetching %s (%d bytes)", key, size)
                try:
                    fill(tmp)
                    # Room is made once the download succeeded (the partial file counts
                    # already): a failed fetch, in an outage say, evicts nothing.
                    self._make_room(0, keep=path)
                    os.replace(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
            yield path

    def cached(self, key: str) -> bool:
        return self.path(key).is_file()

    def usage(self) -> int:
        """Bytes of the cached files (partial downloads included)."""
        return sum(size for _, size, _ in self._files())

    # -- internals -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, key: str, wait: bool) -> Iterator[bool]:
        """Hold ``key``'s lock (yields True), or with ``wait=False`` yield False at once
        when someone else holds it. flock locks belong to the open file, so two threads
        of one process exclude each other as two processes do."""
        lock_path = self.root / LOCKS / f"{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        yield False
                        return
                    if time.monotonic() > deadline:
                        raise Unavailable(
                            f"artifact cache {self.root}: {key} was held by another "
                            f"process for over {self.wait_s:.0f}s"
                        ) from None
                    time.sleep(0.05)
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _files(self) -> list[tuple[Path, int, float]]:
        """(path, size, mtime) of every cached file, partial downloads included."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d != LOCKS]
            for name in filenames:
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except OSError:
                    continue  # evicted or renamed meanwhile
                found.append((p, st.st_size, st.st_mtime))
        return found

    def _make_room(self, size: int, keep: Path) -> None:
        """Evict least recently used entries until ``size`` more bytes fit. Entries in
        use (locked) and partial downloads stay; if they alone exceed the size, the
        cache runs over it rather than fail the load."""
        files = self._files()
        total = sum(s for _, s, _ in files)
        for p, s, _ in sorted(files, key=lambda f: f[2]):
            if total + size <= self.max_bytes:
                return
            if p == keep or p.name.startswith(TMP_MARK):
                continue
            key = p.relative_to(self.root).as_posix()
            with self._locked(key, wait=False) as got:
                if not got:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    total -= s
                    log.info("artifact cache: evicted %s (%d bytes)", key, s)
        if total + size > self.max_bytes:
            log.warning(
                "artifact cache %s: %d bytes in use plus %d to fetch exceed its size %d",
                self.root,
                total,
                size,
                self.max_bytes,
            )
