"""How a worker tells the gateway which model execution (forward) a request ran in,
so the gateway's Triton statistics count executions as Triton does: with dynamic
batching several requests share one forward, and ``execution_count`` grows by one.

The worker writes these response parameters on every ModelInfer reply:

=================================  =======  =============================================
``modelpool_execution_rows``       int64    rows (batch size) of the forward
``modelpool_execution_lead``       bool     true for exactly one request of each forward:
                                            the one whose gateway counts the execution
``modelpool_queue_ns``             int64    wait inside the worker before the forward
                                            (the dynamic batcher's queue, a free thread)
``modelpool_compute_infer_ns``     int64    the forward itself
``modelpool_compute_output_ns``    int64    encoding this request's outputs
=================================  =======  =============================================

They are the gateway's, not the client's: every parameter whose key starts with
``modelpool_`` is taken out before a reply leaves the gateway. A gRPC reply goes back
as the worker's bytes, not re-encoded, so :func:`split_raw` reads the parameters and
cuts their entries out of the bytes in one pass over the top-level fields, copying
the tensors' bytes verbatim; a REST reply is parsed anyway (:func:`read` with
``strip``).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

ROWS = "modelpool_execution_rows"
LEAD = "modelpool_execution_lead"
QUEUE_NS = "modelpool_queue_ns"
INFER_NS = "modelpool_compute_infer_ns"
OUTPUT_NS = "modelpool_compute_output_ns"
NAMES = (ROWS, LEAD, QUEUE_NS, INFER_NS, OUTPUT_NS)
#: Every response parameter under this prefix is internal, these and any added later.
PREFIX = "modelpool_"
_PREFIX = PREFIX.encode()

#: ModelInferResponse.parameters (a map: each entry is a field-4 record holding
#: key = 1, value = 2), the only field looked into in a raw reply.
_PARAMETERS_FIELD = 4
_KEY_TAG = 1 << 3 | 2  # field 1, length-delimited


@dataclass(frozen=True)
class Execution:
    """The forward one request ran in, as its worker saw it. Durations in seconds."""

    rows: int
    lead: bool
    queue_s: float
    infer_s: float
    output_s: float = 0.0


def write(response: pb.ModelInferResponse, execution: Execution) -> None:
    p = response.parameters
    p[ROWS].int64_param = execution.rows
    p[LEAD].bool_param = execution.lead
    p[QUEUE_NS].int64_param = int(execution.queue_s * 1e9)
    p[INFER_NS].int64_param = int(execution.infer_s * 1e9)
    p[OUTPUT_NS].int64_param = int(execution.output_s * 1e9)


def read(response: pb.ModelInferResponse, *, strip: bool = False) -> Execution | None:
    """The execution a reply reports; None when the worker wrote none. ``strip`` takes
    every ``modelpool_`` parameter out of ``response`` (for replies the gateway renders
    itself), whether or not it reports an execution."""
    p = response.parameters
    execution = None
    if ROWS in p and LEAD in p:
        execution = Execution(
            rows=p[ROWS].int64_param,
            lead=p[LEAD].bool_param,
            queue_s=p[QUEUE_NS].int64_param / 1e9 if QUEUE_NS in p else 0.0,
            infer_s=p[INFER_NS].int64_param / 1e9 if INFER_NS in p else 0.0,
            output_s=p[OUTPUT_NS].int64_param / 1e9 if OUTPUT_NS in p else 0.0,
        )
    if strip:
        for name in [k for k in p if k.startswith(PREFIX)]:
            del p[name]
    return execution


class _Malformed(Exception):
    """Bytes that are not a protobuf message (truncated, or a wire type proto3 lacks)."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _skip(buf: bytes, pos: int, wire: int) -> int:
    """Where the value of wire type ``wire`` that starts at ``pos`` ends: a length is
    jumped over, never read through, so a tensor costs the same as a number."""
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 2:
        size, pos = _varint(buf, pos)
        return pos + size
    if wire == 1:
        return pos + 8
    if wire == 5:
        return pos + 4
    raise _Malformed(f"wire type {wire}")


def _is_internal(buf: bytes, pos: int, end: int) -> bool:
    """Whether the map entry in ``buf[pos:end]`` has a ``modelpool_`` key (the last key
    field, as a parser keeps the last value of a singular field)."""
    internal = False
    while pos < end:
        tag, pos = _varint(buf, pos)
        value = pos
        pos = _skip(buf, pos, tag & 7)
        if tag == _KEY_TAG:
            size, start = _varint(buf, value)
            internal = buf.startswith(_PREFIX, start, start + size)
    if pos != end:
        raise _Malformed("entry overruns its length")
    return internal


def split_raw(raw: bytes) -> tuple[Execution | None, bytes]:
    """The execution a serialized ModelInferResponse reports (:func:`read`) and the
    same bytes without the ``modelpool_`` parameter entries, from one walk over the
    top-level fields that skips each by its length: the cost is per field, not per
    tensor byte. Every other field's bytes are kept verbatim and in order; a reply
    without internal entries comes back as the same object, uncopied.

    Bytes that cannot be walked (truncated, corrupt) come back unchanged with no
    execution: the client's own parser then reports them as it would have, and the
    statistics count the request as a forward of its own."""
    kept: list[tuple[int, int]] = []  # byte ranges to keep, adjacent ones merged
    internal: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < len(raw):
            start = pos
            tag, pos = _varint(raw, pos)
            value = pos
            pos = _skip(raw, pos, tag & 7)
            if pos > len(raw):
                raise _Malformed("field overruns the message")
            if tag == _PARAMETERS_FIELD << 3 | 2:
                size, entry = _varint(raw, value)
                if _is_internal(raw, entry, entry + size):
                    internal.append((start, pos))
                    continue
            if kept and kept[-1][1] == start:
                kept[-1] = (kept[-1][0], pos)
            else:
                kept.append((start, pos))
        if not internal:
            return None, raw
        view = memoryview(raw)
        parameters = b"".join(view[a:b] for a, b in internal)
        execution = read(pb.ModelInferResponse.FromString(parameters))
        return execution, b"".join(view[a:b] for a, b in kept)
    except (_Malformed, IndexError, DecodeError):
        return None, raw


def read_raw(raw: bytes) -> Execution | None:
    """:func:`read` on a serialized ModelInferResponse (:func:`split_raw`'s first
    half). None for a reply without the parameters, or one that is not parseable."""
    return split_raw(raw)[0]
