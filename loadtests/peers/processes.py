"""Start a server process, wait for its ready line, stop it, and reap everything it
spawned.

Ray's daemons (GCS, raylet, agents) are children of the process that called
``ray.init`` and its actors are children of the raylet, each in a session of its own,
so killing one process group is not enough. ``stop`` snapshots the whole process tree
from /proc before asking the server to stop, then kills whatever of that tree (same
pid *and* start time, so a reused pid is left alone) is still there after a grace
period, plus any process whose command line names ``marker`` (Ray's session
directory), which catches daemons orphaned before the snapshot.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

#: Seconds a stopped server's children get to exit by themselves before SIGKILL.
REAP_GRACE_S = 5.0


@dataclass(frozen=True)
class ProcKey:
    pid: int
    #: Clock ticks after boot (field 22 of /proc/PID/stat): tells a reused pid apart.
    start_ticks: int


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start ticks) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> set[ProcKey]:
    children: dict[int, list[ProcKey]] = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(ProcKey(pid, st[1]))
    out: set[ProcKey] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child.pid)
    return out


def naming(marker: str) -> set[ProcKey]:
    """Live processes whose command line contains ``marker``."""
    out: set[ProcKey] = set()
    needle = marker.encode()
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        st = _stat(pid)
        if needle in cmdline and st is not None:
            out.add(ProcKey(pid, st[1]))
    return out


def alive(key: ProcKey) -> bool:
    st = _stat(key.pid)
    if st is None:
        return False
    try:
        state = Path(f"/proc/{key.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return st[1] == key.start_ticks and state != "Z"


def kill_all(keys: set[ProcKey]) -> list[int]:
    """SIGKILL those still alive; returns their pids."""
    killed = []
    for key in keys:
        if alive(key):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(key.pid, signal.SIGKILL)
                killed.append(key.pid)
    return sorted(killed)


class ServerProcess:
    """One server command. Its stdout is read on a thread: lines go to the log and
    the first match of ``ready`` to ``wait_ready``, so a silent server cannot hang us
    and a chatty one cannot fill the pipe."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("a")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump_thread = threading.Thread(
            target=self._pump, args=(self.proc.stdout,), daemon=True
        )
        self._pump_thread.start()

    def _pump(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self._log.write(line)
            self._log.flush()
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, ready: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(
                    f"server exited with {self.proc.wait()} before it was ready; see {self.log_path}"
                )
            if m := ready.search(line):
                return m
        raise RuntimeError(f"server not ready after {timeout_s:g} s; see {self.log_path}")

    def stop(self, timeout_s: float, marker: str | None = None) -> list[int]:
        """SIGINT (and EOF on stdin), then SIGKILL after ``timeout_s``; then reap the
        tree. Returns the pids that had to be killed after the server itself exited."""
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + REAP_GRACE_S
        if marker is not None:
            tree |= naming(marker)
        while any(alive(k) for k in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        if marker is not None:
            tree |= naming(marker)
        killed = kill_all(tree)
        # The pump writes to the log until stdout closes; let it finish first.
        self._pump_thread.join(REAP_GRACE_S)
        self._log.close()
        return killed
