"""KServe v2 inference bodies as JSON (``data`` as flat lists), numpy only.

JSON rather than the binary tensor extension because it is the one encoding every v2
server accepts; all HTTP rows of a comparison use it, modelpool's included, so the
encoding costs the same everywhere.
https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modelpool.gpu.tensors import NUMPY_DTYPES


class BodyError(ValueError):
    """The request body does not match the model's inputs (a 400, not a 500)."""


def encode_request(arrays: Mapping[str, np.ndarray], datatypes: Mapping[str, str]) -> bytes:
    inputs = []
    for name, array in arrays.items():
        datatype = datatypes[name]
        if datatype not in NUMPY_DTYPES:
            raise ValueError(f"input {name}: datatype {datatype} has no JSON encoding here")
        inputs.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "data": array.reshape(-1).tolist(),
            }
        )
    return json.dumps({"inputs": inputs}).encode()


def decode_inputs(body: Any, wanted: Sequence[tuple[str, str]]) -> list[np.ndarray]:
    """The arrays for ``wanted`` (name, datatype) pairs, in that order."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise BodyError("body must be a JSON object with an 'inputs' list")
    given = {t.get("name"): t for t in body["inputs"] if isinstance(t, dict)}
    out = []
    for name, datatype in wanted:
        tensor = given.get(name)
        if tensor is None:
            raise BodyError(f"input '{name}' is missing")
        if tensor.get("datatype") != datatype:
            raise BodyError(f"input '{name}': datatype must be {datatype}")
        try:
            shape = [int(d) for d in tensor["shape"]]
            array = np.asarray(tensor["data"], dtype=NUMPY_DTYPES[datatype]).reshape(shape)
        except (KeyError, TypeError, ValueError) as e:
            raise BodyError(f"input '{name}': {e}") from None
        out.append(array)
    return out


def encode_response(
    model: str, outputs: Sequence[tuple[str, str]], arrays: Sequence[np.ndarray]
) -> dict[str, Any]:
    if len(outputs) != len(arrays):
        raise ValueError(f"model {model}: {len(arrays)} outputs, config names {len(outputs)}")
    return {
        "model_name": model,
        "model_version": "1",
        "outputs": [
            {"name": n, "datatype": dt, "shape": list(a.shape), "data": a.reshape(-1).tolist()}
            for (n, dt), a in zip(outputs, arrays, strict=True)
        ],
    }
