"""What the auth config means for the pool: each tenant's limits for the limiter, and
which models count against whose device-memory quota. Rebuilt on every reload."""

from __future__ import annotations

import uuid

from modelpool.gateway.copies import Quota
from modelpool.gateway.limits import Limits, TenantLimiter
from modelpool.gateway.tenants import AuthConfig, Role


def limits_of(config: AuthConfig) -> dict[str, Limits]:
    return {
        t.name: Limits(t.rate_limit_rps, t.burst, t.max_concurrency)
        for t in config.tenants
        if t.rate_limit_rps is not None or t.max_concurrency is not None
    }


class Quotas:
    """``quota_of(model)``: the quota of the one tenant that sees ``model``, when only
    one (non-admin) tenant does and it has a quota; None for shared models."""

    def __init__(self) -> None:
        self._config: AuthConfig | None = None
        self._cache: dict[str, Quota | None] = {}

    def configure(self, config: AuthConfig | None) -> None:
        self._config = config
        self._cache = {}

    def quota_of(self, model: str) -> Quota | None:
        if self._config is None:
            return None
        if model in self._cache:
            return self._cache[model]
        seers = [t for t in self._config.tenants if t.role != Role.ADMIN and t.sees(model)]
        quota = None
        limit = seers[0].device_memory_quota if len(seers) == 1 else None
        if limit is not None:
            owner = seers[0]
            others = [t for t in self._config.tenants if t.role != Role.ADMIN and t is not owner]

            def owns(name: str, owner=owner, others=others) -> bool:
                return owner.sees(name) and not any(t.sees(name) for t in others)

            quota = Quota(owner.name, limit, owns)
        self._cache[model] = quota
        return quota


def wire(config: AuthConfig | None, limiter: TenantLimiter, quotas: Quotas) -> None:
    """Apply a (re)loaded auth config to the limiter and the quotas."""
    limiter.configure(limits_of(config) if config is not None else {})
    quotas.configure(config)


def gateway_id() -> str:
    return uuid.uuid4().hex[:12]
