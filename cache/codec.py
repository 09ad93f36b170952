"""JSON forms of residency records and events, as stored in and published by Redis."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from modelpool.cache.records import (
    CopyKey,
    CopyRemoved,
    CopyState,
    CopyUpserted,
    CopyView,
    DevicePut,
    DeviceRecord,
    Footprint,
    FootprintKey,
    FootprintPut,
    StoreEvent,
    WorkerDown,
    WorkerRecord,
    WorkerUp,
)

SEP = "|"


def copy_field(key: CopyKey) -> str:
    model, version, worker = key
    return f"{model}{SEP}{version}{SEP}{worker}"


def parse_copy_field(field: str) -> CopyKey:
    model, version, worker = field.split(SEP, 2)
    return model, int(version), worker


def copy_to_dict(copy: CopyView, device_id: str = "") -> dict[str, Any]:
    d = dataclasses.asdict(copy)
    d["state"] = copy.state.value
    # Gateway-local figures are not shared truth.
    d.pop("inflight", None)
    d["device_id"] = device_id
    return d


def copy_from_dict(d: dict[str, Any]) -> CopyView:
    return CopyView(
        model=d["model"],
        version=int(d["version"]),
        worker_id=d["worker_id"],
        state=CopyState(d["state"]),
        footprint_bytes=int(d["footprint_bytes"]),
        last_used=float(d.get("last_used", 0.0)),
        loaded_at=float(d.get("loaded_at", 0.0)),
    )


def footprint_field(key: FootprintKey) -> str:
    model, version, kind = key
    return f"{model}{SEP}{version}{SEP}{kind}"


def footprint_to_json(footprint: Footprint) -> str:
    return json.dumps(dataclasses.asdict(footprint), separators=(",", ":"))


def footprint_from_dict(d: dict[str, Any]) -> Footprint:
    return Footprint(
        model=d["model"],
        version=int(d["version"]),
        device_kind=str(d["device_kind"]),
        footprint_bytes=int(d["footprint_bytes"]),
        peak_bytes=int(d["peak_bytes"]),
        load_seconds=float(d["load_seconds"]),
        measured_at=float(d.get("measured_at", 0.0)),
    )


def worker_from_dict(d: dict[str, Any]) -> WorkerRecord:
    return WorkerRecord(**d)


def device_from_dict(d: dict[str, Any]) -> DeviceRecord:
    return DeviceRecord(**d)


def event_to_json(event: StoreEvent, origin: str, device_id: str = "") -> str:
    match event:
        case WorkerUp(worker=w):
            body: dict[str, Any] = {"type": "worker_up", "worker": dataclasses.asdict(w)}
        case WorkerDown(worker_id=wid):
            body = {"type": "worker_down", "worker_id": wid}
        case CopyUpserted(copy=c):
            body = {"type": "copy", "copy": copy_to_dict(c, device_id)}
        case CopyRemoved(key=key):
            body = {"type": "copy_removed", "key": list(key)}
        case DevicePut(device=d):
            body = {"type": "device", "device": dataclasses.asdict(d)}
        case FootprintPut(footprint=f):
            body = {"type": "footprint", "footprint": dataclasses.asdict(f)}
        case _:
            raise TypeError(f"{type(event).__name__} is not published")
    body["origin"] = origin
    return json.dumps(body, separators=(",", ":"))


def event_from_json(text: str | bytes) -> tuple[str, StoreEvent]:
    """(origin, event) of a published message; ValueError for anything else."""
    d = json.loads(text)
    kind = d.get("type")
    origin = str(d.get("origin", ""))
    if kind == "worker_up":
        return origin, WorkerUp(worker_from_dict(d["worker"]))
    if kind == "worker_down":
        return origin, WorkerDown(d["worker_id"])
    if kind == "copy":
        return origin, CopyUpserted(copy_from_dict(d["copy"]))
    if kind == "copy_removed":
        m, v, w = d["key"]
        return origin, CopyRemoved((m, int(v), w))
    if kind == "device":
        return origin, DevicePut(device_from_dict(d["device"]))
    if kind == "footprint":
        return origin, FootprintPut(footprint_from_dict(d["footprint"]))
    raise ValueError(f"unknown event type {kind!r}")
