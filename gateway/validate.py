"""Checks an inference request against the model's config before it reaches a worker,
so a malformed tensor costs one 400 and no device time. Messages name the model, the
tensor and the problem, and repeat at most ``clip``'s share of any client string.

Also reads the time a client gives a request (see ``client_timeout``)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from modelpool.gpu.repository import ModelSpec, TensorSpec, clip
from modelpool.gpu.tensors import (
    CONTENTS_FIELD,
    NUMPY_DTYPES,
    byte_size,
    bytes_problem,
    element_count,
    serialize_bytes,
)
from modelpool.placement.errors import InvalidInput

#: More dimensions than numpy (and so any model here) can hold. Checked before a
#: shape's element count is computed: a million 2**63 dimensions multiply for minutes.
MAX_RANK = 64
#: Triton's schedule-policy parameter: the request's timeout in microseconds, 0 none.
#: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_schedule_policy.md
TIMEOUT_PARAMETER = "timeout"
INT64_MAX = (1 << 63) - 1
_SECONDS_RE = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def shown_shape(shape: Sequence[int]) -> str:
    """A shape for a message, bounded: the first eight dimensions, each clipped (JSON
    allows a 4000-digit one)."""
    head = ", ".join(clip(int(d), 24) for d in shape[:8])
    if len(shape) <= 8:
        return f"[{head}]"
    return f"[{head}, ... ({len(shape)} dimensions)]"


def check_rank(model: str, name: str, shape: Sequence[int]) -> None:
    if len(shape) > MAX_RANK:
        raise InvalidInput(
            f"model '{model}': input '{clip(name)}' shape has {len(shape)} dimensions, "
            f"at most {MAX_RANK}"
        )


def _shape_ok(spec: ModelSpec, t: TensorSpec, shape: tuple[int, ...]) -> str | None:
    """None if ``shape`` fits; else what is wrong with it."""
    if any(d < 0 for d in shape):
        return f"shape {shown_shape(shape)} has a negative dimension"
    dims = t.dims
    if spec.max_batch_size > 0:
        if len(shape) != len(dims) + 1:
            return f"shape {shown_shape(shape)} does not match [-1 (batch)] + {list(dims)}"
        if shape[0] < 1 or shape[0] > spec.max_batch_size:
            return (
                f"batch size {clip(shape[0])} is outside 1..{spec.max_batch_size} (max_batch_size)"
            )
        rest = shape[1:]
    else:
        if len(shape) != len(dims):
            return f"shape {shown_shape(shape)} does not match {list(dims)}"
        rest = shape
    for got, want in zip(rest, dims, strict=True):
        if want != -1 and got != want:
            return f"shape {shown_shape(shape)} does not match {list(dims)} (batch dim excluded)"
    return None


def contents_to_raw(request: pb.ModelInferRequest) -> None:
    """Move gRPC typed ``contents`` into ``raw_input_contents`` in place, so workers only
    ever see raw bytes (what tritonclient sends anyway)."""
    model = clip(request.model_name)
    if request.raw_input_contents:
        if any(t.HasField("contents") for t in request.inputs):
            raise InvalidInput(f"model '{model}': inputs mix raw_input_contents and typed contents")
        return
    for t in request.inputs:
        name = clip(t.name)
        field = CONTENTS_FIELD.get(t.datatype)
        if field is None:
            # FP16 and BF16 have no typed field in Triton's proto either.
            raise InvalidInput(
                f"model '{model}': input '{name}' datatype '{clip(t.datatype)}' is not "
                "supported in typed contents (send it in raw_input_contents)"
            )
        check_rank(model, t.name, t.shape)
        if any(d < 0 for d in t.shape):
            raise InvalidInput(
                f"model '{model}': input '{name}': shape {shown_shape(t.shape)} has a "
                "negative dimension"
            )
        values = getattr(t.contents, field)
        if t.datatype == "BYTES":
            if len(values) != element_count(t.shape):
                raise InvalidInput(
                    f"model '{model}': input '{name}' has {len(values)} elements, "
                    f"shape {shown_shape(t.shape)} needs {clip(element_count(t.shape))}"
                )
            request.raw_input_contents.append(serialize_bytes(values))
            t.ClearField("contents")
            continue
        try:
            array = np.asarray(values, dtype=NUMPY_DTYPES[t.datatype])
        except (OverflowError, ValueError, TypeError) as e:
            # uint_contents carries UINT8 as uint32: 300 does not fit the datatype.
            raise InvalidInput(
                f"model '{model}': input '{name}' contents are not {t.datatype}: {e}"
            ) from None
        if array.size != element_count(t.shape):
            raise InvalidInput(
                f"model '{model}': input '{name}' has {array.size} elements, "
                f"shape {shown_shape(t.shape)} needs {clip(element_count(t.shape))}"
            )
        request.raw_input_contents.append(array.tobytes())
        t.ClearField("contents")


def validate_request(spec: ModelSpec, request: pb.ModelInferRequest) -> None:
    """Raise InvalidInput for anything the model would reject, or choke on."""
    model = spec.name
    declared = {t.name: t for t in spec.inputs}
    seen: set[str] = set()
    if len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(
            f"model '{model}': {len(request.inputs)} inputs but {len(request.raw_input_contents)} "
            "raw_input_contents"
        )
    for t, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        name = clip(t.name)
        if t.name in seen:
            raise InvalidInput(f"model '{model}': input '{name}' is given twice")
        seen.add(t.name)
        want = declared.get(t.name)
        if want is None:
            raise InvalidInput(
                f"model '{model}': unexpected input '{name}' (inputs are {', '.join(declared)})"
            )
        if t.datatype != want.datatype:
            raise InvalidInput(
                f"model '{model}': input '{name}' has datatype '{clip(t.datatype)}', "
                f"expected {want.datatype}"
            )
        shape = tuple(int(d) for d in t.shape)
        problem = _shape_ok(spec, want, shape)
        if problem:
            raise InvalidInput(f"model '{model}': input '{name}': {problem}")
        if t.datatype == "BYTES":
            problem = bytes_problem(raw, element_count(shape))
            if problem:
                raise InvalidInput(
                    f"model '{model}': input '{name}' (BYTES, shape {shown_shape(shape)}) is not "
                    f"length-prefixed as the shape needs: {problem}"
                )
            continue
        need = byte_size(t.datatype, shape)
        if len(raw) != need:
            raise InvalidInput(
                f"model '{model}': input '{name}' has {len(raw)} bytes of data; shape "
                f"{list(shape)} of {t.datatype} needs {clip(need)} "
                f"({clip(element_count(shape))} elements)"
            )
    missing = [n for n in declared if n not in seen]
    if missing:
        raise InvalidInput(
            f"model '{model}': missing input(s) {', '.join(repr(n) for n in missing)}"
        )
    if spec.max_batch_size > 0:
        batches = {int(t.shape[0]) for t in request.inputs}
        if len(batches) > 1:
            raise InvalidInput(f"model '{model}': inputs disagree on batch size {sorted(batches)}")
    outputs = {o.name for o in spec.outputs}
    for o in request.outputs:
        if o.name not in outputs:
            raise InvalidInput(
                f"model '{model}': unknown requested output '{clip(o.name)}' "
                f"(outputs are {', '.join(outputs)})"
            )


# -- client deadlines -------------------------------------------------------------------
def client_timeout(*limits: float | None) -> float | None:
    """The time the client gave a request, in seconds: the smallest of ``limits``
    (gRPC deadline, header, request parameter), None where it gave none."""
    given = [x for x in limits if x is not None]
    return min(given) if given else None


def timeout_seconds(text: str, where: str) -> float:
    """A timeout header: a positive, finite decimal number of seconds ("2", "0.25",
    "1e-1"). Raises InvalidInput naming ``where`` otherwise."""
    value = text.strip()
    seconds = float(value) if _SECONDS_RE.fullmatch(value) else math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidInput(
            f"{where} '{clip(text)}' is not a timeout: it must be a positive number of seconds"
        )
    return seconds


def timeout_microseconds(value: object, where: str) -> float | None:
    """Triton's ``timeout`` request parameter (a whole number of microseconds) in
    seconds; 0 is "no timeout", as in Triton. Raises InvalidInput naming ``where`` for
    anything but a non-negative integer (JSON's 1e6 counts as one)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise InvalidInput(
            f"{where} {clip(repr(value))} is not a timeout: it must be a whole, "
            "non-negative number of microseconds"
        )
    return value / 1e6 if value else None


def grpc_timeout_parameter(request: pb.ModelInferRequest) -> float | None:
    """Seconds from a gRPC request's ``timeout`` parameter (tritonclient's
    ``infer(timeout=...)`` sends int64_param); None when absent or 0."""
    if TIMEOUT_PARAMETER not in request.parameters:
        return None
    param = request.parameters[TIMEOUT_PARAMETER]
    kind = param.WhichOneof("parameter_choice")
    where = f"model '{clip(request.model_name)}': parameter '{TIMEOUT_PARAMETER}'"
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"{where} must be an int64_param of microseconds, not {kind or 'empty'}")
    return timeout_microseconds(getattr(param, kind), where)


def parsed_or_deferred(
    parse: Callable[[], tuple[pb.ModelInferRequest, float | None]],
) -> tuple[pb.ModelInferRequest | Callable[[], pb.ModelInferRequest], float | None]:
    """Run an edge's parser (request and client timeout). One that fails becomes a
    parser that raises the same error inside ``DataPlane.infer``, so the request is
    counted there like any other failed request."""
    try:
        return parse()
    except Exception as e:
        return raising(e), None


def raising(err: Exception) -> Callable[[], pb.ModelInferRequest]:
    """A parser for ``DataPlane.infer`` that raises ``err``: the edges parse a request
    before calling the data plane (its deadline is inside), and one that failed to
    parse must still be counted there like any other failed request."""

    def parse() -> pb.ModelInferRequest:
        raise err

    return parse
