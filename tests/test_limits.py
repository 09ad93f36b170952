"""Per-tenant admission on a fake clock: token buckets, concurrency, shares, reloads."""

from __future__ import annotations

import pytest

from modelpool.gateway.errors import retry_after, status_of
from modelpool.gateway.limits import Limits, TenantLimiter, TokenBucket
from modelpool.placement.errors import RateLimited


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_a_burst_then_the_rate() -> None:
    b = TokenBucket(rate=10, burst=3, updated=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.take(0.0)
    assert wait == pytest.approx(0.1)
    assert b.take(0.1) == 0.0


def test_rate_limit_is_a_429_with_retry_after() -> None:
    clock = Clock()
    limiter = TenantLimiter(clock)
    limiter.configure({"acme": Limits(rate_rps=2)})
    limiter.admit("acme").release()
    limiter.admit("acme").release()
    with pytest.raises(RateLimited) as err:
        limiter.admit("acme")
    assert status_of(err.value)[0] == 429 and status_of(err.value)[1].name == "RESOURCE_EXHAUSTED"
    assert retry_after(err.value) == pytest.approx(0.5)
    assert "acme" in err.value.message
    clock.t += 0.5
    limiter.admit("acme").release()
    assert limiter.rejections == {("acme", "rate"): 1}


def test_concurrency_counts_requests_in_flight() -> None:
    limiter = TenantLimiter(Clock())
    limiter.configure({"acme": Limits(max_concurrency=2)})
    a, b = limiter.admit("acme"), limiter.admit("acme")
    with pytest.raises(RateLimited, match="in flight"):
        limiter.admit("acme")
    a.release()
    a.release()  # twice is harmless
    assert limiter.inflight("acme") == 1
    with limiter.admit("acme"):
        assert limiter.inflight("acme") == 2
    b.release()
    assert limiter.inflight("acme") == 0


def test_tenants_do_not_share_limits_and_unknown_ones_are_unlimited() -> None:
    limiter = TenantLimiter(Clock())
    limiter.configure({"a": Limits(rate_rps=1), "b": Limits(rate_rps=1)})
    limiter.admit("a").release()
    limiter.admit("b").release()
    with pytest.raises(RateLimited):
        limiter.admit("a")
    for _ in range(100):
        limiter.admit("ops").release()


def test_a_share_splits_limits_across_gateways() -> None:
    limiter = TenantLimiter(Clock())
    limiter.configure({"a": Limits(rate_rps=10, max_concurrency=4)}, share=0.5)
    admitted = []
    for _ in range(2):
        admitted.append(limiter.admit("a"))
    with pytest.raises(RateLimited, match="in flight"):
        limiter.admit("a")
    for a in admitted:
        a.release()
    ok = 0
    for _ in range(10):
        try:
            limiter.admit("a").release()
            ok += 1
        except RateLimited:
            pass
    assert ok == 3  # 5 tokens of burst at half share, 2 spent above


def test_a_reload_does_not_grant_a_fresh_burst() -> None:
    limiter = TenantLimiter(Clock())
    limiter.configure({"a": Limits(rate_rps=2)})
    limiter.admit("a").release()
    limiter.admit("a").release()
    limiter.configure({"a": Limits(rate_rps=2)})
    with pytest.raises(RateLimited):
        limiter.admit("a")
