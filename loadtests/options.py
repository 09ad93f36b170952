"""What one load run does: a frozen ``LoadOptions`` and the scenario files that fill it.

Precedence is defaults < scenario file < command-line flags. A scenario describes the
shape of the traffic only; where it goes (url, protocol, metrics url, output) is always
the caller's, so a shared scenario file can never point a run at another host.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTOCOLS = ("grpc", "http")
ARRIVALS = ("poisson", "bursty")
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

# Hard ceilings: a typo ("--duration 36000") should fail, not run for ten hours.
MAX_DURATION_S = 3600.0
MAX_RATE = 20_000.0
MAX_TENANTS = 64

#: Keys a scenario file may set (the workload's shape), and ``description``.
SCENARIO_KEYS = frozenset(
    {
        "models",
        "duration",
        "rate",
        "zipf",
        "tenants",
        "arrival",
        "seed",
        "max_outstanding",
        "timeout",
    }
)


@dataclass(frozen=True)
class LoadOptions:
    url: str
    protocol: str = "grpc"
    #: Models to send to; empty means every servable model in the repository index.
    models: tuple[str, ...] = ()
    duration: float = 30.0
    rate: float = 50.0
    zipf: float = 1.1
    tenants: int = 1
    arrival: str = "poisson"
    seed: int = 0
    #: HOST:PORT of /metrics; None derives it from ``url`` (Triton's 8000/8001/8002 layout).
    metrics_url: str | None = None
    #: Requests in flight at once; an arrival beyond it is dropped and counted as an error.
    max_outstanding: int = 1000
    #: Seconds one request may take before it counts as a timeout error.
    timeout: float = 30.0

    def __post_init__(self) -> None:
        _check_hostport(self.url, "url")
        if self.metrics_url is not None:
            _check_hostport(self.metrics_url, "metrics-url")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {self.protocol!r}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, not {self.arrival!r}")
        if not 0 < self.duration <= MAX_DURATION_S:
            raise ValueError(f"duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if not 0 < self.rate <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE:g}] requests per second")
        if self.zipf < 0:
            raise ValueError("zipf exponent must be >= 0 (0 is uniform popularity)")
        if not 1 <= self.tenants <= MAX_TENANTS:
            raise ValueError(f"tenants must be in [1, {MAX_TENANTS}]")
        if self.max_outstanding < 1:
            raise ValueError("max-outstanding must be at least 1")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a name is listed twice")

    @property
    def resolved_metrics_url(self) -> str:
        return self.metrics_url or default_metrics_url(self.url, self.protocol)

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["models"] = list(self.models) or "auto"
        doc["metrics_url"] = self.resolved_metrics_url
        return doc


def _check_hostport(value: str, what: str) -> None:
    host, sep, port = value.rpartition(":")
    if "://" in value or not sep or not host or not port.isdigit():
        raise ValueError(f"{what} must be HOST:PORT without a scheme, not {value!r}")


def default_metrics_url(url: str, protocol: str) -> str:
    """Triton's layout: HTTP on N, gRPC on N+1, metrics on N+2."""
    host, _, port = url.rpartition(":")
    offset = 2 if protocol == "http" else 1
    return f"{host}:{int(port) + offset}"


def parse_models(text: str) -> tuple[str, ...]:
    """``auto`` (or empty) for the whole repository, else a comma-separated list."""
    if text.strip() in ("", "auto"):
        return ()
    return tuple(m.strip() for m in text.split(",") if m.strip())


def find_scenario(name: str) -> Path:
    """A path, or the bare name of a file in loadtests/scenarios (``smoke``)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = SCENARIO_DIR / (name if name.endswith(".json") else f"{name}.json")
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.json")))
    raise ValueError(f"scenario {name!r}: no such file (bundled: {known})")


def load_scenario(name: str) -> dict[str, Any]:
    """The workload settings of a scenario file, keys normalised to option names."""
    path = find_scenario(name)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"scenario {path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"scenario {path}: must be a JSON object")
    settings = {k.replace("-", "_"): v for k, v in doc.items() if k != "description"}
    unknown = sorted(set(settings) - SCENARIO_KEYS)
    if unknown:
        raise ValueError(
            f"scenario {path}: unknown keys {unknown}; allowed: {sorted(SCENARIO_KEYS)}"
        )
    if isinstance(settings.get("models"), str):
        settings["models"] = parse_models(settings["models"])
    elif isinstance(settings.get("models"), list):
        settings["models"] = tuple(settings["models"])
    return settings


def merge(target: dict[str, Any], scenario: dict[str, Any], flags: dict[str, Any]) -> LoadOptions:
    """Defaults, then the scenario, then flags that were given (not None)."""
    values = {**scenario, **{k: v for k, v in flags.items() if v is not None}, **target}
    return LoadOptions(**values)
