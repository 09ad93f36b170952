"""What one load run does: a frozen ``LoadOptions`` and the scenario files that fill it.

Precedence is defaults < scenario file < command-line flags. A scenario describes the
shape of the traffic only; where it goes (url, protocol, metrics url, output) is always
the caller's, so a shared scenario file can never point a run at another host.

Keyed tenants (``--tenant NAME:KEY:RATE``, or a scenario's ``tenants`` list of
``{name, key, rate, zipf?, models?}``) make the run one open-loop stream per tenant,
each at its own rate and carrying its own key; ``tenants`` as a number keeps the single
stream whose arrivals are spread over that many unkeyed tenants.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
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

#: Tenant names as the server's auth config allows them (they label report rows).
_TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: What a key may hold: a bearer token travels in a header, so no spaces or controls.
_KEY_RE = re.compile(r"^[\x21-\x7e]*$")
#: Fields of one entry of a scenario's ``tenants`` list.
TENANT_FIELDS = frozenset({"name", "key", "rate", "zipf", "models"})

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
class TenantSpec:
    """One keyed tenant: its own open-loop stream of ``rate`` requests per second, each
    with ``Authorization: Bearer KEY`` (gRPC metadata ``authorization``).

    ``key`` empty: no credentials (an open server). ``rate``, ``zipf`` None: the run's
    ``--rate`` and ``--zipf``. ``models`` empty: the run's ``--models``, or else every
    servable model the tenant's key lists in the repository index.
    """

    name: str
    key: str = ""
    rate: float | None = None
    zipf: float | None = None
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _TENANT_NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"tenant name {self.name!r}: 1-64 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        if not _KEY_RE.fullmatch(self.key):
            # Never echo the key: it is a credential.
            raise ValueError(f"tenant {self.name}: a key may not hold spaces or control characters")
        if self.rate is not None and not 0 < self.rate <= MAX_RATE:
            raise ValueError(
                f"tenant {self.name}: rate must be in (0, {MAX_RATE:g}] requests per second"
            )
        if self.zipf is not None and self.zipf < 0:
            raise ValueError(f"tenant {self.name}: zipf exponent must be >= 0")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"tenant {self.name}: models: a name is listed twice")

    @property
    def headers(self) -> dict[str, str] | None:
        """Lower-case, as gRPC metadata requires (HTTP does not mind)."""
        return {"authorization": f"Bearer {self.key}"} if self.key else None

    def public(self) -> dict[str, Any]:
        """For report.json: whether a key was sent, never the key."""
        return {
            "name": self.name,
            "keyed": bool(self.key),
            "rate": self.rate,
            "zipf": self.zipf,
            "models": list(self.models) or "auto",
        }


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
    #: Keyed tenants, one stream each; empty: one stream of ``rate`` (``tenants`` unkeyed).
    #: With them ``max_outstanding`` caps each tenant's stream, and ``rate``, ``zipf``
    #: and ``models`` are the defaults of tenants that do not set their own.
    tenant_specs: tuple[TenantSpec, ...] = ()

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
        if self.tenant_specs:
            self._check_tenant_specs()

    def _check_tenant_specs(self) -> None:
        names = [t.name for t in self.tenant_specs]
        if len(set(names)) != len(names):
            raise ValueError("tenant: a name is given twice")
        if len(names) > MAX_TENANTS:
            raise ValueError(f"at most {MAX_TENANTS} keyed tenants")
        if self.tenants != 1:
            raise ValueError(
                "--tenants N spreads one unkeyed stream over N tenants; with keyed tenants "
                "(--tenant or a scenario's tenants list) leave it out"
            )
        if self.total_rate > MAX_RATE:
            raise ValueError(f"the tenants' rates add up to over {MAX_RATE:g} requests per second")

    def rate_of(self, tenant: TenantSpec) -> float:
        return tenant.rate if tenant.rate is not None else self.rate

    @property
    def total_rate(self) -> float:
        """Requests per second offered, all streams together."""
        if not self.tenant_specs:
            return self.rate
        return sum(self.rate_of(t) for t in self.tenant_specs)

    @property
    def resolved_metrics_url(self) -> str:
        return self.metrics_url or default_metrics_url(self.url, self.protocol)

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["models"] = list(self.models) or "auto"
        doc["metrics_url"] = self.resolved_metrics_url
        doc["tenant_specs"] = [t.public() for t in self.tenant_specs]
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


def parse_tenant(text: str) -> TenantSpec:
    """``--tenant NAME:KEY:RATE``. KEY may be empty (an open server). RATE (requests
    per second) may be empty (``NAME:KEY:``), or left out for a key without colons, for
    the scenario's rate of that tenant or else ``--rate``; the last colon always ends
    the key, so a key may hold colons when the RATE's colon is there."""
    name, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"--tenant {name!r}: expected NAME:KEY:RATE (KEY may be empty)")
    key, rate = rest, None
    head, sep, tail = rest.rpartition(":")
    if sep:
        key = head
        if tail.strip():
            try:
                rate = float(tail)
            except ValueError:
                raise ValueError(
                    f"--tenant {name}: rate {tail!r} is not a number of requests per second"
                ) from None
    return TenantSpec(name=name.strip(), key=key, rate=rate)


def tenant_from_dict(entry: object, where: str) -> TenantSpec:
    """One entry of a scenario's ``tenants`` list."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected an object with name, key, rate, zipf?, models?")
    unknown = sorted(str(k) for k in entry if k not in TENANT_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(TENANT_FIELDS)}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ValueError(f"{where}: 'name' must be a string")
    key = entry.get("key") or ""
    if not isinstance(key, str):
        raise ValueError(f"{where} ({name}): 'key' must be a string")
    numbers = {}
    for field_name in ("rate", "zipf"):
        value = entry.get(field_name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{where} ({name}): '{field_name}' must be a number")
        numbers[field_name] = None if value is None else float(value)
    models = entry.get("models")
    if models is None:
        models = ()
    elif isinstance(models, str):
        models = parse_models(models)
    elif isinstance(models, list) and all(isinstance(m, str) for m in models):
        models = tuple(models)
    else:
        raise ValueError(f"{where} ({name}): 'models' must be a list of names or 'a,b,c'")
    try:
        return TenantSpec(name=name, key=key, models=models, **numbers)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def merge_tenants(
    scenario: tuple[TenantSpec, ...], flags: list[TenantSpec] | None
) -> tuple[TenantSpec, ...]:
    """The scenario's tenants with ``--tenant`` flags over them, matched by name: a flag's
    key and rate replace the scenario's where given (a flag with an empty key keeps the
    scenario's); a name the scenario lacks adds a tenant."""
    merged = {t.name: t for t in scenario}
    for flag in flags or ():
        old = merged.get(flag.name)
        if old is None:
            merged[flag.name] = flag
        else:
            merged[flag.name] = dataclasses.replace(
                old,
                key=flag.key or old.key,
                rate=flag.rate if flag.rate is not None else old.rate,
            )
    return tuple(merged.values())


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
    if isinstance(settings.get("tenants"), list):
        # A list of keyed tenants rather than a number of unkeyed ones.
        entries = settings.pop("tenants")
        if not entries:
            raise ValueError(f"scenario {path}: 'tenants' is an empty list")
        settings["tenant_specs"] = tuple(
            tenant_from_dict(e, f"scenario {path}: tenants[{i}]") for i, e in enumerate(entries)
        )
    return settings


def merge(target: dict[str, Any], scenario: dict[str, Any], flags: dict[str, Any]) -> LoadOptions:
    """Defaults, then the scenario, then flags that were given (not None)."""
    values = {**scenario, **{k: v for k, v in flags.items() if v is not None}, **target}
    return LoadOptions(**values)
