"""KServe v2 REST inference bodies <-> Triton's ModelInferRequest/Response.

Handles JSON tensors and Triton's binary tensor data extension:
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from modelpool.gpu.tensors import NUMPY_DTYPES, element_count
from modelpool.placement.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"


def parse_infer(
    model: str, version: str, body: bytes, header_length: str | None
) -> tuple[pb.ModelInferRequest, dict[str, Any]]:
    """Build a ModelInferRequest from a REST body. Returns the request and the JSON
    header (the caller needs its output parameters to render the reply)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInput(
                f"model '{model}': {HEADER_LENGTH} '{header_length}' is not a number"
            ) from None
        if n < 0 or n > len(body):
            raise InvalidInput(
                f"model '{model}': {HEADER_LENGTH} {n} does not fit the {len(body)}-byte body"
            )
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"model '{model}': request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise InvalidInput(f"model '{model}': request JSON needs an 'inputs' list")

    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if isinstance(doc.get("id"), str):
        request.id = doc["id"]
    offset = 0
    for i, t in enumerate(doc["inputs"]):
        if not isinstance(t, dict):
            raise InvalidInput(f"model '{model}': inputs[{i}] is not an object")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str):
            raise InvalidInput(f"model '{model}': inputs[{i}] has no 'name'")
        if datatype not in NUMPY_DTYPES:
            raise InvalidInput(
                f"model '{model}': input '{name}' has unsupported datatype {datatype!r}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidInput(
                f"model '{model}': input '{name}' needs 'shape' as a list of integers"
            )
        dtype = NUMPY_DTYPES[datatype]
        params = _parameters(t, model, f"input '{name}'")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"model '{model}': input '{name}' binary_data_size {size} runs past the "
                    f"{len(binary)} bytes of binary data"
                )
            raw = bytes(binary[offset : offset + size])
            offset += size
        else:
            if "data" not in t:
                raise InvalidInput(
                    f"model '{model}': input '{name}' has neither 'data' nor binary_data_size"
                )
            try:
                loose = np.asarray(t["data"])
                if loose.dtype.kind not in "biuf":
                    # Strings, nulls, nested objects: numpy would coerce some of them
                    # ("1" -> 1.0, None -> nan); the protocol wants numbers.
                    raise TypeError(f"values must be numbers (got {loose.dtype.kind!r} data)")
                array = loose.astype(dtype, casting="unsafe")
            except (ValueError, TypeError, OverflowError) as e:
                raise InvalidInput(
                    f"model '{model}': input '{name}' data is not {datatype}: {e}"
                ) from None
            if array.size != element_count(shape) or array.dtype == object:
                raise InvalidInput(
                    f"model '{model}': input '{name}' has {array.size} elements; shape {shape} "
                    f"needs {element_count(shape)}"
                )
            raw = array.tobytes()
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
        _flag(_parameters(o, model, f"output '{o['name']}'"), "binary_data", model)
        request.outputs.add(name=o["name"])
    _flag(_parameters(doc, model, "request"), "binary_data_output", model)
    return request, doc


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
        if per_output.get(out.name, binary_default):
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, dtype=NUMPY_DTYPES[out.datatype]).tolist()
        outputs.append(entry)
    head["outputs"] = outputs
    body = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return body, None
    return body + b"".join(chunks), len(body)
