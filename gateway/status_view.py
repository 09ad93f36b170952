"""``modelpool status``: a terminal view of workers, devices and resident models, read
from the gateway's JSON status endpoint (``GET /v2/modelpool/status``)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


def fetch(url: str, timeout_s: float = 5.0, key: str | None = None) -> dict[str, Any]:
    """The status JSON; ``key`` (an admin's) for a gateway with an auth config."""
    base = url if "://" in url else f"http://{url}"
    request = urllib.request.Request(base.rstrip("/") + "/v2/modelpool/status")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout_s) as r:
        return json.load(r)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def ago(t: float, now: float) -> str:
    if t <= 0:
        return "never"
    s = max(0.0, now - t)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(headers), *(line(r) for r in rows)])


def render(status: dict[str, Any], url: str, now: float | None = None) -> str:
    now = time.time() if now is None else now
    copies = status["copies"]
    ready = [c for c in copies if c["state"] == "READY"]
    out = [
        f"modelpool {status['server']['version']} at {url}: {status['server']['models']} models in the "
        f"repository, {len(ready)} resident, {len(status['workers'])} workers",
        "",
    ]
    rows = []
    for d in status["devices"]:
        reserved = sum(
            c["footprint_bytes"]
            for c in copies
            if c["state"] == "LOADING"
            and any(
                w["worker_id"] == c["worker_id"] and w["device_id"] == d["device_id"]
                for w in status["workers"]
            )
        )
        rows.append(
            [
                d["device_id"],
                d["source"],
                human_bytes(d["total_bytes"]),
                human_bytes(d["used_bytes"]),
                human_bytes(d["free_bytes"]),
                human_bytes(d["ours_bytes"]),
                human_bytes(d["other_bytes"]),
                human_bytes(reserved),
            ]
        )
    out += [
        table(["DEVICE", "SOURCE", "TOTAL", "USED", "FREE", "OURS", "OTHERS", "RESERVED"], rows),
        "",
    ]
    held: dict[str, int] = {}
    for c in copies:
        held[c["worker_id"]] = held.get(c["worker_id"], 0) + 1
    rows = [
        [
            w["worker_id"],
            w["device_id"],
            w["address"],
            str(w["pid"]),
            str(held.get(w["worker_id"], 0)),
        ]
        for w in status["workers"]
    ]
    out += [table(["WORKER", "DEVICE", "ADDRESS", "PID", "COPIES"], rows), ""]
    rows = [
        [
            c["model"],
            str(c["version"]),
            c["worker_id"],
            c.get("tier", "device"),
            c["state"],
            human_bytes(c["footprint_bytes"]),
            ago(c["last_used"], now),
            str(c["inflight"]),
        ]
        for c in copies
    ]
    # Copies kept in a worker's host memory (its host tier); older gateways send none.
    rows += [
        [
            h["model"],
            str(h["version"]),
            h["worker_id"],
            "host",
            "-",
            human_bytes(h["bytes"]),
            ago(h["last_used"], now),
            "-",
        ]
        for h in status.get("host_copies") or []
    ]
    headers = ["MODEL", "VERSION", "WORKER", "TIER", "STATE", "FOOTPRINT", "LAST USED", "IN FLIGHT"]
    out.append(table(headers, rows))
    # Older gateways send no measurements.
    measured = status.get("footprints") or []
    if measured:
        rows = [
            [
                f["model"],
                str(f["version"]),
                f["device_kind"],
                human_bytes(f["footprint_bytes"]),
                human_bytes(f["peak_bytes"]),
                f"{f['load_seconds']:.2f}s",
                human_bytes(f["planned_bytes"]),
            ]
            for f in measured
        ]
        headers = ["MEASURED", "VERSION", "KIND", "FOOTPRINT", "PEAK", "LOAD", "PLANNED"]
        out += ["", table(headers, rows)]
    return "\n".join(out)


def run(url: str, watch_s: float | None, as_json: bool, key: str | None = None) -> int:
    while True:
        try:
            status = fetch(url, key=key)
        except urllib.error.HTTPError as e:
            hint = " (pass an admin key: --key or $MODELPOOL_KEY)" if e.code in (401, 403) else ""
            print(f"modelpool status: {url} answered {e.code} {e.reason}{hint}")
            return 1
        except (urllib.error.URLError, OSError) as e:
            print(f"modelpool status: cannot reach {url}: {e}")
            return 1
        if as_json:
            print(json.dumps(status, indent=2))
        else:
            if watch_s:
                print("\033[2J\033[H", end="")
            print(render(status, url))
        if not watch_s:
            return 0
        time.sleep(watch_s)
