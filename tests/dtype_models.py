"""A model repository with one identity TorchScript model per Triton datatype, plus a
small "tokenizer" (BYTES in, INT64 and BYTES out), and sample values for each datatype
that reach the edges of its range (for tests/test_datatypes.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List  # noqa: UP035 - TorchScript's annotation

import ml_dtypes
import numpy as np
import torch

#: Every datatype Triton lists (docs/protocol: tensor data types).
DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
)  # fmt: skip
MAX_BATCH = 4

_CONFIG = """name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: {max_batch}
input {{ name: "x" data_type: {type} dims: [ {dims} ] }}
output {{ name: "y" data_type: {type} dims: [ {dims} ] }}
"""

_TOKENIZER_CONFIG = """name: "tokenizer"
platform: "pytorch_libtorch"
max_batch_size: {max_batch}
dynamic_batching {{ }}
input {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }}
output {{ name: "lengths" data_type: TYPE_INT64 dims: [ 1 ] }}
output {{ name: "upper" data_type: TYPE_STRING dims: [ 1 ] }}
"""


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class StringIdentity(torch.nn.Module):
    def forward(self, x: List[str]) -> List[str]:  # noqa: UP006
        return [s for s in x]


class Tokenizer(torch.nn.Module):
    """Text models' usual shape, [batch, 1] strings: per string its length (TorchScript
    counts UTF-8 bytes) and the string upper-cased (ASCII letters only, in TorchScript)."""

    def forward(self, text: List[str]) -> tuple[torch.Tensor, List[str]]:  # noqa: UP006
        lengths = torch.tensor([len(s) for s in text], dtype=torch.int64).reshape(-1, 1)
        upper: List[str] = []  # noqa: UP006
        for s in text:
            upper.append(s.upper())
        return lengths, upper


def model_name(datatype: str) -> str:
    return f"id_{datatype.lower()}"


def write_datatype_repo(repo: Path) -> Path:
    """One identity model per datatype (``id_<datatype>``), x -> y, dims [3] (BYTES:
    [-1], shape inferred on the way out), max_batch_size 4; and ``tokenizer``
    (``text`` [batch, 1] BYTES -> ``lengths`` INT64, ``upper`` BYTES; dynamic batching
    on, which BYTES models run without)."""
    for datatype in DATATYPES:
        name = model_name(datatype)
        d = repo / name
        (d / "1").mkdir(parents=True, exist_ok=True)
        module = StringIdentity() if datatype == "BYTES" else Identity()
        torch.jit.save(torch.jit.script(module), str(d / "1" / "model.pt"))
        config_type = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
        dims = "-1" if datatype == "BYTES" else "3"
        (d / "config.pbtxt").write_text(
            _CONFIG.format(name=name, max_batch=MAX_BATCH, type=config_type, dims=dims)
        )
    d = repo / "tokenizer"
    (d / "1").mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Tokenizer()), str(d / "1" / "model.pt"))
    (d / "config.pbtxt").write_text(_TOKENIZER_CONFIG.format(max_batch=MAX_BATCH))
    return repo


def sample(datatype: str) -> np.ndarray:
    """A [2, 3] array of ``datatype`` as tritonclient takes it (BF16: ml_dtypes,
    BYTES: object array of bytes), with each type's extremes in it."""
    if datatype == "BYTES":
        rows = [["", "héllo wörld", "a\x00b"], ["tab\there", "🙂" * 3, "x" * 300]]
        return np.array([[s.encode("utf-8") for s in r] for r in rows], dtype=np.object_)
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BF16":
        # All exactly representable in bfloat16 (8 bits of mantissa).
        values = [[1.5, -2.0, 3.140625], [0.0, -1.0e30, 65536.0]]
        return np.array(values, dtype=np.float32).astype(ml_dtypes.bfloat16)
    dtype = np.dtype(datatype.lower().replace("fp", "float"))
    if dtype.kind == "f":
        info = np.finfo(dtype)
        return np.array([[0.5, -2.25, float(info.max)], [float(info.tiny), -0.0, 1.0]], dtype=dtype)
    iinfo = np.iinfo(dtype)
    return np.array([[iinfo.min, iinfo.max, 1], [0, iinfo.max - 1, 7]], dtype=dtype)


def json_data(array: np.ndarray) -> list:
    """The flat JSON ``data`` list for ``array``: numbers (BF16 as float) or strings."""
    if array.dtype == np.object_:
        return [b.decode("utf-8") for b in array.flatten()]
    if array.dtype == ml_dtypes.bfloat16:
        return array.astype(np.float32).flatten().tolist()
    return array.flatten().tolist()
