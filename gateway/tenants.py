"""Tenants, their keys and what they may see: the auth config and the key -> tenant
lookup done at the client edge (``rest.py``, ``grpc_server.py``).

The auth config (``--auth-config FILE``, YAML) lists tenants with the SHA-256 digests
of their keys, never the keys::

    tenants:
      - name: acme
        keys: ["sha256:<hex sha256 digest of the key>"]
        models: ["acme-*", "shared-*"]     # globs over model names
        rate_limit_rps: 50                 # token bucket; burst = rate unless set
        burst: 100
        max_concurrency: 16                # requests in flight at once
        device_memory_quota: 2GiB          # bytes its private models may hold
      - name: ops
        role: admin                        # load/unload, status, every model
        keys: ["sha256:<hex>"]

A key is a bearer token: ``Authorization: Bearer KEY`` over REST, metadata
``authorization: Bearer KEY`` over gRPC. The edge turns it into a ``Tenant`` (a frozen
value) that travels with the request to the data plane, which alone decides what the
tenant may see and do (``DataPlane._visible``, ``DataPlane._require_admin``).

Without an auth config the ``Authenticator`` answers None for every request: the server
is open and everything is visible.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from modelpool.gateway.filewatch import read_yaml, signature, watch
from modelpool.placement.errors import Unauthenticated
from modelpool.placement.units import parse_size

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
#: Tenant names: they appear in logs, metrics labels and the audit log.
_TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TENANT_FIELDS = frozenset(
    {"name", "role", "keys", "models", "rate_limit_rps", "burst", "max_concurrency",
     "device_memory_quota"}
)  # fmt: skip
#: What a client is told when its credentials are missing or wrong.
HOW_TO_SEND = "send 'Authorization: Bearer KEY' (gRPC: metadata 'authorization: Bearer KEY')"


class AuthConfigError(ValueError):
    """The auth config cannot be used; the message names the file, tenant and field."""


class Role(StrEnum):
    """``tenant``: its own models only. ``admin``: every model, and the admin calls
    (repository load/unload, status, statistics of every model)."""

    TENANT = "tenant"
    ADMIN = "admin"


@dataclass(frozen=True)
class Tenant:
    """Who a request comes from, resolved at the edge from its key.

    ``models`` are globs over model names (``fnmatch``, case-sensitive: ``*``, ``?``,
    ``[abc]``); an admin sees every model whatever they say. The limits are None when
    unset (unlimited): ``rate_limit_rps`` requests per second with bursts of ``burst``
    (defaults to the rate, at least 1), ``max_concurrency`` requests in flight, and
    ``device_memory_quota`` bytes its private models may hold on all devices together.
    """

    name: str
    role: Role = Role.TENANT
    models: tuple[str, ...] = ()
    rate_limit_rps: float | None = None
    burst: float | None = None
    max_concurrency: int | None = None
    device_memory_quota: int | None = None
    _match: Callable[[str], object] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One compiled alternation: a lookup costs one regex match, however many globs.
        if self.models:
            pattern = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in self.models))
            matcher: Callable[[str], object] = pattern.fullmatch
        else:
            matcher = lambda name: None  # noqa: E731
        object.__setattr__(self, "_match", matcher)

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def sees(self, model: str) -> bool:
        """Whether ``model`` exists for this tenant (it may still be absent on disk)."""
        return self.is_admin or self._match(model) is not None


@dataclass(frozen=True)
class AuthConfig:
    """A parsed auth config: the tenants and the digest of every key with its tenant."""

    tenants: tuple[Tenant, ...]
    #: (sha256 digest of a key, its tenant), for every key of every tenant.
    keys: tuple[tuple[bytes, Tenant], ...]
    source: str = ""

    def tenant_for(self, key: str) -> Tenant | None:
        """The tenant holding ``key``, or None.

        Constant time in the key: the presented key is hashed and compared with
        ``hmac.compare_digest`` against every known digest, with no early exit, so the
        time taken says neither whether nor where a key matched.
        """
        try:
            digest = hashlib.sha256(key.encode("utf-8")).digest()
        except UnicodeEncodeError:  # lone surrogates: no configured key can match
            digest = b"\0" * 32
        found: Tenant | None = None
        for known, tenant in self.keys:
            if hmac.compare_digest(known, digest):
                found = tenant
        return found


def hash_key(key: str) -> str:
    """The line an auth config holds for ``key``: ``sha256:<hex digest of its UTF-8>``."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


#: Starts every key ``modelpool keys new`` makes: secret scanners can spot a leaked key,
#: and no key starts with '-' (which a command line would take for an option).
KEY_PREFIX = "mpk_"


def new_key() -> str:
    """A fresh random key: ``mpk_`` and 32 random bytes, URL-safe base64 (47 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_tenant_name(name: object) -> str:
    if not isinstance(name, str) or not _TENANT_NAME_RE.fullmatch(name):
        raise ValueError(
            f"tenant name {name!r} is not allowed: 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


# -- parsing -------------------------------------------------------------------------------


def load_auth_config(path: str | os.PathLike[str]) -> AuthConfig:
    """Read and validate the auth config at ``path``.

    Raises:
        AuthConfigError: unreadable file, bad YAML, or a bad field (the message names
            the tenant and the field).
    """
    doc = read_yaml(path, "auth config", AuthConfigError)
    return parse_auth_config(doc, str(path))


def parse_auth_config(doc: object, source: str = "<auth config>") -> AuthConfig:
    """Validate a loaded YAML document (see the module docstring for its shape)."""
    where = f"auth config {source}"
    if not isinstance(doc, Mapping):
        raise AuthConfigError(f"{where}: expected a mapping with a 'tenants' list at the top")
    unknown = sorted(str(k) for k in doc if k != "tenants")
    if unknown:
        raise AuthConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: tenants)")
    entries = doc.get("tenants")
    if not isinstance(entries, list):
        raise AuthConfigError(f"{where}: 'tenants' must be a list of tenants")
    tenants: list[Tenant] = []
    keys: list[tuple[bytes, Tenant]] = []
    owner_of: dict[bytes, str] = {}
    for i, entry in enumerate(entries):
        tenant, digests = _parse_tenant(entry, f"{where}: tenants[{i}]")
        if any(t.name == tenant.name for t in tenants):
            raise AuthConfigError(f"{where}: tenant '{tenant.name}' is listed twice")
        for digest in digests:
            if digest in owner_of:
                raise AuthConfigError(
                    f"{where}: tenant '{tenant.name}': field 'keys': a key is also a key of "
                    f"tenant '{owner_of[digest]}' (each key belongs to one tenant)"
                )
            owner_of[digest] = tenant.name
            keys.append((digest, tenant))
        tenants.append(tenant)
    return AuthConfig(tuple(tenants), tuple(keys), source)


def _parse_tenant(entry: object, where: str) -> tuple[Tenant, list[bytes]]:
    if not isinstance(entry, Mapping):
        raise AuthConfigError(f"{where}: expected a mapping (name, keys, models, ...)")
    try:
        name = check_tenant_name(entry.get("name"))
    except ValueError as e:
        raise AuthConfigError(f"{where}: field 'name': {e}") from None
    here = f"{where} (tenant '{name}')"

    def bad(fieldname: str, problem: str) -> AuthConfigError:
        return AuthConfigError(f"{here}: field '{fieldname}': {problem}")

    unknown = sorted(str(k) for k in entry if k not in _TENANT_FIELDS)
    if unknown:
        raise AuthConfigError(
            f"{here}: unknown field(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_TENANT_FIELDS))})"
        )
    role_text = entry.get("role", Role.TENANT.value)
    try:
        role = Role(role_text)
    except ValueError:
        raise bad("role", f"{role_text!r} is not a role (tenant or admin)") from None

    raw_keys = entry.get("keys")
    if not isinstance(raw_keys, list) or not raw_keys:
        raise bad("keys", "expected a non-empty list of 'sha256:<64 hex digits>' digests")
    digests: list[bytes] = []
    for k in raw_keys:
        m = _HASH_RE.fullmatch(k) if isinstance(k, str) else None
        if m is None:
            # Never echo the value: it may be a plain key pasted by mistake.
            raise bad(
                "keys",
                "every entry must be 'sha256:<64 lowercase hex digits>', the digest of a "
                "key (`modelpool keys new` prints one); plain keys are never stored",
            )
        digest = bytes.fromhex(m[1])
        if digest in digests:
            raise bad("keys", "the same digest is listed twice")
        digests.append(digest)

    models: tuple[str, ...] = ()
    if "models" in entry:
        if role is Role.ADMIN:
            raise bad("models", "an admin sees every model; drop 'models' or the admin role")
        raw_models = entry["models"]
        if not isinstance(raw_models, list) or not all(
            isinstance(g, str) and g.strip() for g in raw_models
        ):
            raise bad("models", "expected a list of model name globs, e.g. ['acme-*']")
        models = tuple(raw_models)

    rate = _positive_number(entry, "rate_limit_rps", bad)
    burst = _positive_number(entry, "burst", bad)
    if burst is not None:
        if rate is None:
            raise bad("burst", "needs rate_limit_rps")
        if burst < 1:
            raise bad("burst", f"{burst:g} is under 1: no request could ever pass")
    elif rate is not None:
        burst = max(1.0, rate)
    concurrency = entry.get("max_concurrency")
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise bad("max_concurrency", f"{concurrency!r} is not a positive whole number")
    quota = _size(entry, "device_memory_quota", bad)
    tenant = Tenant(
        name=name,
        role=role,
        models=models,
        rate_limit_rps=rate,
        burst=burst,
        max_concurrency=concurrency,
        device_memory_quota=quota,
    )
    return tenant, digests


def _positive_number(
    entry: Mapping[str, Any], name: str, bad: Callable[[str, str], AuthConfigError]
) -> float | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise bad(name, f"{value!r} is not a positive number")
    if value == float("inf"):
        raise bad(name, "must be finite (leave it out for no limit)")
    return float(value)


def _size(
    entry: Mapping[str, Any], name: str, bad: Callable[[str, str], AuthConfigError]
) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise bad(name, f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise bad(name, f"{value} is negative")
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as e:
            raise bad(name, str(e)) from None
    raise bad(name, f"{value!r} is not a size (e.g. 2GiB, 512MB or bytes)")


# -- the edge's lookup, and reloads -----------------------------------------------------------


class Authenticator:
    """Resolves ``Authorization`` values to tenants, under the current auth config.

    ``path`` None: auth is off and ``authenticate`` answers None. ``reload`` swaps the
    config in one assignment: a request resolved before it keeps its ``Tenant``, one
    after it sees the new config, none is dropped; a file that does not parse is logged
    and the old config kept. ``listeners`` are called with each new config (the
    tenant limiter takes its limits from there).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.config: AuthConfig | None = None
        self.listeners: list[Callable[[AuthConfig], None]] = []
        self._seen: tuple[int, int, int] | None = None
        if path is not None:
            self._seen = signature(path)
            self.config = load_auth_config(path)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an ``Authorization`` value (``Bearer KEY``); None when auth is off.

        Raises:
            Unauthenticated: auth is on and the value is missing, not a bearer token,
                or a key no tenant holds.
        """
        config = self.config
        if config is None:
            return None
        if not authorization:
            raise Unauthenticated(f"credentials required: {HOW_TO_SEND}")
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated(f"credentials are not a bearer token: {HOW_TO_SEND}")
        tenant = config.tenant_for(key)
        if tenant is None:
            raise Unauthenticated("unknown key")
        return tenant

    def reload(self) -> bool:
        """Re-read the file; True when the new config is in use. A bad file is logged
        (naming the tenant and field) and the old config kept."""
        if self.path is None:
            log.info("no --auth-config: nothing to reload")
            return False
        self._seen = signature(self.path)
        try:
            config = load_auth_config(self.path)
        except AuthConfigError as e:
            log.error("auth config not reloaded, keeping the previous one: %s", e)
            return False
        self.config = config
        log.info(
            "auth config reloaded from %s: %d tenants, %d keys",
            self.path,
            len(config.tenants),
            len(config.keys),
        )
        for listener in self.listeners:
            try:
                listener(config)
            except Exception:
                log.exception("auth config listener failed")
        return True

    async def watch(self, interval_s: float = 1.0) -> None:
        """Reload whenever the file changes (mtime, size or inode), checking every
        ``interval_s`` seconds; runs until cancelled."""
        if self.path is not None:
            await watch(self.path, lambda: self._seen, self.reload, "auth config", interval_s)
