"""The audit log (``--audit-log FILE``): one JSON object per line, appended, of every
admin action (repository load and unload, the status view) and every refused
credential (401) or admin call (403).

A line::

    {"ts": "2026-01-01T12:00:00.123+00:00", "tenant": "ops", "action": "load",
     "model": "acme-resnet", "outcome": "ok", "status": 200,
     "source": "ipv4:10.0.0.7:51234"}

``tenant`` is null for a refused key and on an open server; ``model`` is null where
the call names none; ``outcome`` is ``ok``, ``error`` (the action failed; ``status``
says how), ``cancelled`` (the client went away; status 499), ``unauthenticated`` (401)
or ``denied`` (403); ``source`` is the REST peer address or gRPC's ``context.peer()``. Keys never appear, not even in part.

Lines are written with one ``write`` on a file opened ``O_APPEND``, so several gateways
may share one file on a local disk. A write that fails (disk full) is logged and the
request goes on: the audit log never takes the service down.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditEvent:
    tenant: str | None
    action: str
    model: str | None
    outcome: str
    status: int
    source: str


class AuditLog:
    """Appends ``AuditEvent`` lines to ``path``; with ``path`` None it records nothing."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._fd: int | None = None
        if path is not None:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as e:
                raise ValueError(f"--audit-log {path}: cannot open it for appending: {e}") from None

    def record(self, event: AuditEvent) -> None:
        if self._fd is None:
            return
        line = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), **asdict(event)}
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self._fd, data)
        except OSError:
            log.exception("cannot write the audit log %s", self.path)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
