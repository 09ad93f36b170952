"""Checks an inference request against the model's config before it reaches a worker,
so a malformed tensor costs one 400 and no device time. Messages name the model, the
tensor and the problem."""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from modelpool.gpu.repository import ModelSpec, TensorSpec
from modelpool.gpu.tensors import CONTENTS_FIELD, NUMPY_DTYPES, byte_size, element_count
from modelpool.placement.errors import InvalidInput


def _shape_ok(spec: ModelSpec, t: TensorSpec, shape: tuple[int, ...]) -> str | None:
    """None if ``shape`` fits; else what is wrong with it."""
    if any(d < 0 for d in shape):
        return f"shape {list(shape)} has a negative dimension"
    dims = t.dims
    if spec.max_batch_size > 0:
        if len(shape) != len(dims) + 1:
            return f"shape {list(shape)} does not match [-1 (batch)] + {list(dims)}"
        if shape[0] < 1 or shape[0] > spec.max_batch_size:
            return f"batch size {shape[0]} is outside 1..{spec.max_batch_size} (max_batch_size)"
        rest = shape[1:]
    else:
        if len(shape) != len(dims):
            return f"shape {list(shape)} does not match {list(dims)}"
        rest = shape
    for got, want in zip(rest, dims, strict=True):
        if want != -1 and got != want:
            return f"shape {list(shape)} does not match {list(dims)} (batch dim excluded)"
    return None


def contents_to_raw(request: pb.ModelInferRequest) -> None:
    """Move gRPC typed ``contents`` into ``raw_input_contents`` in place, so workers only
    ever see raw bytes (what tritonclient sends anyway)."""
    if request.raw_input_contents:
        if any(t.HasField("contents") for t in request.inputs):
            raise InvalidInput(
                f"model '{request.model_name}': inputs mix raw_input_contents and typed contents"
            )
        return
    for t in request.inputs:
        field = CONTENTS_FIELD.get(t.datatype)
        if field is None:
            raise InvalidInput(
                f"model '{request.model_name}': input '{t.name}' datatype '{t.datatype}' is not supported"
            )
        values = getattr(t.contents, field)
        array = np.asarray(values, dtype=NUMPY_DTYPES[t.datatype])
        if array.size != element_count(t.shape):
            raise InvalidInput(
                f"model '{request.model_name}': input '{t.name}' has {array.size} elements, "
                f"shape {list(t.shape)} needs {element_count(t.shape)}"
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
        if t.name in seen:
            raise InvalidInput(f"model '{model}': input '{t.name}' is given twice")
        seen.add(t.name)
        want = declared.get(t.name)
        if want is None:
            raise InvalidInput(
                f"model '{model}': unexpected input '{t.name}' (inputs are {', '.join(declared)})"
            )
        if t.datatype != want.datatype:
            raise InvalidInput(
                f"model '{model}': input '{t.name}' has datatype {t.datatype}, expected {want.datatype}"
            )
        shape = tuple(int(d) for d in t.shape)
        problem = _shape_ok(spec, want, shape)
        if problem:
            raise InvalidInput(f"model '{model}': input '{t.name}': {problem}")
        need = byte_size(t.datatype, shape)
        if len(raw) != need:
            raise InvalidInput(
                f"model '{model}': input '{t.name}' has {len(raw)} bytes of data; shape "
                f"{list(shape)} of {t.datatype} needs {need} ({element_count(shape)} elements)"
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
                f"model '{model}': unknown requested output '{o.name}' (outputs are {', '.join(outputs)})"
            )
