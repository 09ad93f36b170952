"""KServe v2 REST inference bodies <-> Triton's ModelInferRequest/Response.

Handles JSON tensors and Triton's binary tensor data extension:
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md

Every Triton datatype: BF16 goes over JSON as floats, BYTES as strings (UTF-8); in
binary data BF16 is its raw 16 bits and BYTES is length-prefixed (gpu/tensors.py).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from modelpool.gateway.shm import PARAMETERS as SHM_PARAMETERS
from modelpool.gateway.shm import REGION as SHM_REGION
from modelpool.gateway.shm import json_parameters as shm_parameters
from modelpool.gateway.validate import (
    INT64_MAX,
    TIMEOUT_PARAMETER,
    check_rank,
    shown_shape,
    timeout_microseconds,
)
from modelpool.gpu.repository import clip
from modelpool.gpu.tensors import (
    DATATYPES,
    NUMPY_DTYPES,
    STORAGE_DTYPES,
    bf16_from_float,
    bf16_to_float,
    deserialize_bytes,
    element_count,
    serialize_bytes,
)
from modelpool.placement.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"


def parse_infer(
    model: str, version: str, body: bytes, header_length: str | None
) -> tuple[pb.ModelInferRequest, dict[str, Any]]:
    """Build a ModelInferRequest from a REST body. Returns the request and the JSON
    header (the caller needs its output parameters to render the reply)."""
    if header_length is not None:
        # ASCII digits only: int() also takes "+1", "1_0" and other scripts' digits.
        digits = header_length.strip()
        if not (digits.isascii() and digits.isdigit()):
            raise InvalidInput(
                f"model '{model}': {HEADER_LENGTH} '{clip(header_length)}' is not a number"
            )
        # Past 20 digits it cannot fit any body, and int() refuses past 4300.
        n = int(digits) if len(digits) <= 20 else len(body) + 1
        if n > len(body):
            raise InvalidInput(
                f"model '{model}': {HEADER_LENGTH} {clip(digits)} does not fit the "
                f"{len(body)}-byte body"
            )
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    doc = _json(model, head)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InvalidInput(f"model '{model}': request JSON needs an 'inputs' list")

    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in doc:
        request.id = _text(doc["id"], model, "request 'id'")
    offset = 0
    for i, t in enumerate(doc["inputs"]):
        if not isinstance(t, dict):
            raise InvalidInput(f"model '{model}': inputs[{i}] is not an object")
        raw_name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(raw_name, str):
            raise InvalidInput(f"model '{model}': inputs[{i}] has no 'name'")
        name = _text(raw_name, model, f"inputs[{i}] 'name'")
        shown = clip(name)
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise InvalidInput(
                f"model '{model}': input '{shown}' has unsupported datatype {clip(repr(datatype))}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidInput(
                f"model '{model}': input '{shown}' needs 'shape' as a list of integers"
            )
        check_rank(model, name, shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(
                f"model '{model}': input '{shown}' shape {shown_shape(shape)} has a "
                "negative dimension"
            )
        if any(d > INT64_MAX for d in shape):
            # The protocol's dimensions are int64; protobuf would refuse the rest.
            raise InvalidInput(
                f"model '{model}': input '{shown}' shape {shown_shape(shape)} has a "
                "dimension beyond int64"
            )
        params = _parameters(t, model, f"input '{shown}'")
        if any(k in params for k in SHM_PARAMETERS):
            # In shared memory: the data plane reads it (gateway/shm.py).
            if "data" in t or "binary_data_size" in params:
                raise InvalidInput(
                    f"model '{model}': input '{shown}' is in shared memory and must not "
                    "also have 'data' or binary_data_size"
                )
            tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
            shm_parameters(params, tensor.parameters, f"model '{model}': input '{shown}'")
            continue
        size = params.get("binary_data_size")
        if size is not None:
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or size < 0
                or offset + size > len(binary)
            ):
                raise InvalidInput(
                    f"model '{model}': input '{shown}' binary_data_size {clip(repr(size))} "
                    f"runs past the {len(binary)} bytes of binary data (or is not a "
                    "whole number)"
                )
            raw = bytes(binary[offset : offset + size])
            offset += size
        else:
            if "data" not in t:
                raise InvalidInput(
                    f"model '{model}': input '{shown}' has neither 'data' nor binary_data_size"
                )
            raw = json_tensor_bytes(model, name, datatype, shape, t["data"])
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        del tensor  # shape and bytes are checked against the config by validate_request
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise InvalidInput(
            f"model '{model}': {len(binary)} bytes of binary data follow the JSON header "
            f"but the inputs' binary_data_size add up to {offset}"
        )
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidInput(f"model '{model}': 'outputs' must be a list")
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInput(f"model '{model}': outputs[{i}] needs a 'name'")
        out_name = _text(o["name"], model, f"outputs[{i}] 'name'")
        out_params = _parameters(o, model, f"output '{clip(out_name)}'")
        _flag(out_params, "binary_data", model)
        requested = request.outputs.add(name=out_name)
        shm_parameters(
            out_params, requested.parameters, f"model '{model}': output '{clip(out_name)}'"
        )
    _flag(_parameters(doc, model, "request"), "binary_data_output", model)
    return request, doc


def request_timeout(model: str, doc: dict[str, Any]) -> float | None:
    """Seconds from the request's ``parameters.timeout`` (Triton's schedule-policy
    parameter, microseconds; 0 or absent: None)."""
    params = _parameters(doc, model, "request")
    if TIMEOUT_PARAMETER not in params:
        return None
    return timeout_microseconds(
        params[TIMEOUT_PARAMETER], f"model '{model}': parameter '{TIMEOUT_PARAMETER}'"
    )


def json_tensor_bytes(
    model: str, name: str, datatype: str, shape: list[int], data: object
) -> bytes:
    """A JSON tensor's ``data`` (flat or nested as the shape) as the raw bytes
    raw_input_contents holds: numbers for the numeric datatypes (BF16 as floats,
    rounded to nearest even), strings for BYTES (UTF-8, length-prefixed)."""
    shown = clip(name)
    need = element_count(shape)
    if datatype == "BYTES":
        try:
            strings = _flat_strings(data)
        except TypeError as e:
            raise InvalidInput(f"model '{model}': input '{shown}' data is not BYTES: {e}") from None
        if len(strings) != need:
            raise InvalidInput(
                f"model '{model}': input '{shown}' has {len(strings)} elements; shape "
                f"{shown_shape(shape)} needs {clip(need)}"
            )
        items = []
        for i, text in enumerate(strings):
            try:
                items.append(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidInput(
                    f"model '{model}': input '{shown}' element {i} is not valid Unicode"
                ) from None
        return serialize_bytes(items)
    try:
        loose = np.asarray(data)
        if loose.dtype.kind not in "biuf":
            # Strings, nulls, nested objects: numpy would coerce some of them
            # ("1" -> 1.0, None -> nan); the protocol wants numbers.
            raise TypeError(f"values must be numbers (got {loose.dtype.kind!r} data)")
        if datatype == "BF16":
            array = bf16_from_float(loose.astype(np.float32, casting="unsafe"))
        elif loose.dtype.kind == "f" and NUMPY_DTYPES[datatype].kind in "iu":
            # numpy holds integers past int64 (UINT64's top half) as float64, losing
            # bits: convert from the JSON values themselves (out of range: an error).
            array = np.array(data, dtype=NUMPY_DTYPES[datatype])
        else:
            array = loose.astype(NUMPY_DTYPES[datatype], casting="unsafe")
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidInput(
            f"model '{model}': input '{shown}' data is not {datatype}: {clip(e, 200)}"
        ) from None
    if array.size != need or array.dtype == object:
        raise InvalidInput(
            f"model '{model}': input '{shown}' has {array.size} elements; shape "
            f"{shown_shape(shape)} needs {clip(need)}"
        )
    return array.tobytes()


def _flat_strings(data: object) -> list[str]:
    """The strings of a (nested) JSON list in row-major order; a lone string is one
    element. Raises TypeError naming the first thing that is not a string."""
    out: list[str] = []
    stack = [data]
    while stack:  # a loop, not recursion: nesting is as deep as the JSON parser allowed
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))
        elif isinstance(x, str):
            out.append(x)
        else:
            raise TypeError(f"elements must be strings (got {type(x).__name__})")
    return out


def json_values(datatype: str, shape: list[int], raw: bytes) -> list[Any] | None:
    """An output's raw bytes as the flat JSON ``data`` list: numbers (BF16 as floats),
    or strings for BYTES; None for BYTES that are not all UTF-8, which JSON cannot
    carry (the caller sends those as binary data instead)."""
    if datatype == "BYTES":
        try:
            return [b.decode("utf-8") for b in deserialize_bytes(raw, element_count(shape))]
        except UnicodeDecodeError:
            return None
    array = np.frombuffer(raw, dtype=STORAGE_DTYPES[datatype])
    if datatype == "BF16":
        array = bf16_to_float(array)
    return list(array.tolist())


def _json(model: str, head: bytes) -> Any:
    try:
        return json.loads(head)
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and UnicodeDecodeError; RecursionError is
        # what a few thousand nested '[' cost the parser.
        what = "nests too deeply" if isinstance(e, RecursionError) else clip(e, 200)
        raise InvalidInput(f"model '{model}': request body is not valid JSON: {what}") from None


def _text(value: object, model: str, what: str) -> str:
    """A string the protobuf request can hold: JSON lets "\ud800" (a lone surrogate)
    through, which has no UTF-8 form."""
    if not isinstance(value, str):
        raise InvalidInput(f"model '{model}': {what} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"model '{model}': {what} is not valid Unicode") from None
    return value


def _parameters(obj: dict[str, Any], model: str, what: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"model '{model}': {what} 'parameters' must be an object")
    return params


def _flag(params: dict[str, Any], key: str, model: str) -> None:
    if key in params and not isinstance(params[key], bool):
        raise InvalidInput(f"model '{model}': parameter '{key}' must be true or false")


def render_infer(response: pb.ModelInferResponse, doc: dict[str, Any]) -> tuple[bytes, int | None]:
    """The REST reply body, and the JSON header's length when binary data follows."""
    # parse_infer checked the shapes of these parameters.
    binary_default = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    per_output = {
        o["name"]: bool((o.get("parameters") or {}).get("binary_data", binary_default))
        for o in (doc.get("outputs") or [])
    }
    head: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        head["id"] = response.id
    outputs = []
    chunks: list[bytes] = []
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.shape),
        }
        if SHM_REGION in out.parameters:
            # Written to shared memory (gateway/shm.py): no data, as in Triton.
            entry["parameters"] = {
                k: out.parameters[k].string_param or out.parameters[k].int64_param
                for k in SHM_PARAMETERS
                if k in out.parameters
            }
            outputs.append(entry)
            continue
        values = (
            None
            if per_output.get(out.name, binary_default)
            else json_values(out.datatype, list(out.shape), raw)
        )
        if values is None:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = values
        outputs.append(entry)
    head["outputs"] = outputs
    body = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return body, None
    return body + b"".join(chunks), len(body)
