"""KServe v2 tensor datatypes, their numpy forms and their wire encodings.

https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md#tensor-data-types

Two datatypes have no plain numpy form:

- BF16 travels as its raw 16 bits; numpy (without ml_dtypes) has no bfloat16, so
  the gateway holds it as uint16 (``STORAGE_DTYPES``) and converts to and from
  float32 by bit arithmetic (``bf16_from_float``, ``bf16_to_float``).
- BYTES is variable length: each element is a 4-byte little-endian length and then
  that many bytes, back to back (tritonclient's ``serialize_byte_tensor``), in
  raw_input_contents, raw_output_contents and the binary data extension alike.

This module needs numpy only: the gateway imports it without torch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np

#: Wire datatype -> numpy dtype (little-endian, as the protocol's raw bytes are), for
#: the datatypes numpy holds natively. BF16 and BYTES are not here: see the module doc.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

#: Every fixed-size datatype -> the numpy dtype its raw bytes are read as. BF16's
#: bits are read as uint16: never compute on them, convert with ``bf16_to_float``.
STORAGE_DTYPES: dict[str, np.dtype] = {**NUMPY_DTYPES, "BF16": np.dtype("<u2")}

#: Every datatype Triton lists, which is every datatype modelpool serves.
DATATYPES: frozenset[str] = frozenset(STORAGE_DTYPES) | {"BYTES"}

#: Which typed ``InferTensorContents`` field carries each datatype in gRPC. FP16 and
#: BF16 have none (as in Triton): they travel in raw_input_contents only.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")


class TensorFormatError(ValueError):
    """Raw bytes that do not hold the tensor they claim to. The message says what is
    wrong, without the model or tensor name: callers add those."""


class StringTensor(list[str]):
    """A BYTES tensor as a TorchScript model takes it: ``List[str]``, every element in
    row-major order (batch included), plus the shape it had on the wire, which the
    list cannot carry (code that asks a model argument for ``shape[0]`` still can)."""

    def __init__(self, items: Iterable[str], shape: Sequence[int]) -> None:
        super().__init__(items)
        self.shape = tuple(int(d) for d in shape)


def element_count(shape: tuple[int, ...] | list[int] | Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def item_size(datatype: str) -> int | None:
    """Bytes per element; None for BYTES (variable length) and unknown datatypes."""
    dtype = STORAGE_DTYPES.get(datatype)
    return None if dtype is None else dtype.itemsize


def byte_size(datatype: str, shape: tuple[int, ...] | list[int] | Sequence[int]) -> int:
    """Raw bytes of a fixed-size tensor. BYTES has no size from its shape alone: check
    it with ``bytes_problem``."""
    size = item_size(datatype)
    if size is None:
        raise ValueError(f"datatype {datatype} has no fixed size")
    return element_count(shape) * size


# -- BYTES ------------------------------------------------------------------------------
def serialize_bytes(items: Iterable[bytes]) -> bytes:
    """Length-prefixed elements, as tritonclient's ``serialize_byte_tensor`` writes."""
    parts: list[bytes] = []
    for item in items:
        parts.append(_LENGTH.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def bytes_problem(raw: bytes | memoryview, count: int) -> str | None:
    """None if ``raw`` is exactly ``count`` length-prefixed elements; else what is wrong,
    for a message. Copies nothing."""
    size = len(raw)
    if count * _LENGTH.size > size:
        # Before walking: a shape of 2**40 elements must not cost a 2**40-step loop.
        return (
            f"{size} bytes cannot hold {count} length-prefixed elements "
            f"(each needs at least {_LENGTH.size} bytes)"
        )
    offset = 0
    for i in range(count):
        if offset + _LENGTH.size > size:
            return (
                f"element {i} of {count} needs a {_LENGTH.size}-byte length prefix at byte "
                f"{offset}; the data ends at byte {size}"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > size:
            return (
                f"element {i} of {count} has length prefix {length} at byte "
                f"{offset - _LENGTH.size}, but only {size - offset} bytes follow it"
            )
        offset += length
    if offset != size:
        return f"{size - offset} bytes follow the last of its {count} length-prefixed elements"
    return None


def deserialize_bytes(raw: bytes | memoryview, count: int) -> list[bytes]:
    """The ``count`` elements of a length-prefixed BYTES tensor. Raises
    TensorFormatError saying what is wrong when ``raw`` is not exactly that."""
    problem = bytes_problem(raw, count)
    if problem is not None:
        raise TensorFormatError(problem)
    view = memoryview(raw)
    items: list[bytes] = []
    offset = 0
    for _ in range(count):
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


# -- BF16 -------------------------------------------------------------------------------
def bf16_to_float(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) as float32: exact, bfloat16 is float32's top half."""
    return (np.asarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")


def bf16_from_float(values: np.ndarray) -> np.ndarray:
    """float32 values as BF16 bit patterns (uint16), rounded to nearest even as torch's
    ``.to(torch.bfloat16)`` does; NaN stays a (quiet) NaN."""
    f = np.ascontiguousarray(values, dtype="<f4")
    bits = f.view("<u4")
    # Adding 0x7FFF plus the kept part's lowest bit rounds half to even; uint32
    # arithmetic, so a carry out of the mantissa rolls into the exponent as it should.
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype("<u2")
    # NaN payloads near the top would round into infinity or wrap: keep the sign, quiet NaN.
    nan = np.isnan(f)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) & np.uint32(0x8000)).astype("<u2") | np.uint16(0x7FC0)
    return rounded
