"""A real redis-server on an ephemeral port, started and stopped by tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """``url`` carries the password and database when set. ``stop``/``start`` keep the
    port, so clients see an outage and then the same address again (empty: no
    persistence, as after a crash)."""

    dir: Path
    port: int = field(default_factory=free_port)
    password: str | None = None
    db: int = 0
    tls: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            ca = self.dir / "ca.crt"
            return f"rediss://{auth}localhost:{self.port}/{self.db}?ssl_ca_certs={ca}&ssl_cert_reqs=required"
        return f"redis://{auth}127.0.0.1:{self.port}/{self.db}"

    def _tls_files(self) -> list[str]:
        crt, key = self.dir / "ca.crt", self.dir / "ca.key"
        if not crt.exists():
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                 "-keyout", str(key), "-out", str(crt)],
                check=True, capture_output=True,
            )  # fmt: skip
        return [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(crt),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(crt), "--tls-auth-clients", "no",
        ]  # fmt: skip

    def start(self) -> RedisServer:
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += self._tls_files() if self.tls else ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            args, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)


def need_redis() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/install-services.sh installs it)")
