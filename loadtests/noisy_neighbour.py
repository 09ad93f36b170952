"""Noisy neighbour: does a tenant far over its limits slow down one within its own?

    python -m loadtests.noisy_neighbour [--duration S] [--rounds N] [--protocol grpc|http] [--out FILE.json]

Writes the example models and an auth config with two tenants that share them: quiet
(``rate_limit_rps`` well above what it sends) and noisy (``rate_limit_rps`` N,
``max_concurrency`` C). Starts the real ``modelpool serve --auth-config``, warms every
model, then runs ``--rounds`` times, ``--duration`` seconds each phase:

    (a) alone           quiet at its rate
    (b) with neighbour  quiet at the same rate, and noisy at 10x its limit, in one run
    (c) control         quiet at the same rate, and noisy at its limit (``--no-control``
                        skips it): the neighbour's admitted load without the refused
                        flood, so (b) over (c) is what the flood itself costs quiet

(``--overdrive 1`` sends noisy at its limit in (b) as well.)

Both phases are the open-loop ``loadtests run`` driver with keyed tenants; quiet's
arrivals are seeded by its name, so (b) replays (a)'s requests with the neighbour
added. Rounds alternate a, b, a, b, ... so a noisy moment on a shared machine lands on
one round, not on one phase; the result is quiet's p99 over all its requests with the
neighbour against its p99 over all its requests alone, each pooled over the rounds
(the per-round ratios and their median are shown beside it). The target: that ratio
at most 1.5x, none of quiet's requests refused or failed, and the noisy tenant held to its limits (429 /
RESOURCE_EXHAUSTED, and no more admitted than its bucket allows). The verdict is
printed and written with the figures, whatever it is; ``--check`` makes a failed
verdict exit 3. CPU seconds of the server's processes and of this generator per phase
are recorded too: on a small machine they share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from modelpool.loadtests.client import RequestFailed, connect
from modelpool.loadtests.options import PROTOCOLS, LoadOptions, TenantSpec
from modelpool.loadtests.report import Report, TenantFigures, latency_ms, tenant_table
from modelpool.loadtests.runner import discover_models, run_load, stderr_progress
from modelpool.loadtests.servers import Serve, start_serve, stop

#: The issue's bound on quiet's p99 with the neighbour over its p99 alone.
TARGET_P99_RATIO = 1.5
#: The noisy tenant sends this many times its rate limit (``--overdrive``).
NOISY_OVERDRIVE = 10.0
#: Quiet's own limit is this many times what it sends, so Poisson bursts never reach it.
QUIET_HEADROOM = 5.0
#: Admitted over what the bucket allows before "held to its limits" fails (the
#: generator's clock against the server's bucket).
ADMITTED_SLACK = 1.05
#: Requests per model before anything is measured (loads, first runs).
WARM_REQUESTS = 5
#: With ``--noisy-process``: seconds noisy sends before quiet starts and after it ends.
NOISY_PROCESS_LEAD_S = 1.5
#: Seconds a noisy process may take to start sending (imports, discovery).
CHILD_START_TIMEOUT_S = 60.0
#: Lines of the server log kept in the JSON when it logged errors.
LOG_EXCERPT_LINES = 20


@dataclasses.dataclass(frozen=True)
class Setup:
    """The two tenants' limits and rates (requests per second)."""

    quiet_rate: float
    noisy_limit: float
    noisy_burst: float
    noisy_concurrency: int
    #: Noisy's sending rate over its limit.
    overdrive: float = NOISY_OVERDRIVE

    @property
    def quiet_limit(self) -> float:
        return self.quiet_rate * QUIET_HEADROOM

    @property
    def noisy_rate(self) -> float:
        return self.noisy_limit * self.overdrive

    def auth_doc(self, keys: dict[str, str]) -> dict[str, Any]:
        """The auth config: both tenants see every model (``*``)."""
        from modelpool.gateway.tenants import hash_key

        return {
            "tenants": [
                {"name": "quiet", "keys": [hash_key(keys["quiet"])], "models": ["*"],
                 "rate_limit_rps": self.quiet_limit, "burst": self.quiet_limit},
                {"name": "noisy", "keys": [hash_key(keys["noisy"])], "models": ["*"],
                 "rate_limit_rps": self.noisy_limit, "burst": self.noisy_burst,
                 "max_concurrency": self.noisy_concurrency},
            ]
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "quiet": {"rate_rps": self.quiet_rate, "rate_limit_rps": self.quiet_limit,
                      "burst": self.quiet_limit, "max_concurrency": None},
            "noisy": {"rate_rps": self.noisy_rate, "overdrive": self.overdrive,
                      "rate_limit_rps": self.noisy_limit, "burst": self.noisy_burst,
                      "max_concurrency": self.noisy_concurrency},
        }  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase: each tenant's row, and the CPU seconds spent while it ran (None
    where /proc cannot tell)."""

    tenants: dict[str, TenantFigures]
    #: Seconds the longest stream took, sending and draining.
    elapsed_s: float
    #: How late this process's generator sent its arrivals, p99 (ms).
    send_lag_p99_ms: float | None
    server_cpu_s: float | None
    #: This process's, and a separate noisy process's.
    generator_cpu_s: float
    #: The gateway's own count of the phase's requests: tenant -> outcome -> requests
    #: (``modelpool_requests_total``; ``rate_limited`` is its 429s).
    server_counted: dict[str, dict[str, int]]
    #: Quiet's answered latencies (ms), pooled over rounds for the verdict.
    quiet_latencies_ms: tuple[float, ...] = ()


# -- CPU accounting (Linux /proc) -------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of ``pid``; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int) -> float | None:
    """CPU seconds of ``root`` and every live descendant (the gateway and its workers)."""
    if not Path("/proc").is_dir():
        return None
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
    if root not in stats:
        return None
    total, frontier = 0.0, [root]
    while frontier:
        pid = frontier.pop()
        total += stats[pid][1]
        frontier += [p for p, (parent, _) in stats.items() if parent == pid]
    return total


def requests_by_tenant(metrics_hostport: str) -> dict[str, dict[str, int]]:
    """``modelpool_requests_total`` summed by tenant and outcome, from one scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{metrics_hostport}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    counted: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "modelpool_requests_total":
                by = counted.setdefault(sample.labels.get("tenant", ""), {})
                outcome = sample.labels.get("outcome", "")
                by[outcome] = by.get(outcome, 0) + int(sample.value)
    return counted


def _minus(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for tenant, outcomes in after.items():
        for outcome, n in outcomes.items():
            d = n - before.get(tenant, {}).get(outcome, 0)
            if d:
                out.setdefault(tenant, {})[outcome] = d
    return out


def _noisy_process(options: LoadOptions, started: Any, results: Any) -> None:
    """The noisy stream in a process of its own (``--noisy-process``): ``started`` is
    set once it has sent for a second; (report, CPU seconds) go on ``results``."""

    def progress(_line: str) -> None:
        started.set()

    began = time.process_time()
    report = asyncio.run(run_load(options, progress=progress))
    results.put((report, time.process_time() - began))


async def _with_noisy_process(
    quiet: LoadOptions, noisy: LoadOptions, progress: bool
) -> tuple[list[Report], float]:
    """Quiet here and noisy in a child process, noisy started first and running
    ``NOISY_PROCESS_LEAD_S`` longer on each side, so quiet's whole run has the
    neighbour. Returns both reports and the child's CPU seconds."""
    ctx = multiprocessing.get_context("spawn")
    started, results = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_noisy_process, args=(noisy, started, results), daemon=True)
    child.start()
    try:
        if not await asyncio.to_thread(started.wait, CHILD_START_TIMEOUT_S):
            raise RuntimeError("the noisy process did not start sending")
        report = await run_load(quiet, progress=stderr_progress if progress else None)
        wait_s = noisy.duration + noisy.timeout + CHILD_START_TIMEOUT_S
        noisy_report, child_cpu = await asyncio.to_thread(results.get, True, wait_s)
    finally:
        await asyncio.to_thread(child.join, CHILD_START_TIMEOUT_S)
        if child.is_alive():
            child.kill()
    return [report, noisy_report], child_cpu


async def timed_phase(
    options: LoadOptions, server_pid: int, progress: bool, noisy: LoadOptions | None = None
) -> Phase:
    """Run ``options`` (and ``noisy`` in its own process, if given), with the gateway's
    counts and the CPU seconds around it."""
    assert options.metrics_url is not None
    counted_before = await asyncio.to_thread(requests_by_tenant, options.metrics_url)
    server_before = tree_cpu_s(server_pid)
    me_before = time.process_time()
    if noisy is None:
        reports, child_cpu = (
            [await run_load(options, progress=stderr_progress if progress else None)],
            0.0,
        )
    else:
        reports, child_cpu = await _with_noisy_process(options, noisy, progress)
    server_after = tree_cpu_s(server_pid)
    me_used = time.process_time() - me_before + child_cpu
    counted_after = await asyncio.to_thread(requests_by_tenant, options.metrics_url)
    used = None
    if server_before is not None and server_after is not None:
        used = round(server_after - server_before, 2)
    return Phase(
        tenants={name: t for r in reports for name, t in r.tenants.items()},
        elapsed_s=max(r.elapsed_s for r in reports),
        send_lag_p99_ms=reports[0].send_lag_ms.p99,
        server_cpu_s=used,
        generator_cpu_s=round(me_used, 2),
        server_counted=_minus(counted_after, counted_before),
        quiet_latencies_ms=tuple(
            v for r in reports for v in r.tenant_latencies_ms.get("quiet", ())
        ),
    )


# -- the run ------------------------------------------------------------------------------


async def warm(server_url: str, protocol: str, spec: TenantSpec, timeout_s: float) -> list[str]:
    """Load every model the tenant sees and run each a few times; returns the models.
    A refused key or a model that will not load fails here, before anything is timed."""
    adapter = connect(protocol, server_url, timeout_s, 8, spec.headers)
    try:
        models = await discover_models(adapter, ())
        for i, name in enumerate(models):
            prepared = adapter.prepare(await adapter.model_info(name), i)
            for _ in range(WARM_REQUESTS):
                await adapter.infer(name, prepared)
        return models
    finally:
        await adapter.close()


async def measure(
    server: Serve, protocol: str, setup: Setup, keys: dict[str, str], args: argparse.Namespace
) -> tuple[list[str], list[tuple[Phase, Phase, Phase | None]]]:
    """Warm up, then ``args.rounds`` x (alone, with the neighbour, and unless
    ``--no-control`` with the neighbour sending at its limit)."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    quiet = TenantSpec("quiet", keys["quiet"], setup.quiet_rate)
    noisy = TenantSpec("noisy", keys["noisy"], setup.noisy_rate)
    models = await warm(url, protocol, quiet, args.timeout)
    # Only the index with noisy's key: its burst may be smaller than a warm-up.
    adapter = connect(protocol, url, args.timeout, 1, noisy.headers)
    try:
        seen = await discover_models(adapter, ())
    finally:
        await adapter.close()
    if seen != models:
        raise RuntimeError(f"the tenants see different models: quiet {models}, noisy {seen}")
    alone = LoadOptions(
        url=url,
        protocol=protocol,
        duration=args.duration,
        zipf=args.zipf,
        seed=args.seed,
        timeout=args.timeout,
        metrics_url=f"127.0.0.1:{server.metrics_port}",
        tenant_specs=(quiet,),
    )
    both = dataclasses.replace(alone, tenant_specs=(quiet, noisy))
    # The control: the neighbour's admitted load without the refused flood.
    at_limit_spec = dataclasses.replace(noisy, rate=setup.noisy_limit)
    at_limit = dataclasses.replace(alone, tenant_specs=(quiet, at_limit_spec))
    control = args.control and setup.overdrive > 1
    separate = separate_at_limit = None
    if args.noisy_process:
        both = at_limit = alone
        separate = dataclasses.replace(
            alone, duration=args.duration + 2 * NOISY_PROCESS_LEAD_S, tenant_specs=(noisy,)
        )
        separate_at_limit = dataclasses.replace(separate, tenant_specs=(at_limit_spec,))
    rounds = []
    for r in range(1, args.rounds + 1):
        _say(f"round {r}/{args.rounds} (a) quiet alone at {setup.quiet_rate:g} rps")
        a = await timed_phase(alone, server.proc.pid, not args.quiet)
        _say(
            f"round {r}/{args.rounds} (b) quiet at {setup.quiet_rate:g} rps with noisy at "
            f"{setup.noisy_rate:g} rps (limit {setup.noisy_limit:g})"
        )
        b = await timed_phase(both, server.proc.pid, not args.quiet, separate)
        c = None
        if control:
            _say(
                f"round {r}/{args.rounds} (c) quiet at {setup.quiet_rate:g} rps with noisy at "
                f"its limit, {setup.noisy_limit:g} rps"
            )
            c = await timed_phase(at_limit, server.proc.pid, not args.quiet, separate_at_limit)
        rounds.append((a, b, c))
    return models, rounds


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- figures and verdict -------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def held_to_limits(setup: Setup, noisy: TenantFigures, elapsed_s: float) -> tuple[bool, str]:
    """Whether the server held noisy to its limits in one phase: refused some (when it
    sent over its limit at all) and admitted no more than ``limit * elapsed + burst``."""
    admitted = noisy.sent - noisy.rejected
    allowed = setup.noisy_limit * elapsed_s + setup.noisy_burst
    ok = (noisy.rejected > 0 or setup.overdrive <= 1) and admitted <= allowed * ADMITTED_SLACK
    why = (
        f"the noisy tenant sent {noisy.sent} at {noisy.rate_rps:g} rps: {admitted} admitted, "
        f"{noisy.rejected} refused; its bucket allows {allowed:.0f} in {elapsed_s:.1f} s"
    )
    return ok, why


def pooled_p99(rounds: list[dict[str, Any]], phase: str) -> float | None:
    """Quiet's p99 over every answered request of ``phase`` in all rounds."""
    return latency_ms([v / 1000.0 for r in rounds for v in r["quiet_latencies_ms"][phase]]).p99


def verdict(setup: Setup, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The checks over every round; ``passed`` only when all hold.

    The p99 check is on quiet's p99 over all its requests with the neighbour against
    its p99 over all its requests alone, each pooled over the rounds: the p99 "of
    another tenant" the issue bounds. A round's own p99 rests on its few slowest
    requests (the 4th-slowest of 400 at the defaults), so the per-round ratios, shown
    beside it with their median, scatter even when nothing changes between the phases
    (0.76x-1.60x in the control run with noisy at its limit)."""
    ratio = _ratio(pooled_p99(rounds, "with_neighbour"), pooled_p99(rounds, "alone"))
    # With the control phase: how much of that the neighbour's admitted load explains.
    at_limit = (
        pooled_p99(rounds, "at_limit")
        if rounds and all("at_limit" in r["quiet_latencies_ms"] for r in rounds)
        else None
    )
    reasons = []
    quiet_ok = True
    held = True
    for i, r in enumerate(rounds, start=1):
        alone = TenantFigures(**r["alone"]["quiet"])
        quiet = TenantFigures(**r["with_neighbour"]["quiet"])
        noisy = TenantFigures(**r["with_neighbour"]["noisy"])
        if not (quiet.ok == quiet.sent > 0 and alone.ok == alone.sent > 0):
            quiet_ok = False
            reasons.append(
                f"round {i}: quiet had failures: alone {alone.errors_by_kind or 'none'}, "
                f"with the neighbour {quiet.errors_by_kind or 'none'}"
            )
        ok, why = held_to_limits(setup, noisy, r["with_neighbour_elapsed_s"])
        if not ok:
            held = False
            reasons.append(f"round {i}: {why}: are its limits enforced?")
    checks = {
        "quiet_p99_within_target": ratio is not None and ratio <= TARGET_P99_RATIO,
        "quiet_all_ok": quiet_ok,
        "noisy_held_to_its_limits": held,
    }
    if ratio is None:
        reasons.insert(0, "no p99 to compare: the quiet tenant got no answers")
    elif not checks["quiet_p99_within_target"]:
        reasons.insert(
            0, f"quiet p99 rose {ratio:.2f}x with the neighbour (target <= {TARGET_P99_RATIO}x)"
        )
    return {
        "quiet_p99_ratio": ratio,
        "quiet_p99_alone_ms": pooled_p99(rounds, "alone"),
        "quiet_p99_with_neighbour_ms": pooled_p99(rounds, "with_neighbour"),
        "quiet_p99_ratio_median_of_rounds": _median([r["quiet_p99_ratio"] for r in rounds]),
        # Control: quiet with noisy at its limit; the flood's own share is the last.
        "quiet_p99_at_limit_ms": at_limit,
        "quiet_p99_ratio_at_limit": _ratio(at_limit, pooled_p99(rounds, "alone")),
        "quiet_p99_ratio_flood_over_at_limit": _ratio(
            pooled_p99(rounds, "with_neighbour"), at_limit
        ),
        "quiet_p50_ratio": _median([r["quiet_p50_ratio"] for r in rounds]),
        "target_p99_ratio": TARGET_P99_RATIO,
        "checks": checks,
        "passed": all(checks.values()),
        "reasons": reasons,
    }


def round_doc(a: Phase, b: Phase, c: Phase | None = None) -> dict[str, Any]:
    alone, quiet = a.tenants["quiet"], b.tenants["quiet"]
    control: dict[str, Any] = {}
    if c is not None:
        control = {
            "at_limit": {n: dataclasses.asdict(t) for n, t in c.tenants.items()},
            "quiet_p99_ratio_at_limit": _ratio(c.tenants["quiet"].p99, alone.p99),
        }
    return {
        "alone": {"quiet": dataclasses.asdict(alone)},
        "with_neighbour": {n: dataclasses.asdict(t) for n, t in b.tenants.items()},
        "with_neighbour_elapsed_s": b.elapsed_s,
        "quiet_p50_ratio": _ratio(quiet.p50, alone.p50),
        "quiet_p99_ratio": _ratio(quiet.p99, alone.p99),
        # How late the generator sent (all streams), and CPU seconds while each phase
        # ran: on a small machine the generator and the server share the cores.
        "send_lag_p99_ms": {"alone": a.send_lag_p99_ms, "with_neighbour": b.send_lag_p99_ms},
        "server_cpu_s": {"alone": a.server_cpu_s, "with_neighbour": b.server_cpu_s},
        "generator_cpu_s": {"alone": a.generator_cpu_s, "with_neighbour": b.generator_cpu_s},
        "server_counted": {"alone": a.server_counted, "with_neighbour": b.server_counted},
        "server_counts_agree": counts_agree(a) and counts_agree(b),
        # Every answered request's latency, so the pooled p99 can be recomputed.
        "quiet_latencies_ms": {
            "alone": [round(v, 3) for v in a.quiet_latencies_ms],
            "with_neighbour": [round(v, 3) for v in b.quiet_latencies_ms],
            **({"at_limit": [round(v, 3) for v in c.quiet_latencies_ms]} if c else {}),
        },
        **control,
    }  # fmt: skip


def counts_agree(phase: Phase) -> bool:
    """Whether the gateway counted each tenant's requests and 429s as the client did."""
    for name, t in phase.tenants.items():
        counted = phase.server_counted.get(name, {})
        if sum(counted.values()) != t.sent or counted.get("rate_limited", 0) != t.rejected:
            return False
    return True


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Quiet's medians over rounds, and noisy's counts summed over rounds."""

    def med(phase: str, what: str) -> float | None:
        return _median([r[phase]["quiet"][what] for r in rounds])

    quiet = [r[phase]["quiet"] for r in rounds for phase in ("alone", "with_neighbour")]
    noisy = [r["with_neighbour"]["noisy"] for r in rounds]
    sent, rejected = sum(n["sent"] for n in noisy), sum(n["rejected"] for n in noisy)
    return {
        "quiet": {
            "alone": {"p50_ms": med("alone", "p50"), "p99_ms": med("alone", "p99")},
            "with_neighbour": {
                "p50_ms": med("with_neighbour", "p50"),
                "p99_ms": med("with_neighbour", "p99"),
            },
            "p99_ratios": [r["quiet_p99_ratio"] for r in rounds],
            "sent": sum(q["sent"] for q in quiet),
            "failed": sum(q["sent"] - q["ok"] for q in quiet),
        },
        "noisy": {
            "sent": sent,
            "admitted": sent - rejected,
            "ok": sum(n["ok"] for n in noisy),
            "rejected": rejected,
            "errors": sum(n["errors"] for n in noisy),
        },
    }


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(doc: dict[str, Any]) -> str:
    rows: dict[str, TenantFigures] = {}
    for i, r in enumerate(doc["rounds"], start=1):
        rows[f"{i} quiet alone"] = TenantFigures(**r["alone"]["quiet"])
        rows[f"{i} quiet + noisy"] = TenantFigures(**r["with_neighbour"]["quiet"])
        rows[f"{i} noisy"] = TenantFigures(**r["with_neighbour"]["noisy"])
        if "at_limit" in r:
            rows[f"{i} quiet + at limit"] = TenantFigures(**r["at_limit"]["quiet"])
            rows[f"{i} noisy at limit"] = TenantFigures(**r["at_limit"]["noisy"])
    v, quiet, noisy = doc["verdict"], doc["quiet"], doc["noisy"]
    limits = doc["setup"]["noisy"]
    ratios = " ".join(_fmt(x, ".2f") + "x" for x in quiet["p99_ratios"])
    lines = [
        f"noisy neighbour: {doc['protocol']}, {len(doc['rounds'])} round(s) of "
        f"{doc['duration_s']:g} s per phase, {len(doc['models'])} models, "
        f"{doc['cpu_count']} CPUs"
        + (", noisy from its own process" if doc["noisy_process"] else ""),
        *tenant_table(rows),
        "",
        f"quiet alone:          p50 {_fmt(quiet['alone']['p50_ms'])} ms  "
        f"p99 {_fmt(quiet['alone']['p99_ms'])} ms (medians of the rounds)",
        f"quiet with neighbour: p50 {_fmt(quiet['with_neighbour']['p50_ms'])} ms  "
        f"p99 {_fmt(quiet['with_neighbour']['p99_ms'])} ms",
        f"noisy: sent {noisy['sent']}, admitted {noisy['admitted']} ({noisy['ok']} ok), "
        f"429s {noisy['rejected']} (limit {limits['rate_limit_rps']:g} rps, burst "
        f"{limits['burst']:g}, {limits['max_concurrency']} in flight)",
    ]
    for i, r in enumerate(doc["rounds"], start=1):
        lag, srv, gen = r["send_lag_p99_ms"], r["server_cpu_s"], r["generator_cpu_s"]
        lines.append(
            f"round {i}: send lag p99 {_fmt(lag['alone'])} -> {_fmt(lag['with_neighbour'])} ms, "
            f"server CPU {_fmt(srv['alone'])} -> {_fmt(srv['with_neighbour'])} s, "
            f"generator CPU {_fmt(gen['alone'])} -> {_fmt(gen['with_neighbour'])} s"
        )
        if not r["server_counts_agree"]:
            lines.append(f"round {i}: the server counted otherwise: {r['server_counted']}")
    lines.append(
        f"quiet p99 over all rounds: alone {_fmt(v['quiet_p99_alone_ms'])} ms, with the "
        f"neighbour {_fmt(v['quiet_p99_with_neighbour_ms'])} ms; per round {ratios} "
        f"(median {_fmt(v['quiet_p99_ratio_median_of_rounds'], '.2f')}x)"
    )
    if v["quiet_p99_at_limit_ms"] is not None:
        lines.append(
            f"control, noisy at its limit: quiet p99 {_fmt(v['quiet_p99_at_limit_ms'])} ms, "
            f"{_fmt(v['quiet_p99_ratio_at_limit'], '.2f')}x alone; the flood over that: "
            f"{_fmt(v['quiet_p99_ratio_flood_over_at_limit'], '.2f')}x"
        )
    lines.append(
        f"quiet p99 with the neighbour / alone: {_fmt(v['quiet_p99_ratio'], '.2f')}x "
        f"(target <= {TARGET_P99_RATIO}x): " + ("PASS" if v["passed"] else "FAIL")
    )
    lines += [f"  - {r}" for r in v["reasons"]]
    return "\n".join(lines)


def server_log_errors(log_path: Path) -> list[str]:
    """The server's ERROR / CRITICAL / Traceback lines (the first LOG_EXCERPT_LINES)."""
    if not log_path.exists():
        return []
    lines = log_path.read_text(errors="replace").splitlines()
    bad = [ln for ln in lines if " ERROR " in ln or " CRITICAL " in ln or "Traceback" in ln]
    return bad[:LOG_EXCERPT_LINES]


def main(argv: list[str] | None = None) -> int:
    from modelpool.gateway.tenants import new_key
    from modelpool.gpu.examples import write_examples

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per phase (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="alone/with pairs (default 3)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    p.add_argument("--models", type=int, default=4, help="example models to write (default 4)")
    p.add_argument("--quiet-rate", type=float, default=20.0, help="quiet's rps (default 20)")
    p.add_argument("--noisy-limit", type=float, default=20.0, help="noisy's rate_limit_rps")
    p.add_argument("--noisy-burst", type=float, default=None, help="default: its limit")
    p.add_argument("--noisy-concurrency", type=int, default=4, help="noisy's max_concurrency")
    p.add_argument(
        "--overdrive",
        type=float,
        default=NOISY_OVERDRIVE,
        help=f"noisy sends this many times its limit (default {NOISY_OVERDRIVE:g}; 1: the "
        "neighbour's admitted load alone, a control)",
    )
    p.add_argument(
        "--noisy-process",
        action="store_true",
        help="send noisy from a process of its own instead of in one run with quiet, so "
        "noisy's replies do not share quiet's event loop (a control for the generator)",
    )
    p.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip phase (c) of each round: quiet with noisy sending at its limit (the "
        "neighbour's admitted load without the refused flood)",
    )
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--out", type=Path, default=Path("noisy_neighbour.json"))
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temporary dir")
    p.add_argument(
        "--serve-arg", action="append", default=[], help="extra argument for modelpool serve"
    )
    p.add_argument("--quiet", action="store_true", help="no per-second progress lines")
    p.add_argument("--check", action="store_true", help="exit 3 when the verdict fails")
    args = p.parse_args(argv)
    if min(args.duration, args.quiet_rate, args.noisy_limit, args.overdrive) <= 0:
        p.error("--duration, --quiet-rate, --noisy-limit and --overdrive must be positive")
    if args.rounds < 1 or args.models < 1 or args.noisy_concurrency < 1:
        p.error("--rounds, --models and --noisy-concurrency must be at least 1")
    setup = Setup(
        quiet_rate=args.quiet_rate,
        noisy_limit=args.noisy_limit,
        noisy_burst=args.noisy_burst or args.noisy_limit,
        noisy_concurrency=args.noisy_concurrency,
        overdrive=args.overdrive,
    )

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mp-noisy-"))
    work.mkdir(parents=True, exist_ok=True)
    write_examples(work / "models", count=args.models)
    keys = {"quiet": new_key(), "noisy": new_key()}
    auth = work / "auth.yaml"
    auth.write_text(yaml.safe_dump(setup.auth_doc(keys), sort_keys=False))
    log_path = work / "serve.log"
    try:
        server = start_serve(
            work / "models", ["--auth-config", str(auth), *args.serve_arg], log_path
        )
    except RuntimeError as e:
        print(f"noisy_neighbour: {e}", file=sys.stderr)
        return 1
    try:
        models, phases = asyncio.run(measure(server, args.protocol, setup, keys, args))
    except (RequestFailed, RuntimeError) as e:
        print(f"noisy_neighbour: cannot run: {e}; server log: {log_path}", file=sys.stderr)
        return 1
    finally:
        stop(server.proc)

    rounds = [round_doc(a, b, c) for a, b, c in phases]
    doc: dict[str, Any] = {
        "benchmark": "noisy_neighbour",
        "protocol": args.protocol,
        "duration_s": args.duration,
        "noisy_process": args.noisy_process,
        "cpu_count": os.cpu_count(),
        "seed": args.seed,
        "models": models,
        "setup": setup.to_dict(),
        **summary(rounds),
        "verdict": verdict(setup, rounds),
        "rounds": rounds,
        "server_log": str(log_path),
        "server_log_errors": server_log_errors(log_path),
    }
    print(table(doc))
    if doc["server_log_errors"]:
        print(f"the server logged errors; see {log_path}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 3 if args.check and not doc["verdict"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
