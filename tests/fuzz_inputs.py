"""Seeded generators of malformed inference requests, for the bad-input fuzz.

Case ``i`` of a run depends only on ``(protocol, seed, i)`` (``random.Random`` seeded
with a string is the same on every machine and run), so a failure report's index is
enough to rebuild the exact request: ``rest_case(seed, i)`` / ``grpc_case(seed, i)``.

Each case starts from a valid request for one of ``MODELS`` and applies a few
mutations, named in ``Case.note`` in the order applied: names, versions, shapes (any
int64, negative, beyond int64, thousands of dimensions), datatypes, data lengths, JSON
structure, binary header lengths, parameters, headers, and raw bytes.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from tritonclient.grpc import service_pb2 as pb


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    dims: tuple[int, ...]  # -1: any


@dataclass(frozen=True)
class Model:
    name: str
    max_batch: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...]


#: The models of the fuzz repository (see ``fuzz_repo`` in test_bad_input.py).
MODELS = (
    Model("mlp_00_2mb", 32, (Tensor("input", "FP32", (64,)),), ("output",)),
    Model("embed_01_4mb", 16, (Tensor("token_ids", "INT64", (16,)),), ("embedding",)),
    Model("crashy", 8, (Tensor("x", "FP32", (4,)),), ("y",)),
    Model("dyn", 8, (Tensor("x", "FP32", (-1,)),), ("y",)),
    Model("nobatch", 0, (Tensor("x", "FP32", (2, -1)),), ("y",)),
    Model("corrupt", 8, (Tensor("x", "FP32", (4,)),), ("y",)),
    Model("badconfig", 8, (Tensor("x", "FP32", (4,)),), ("y",)),
)
#: How often each model is the starting point: mostly the well-behaved ones.
WEIGHTS = (6, 2, 1, 2, 2, 1, 1)

ITEMSIZE = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2,
    "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8,
}  # fmt: skip
DATATYPES = (*ITEMSIZE, "BYTES", "", "fp32", "FP32 ", "FLOAT", "INT128", "FP8", "\0", "é")
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
INTERESTING_INTS = (
    0, 1, -1, 2, 7, 32, 33, 64, 65, 255, 256, 1 << 31, (1 << 31) - 1, 1 << 32, -(1 << 31),
    1 << 53, INT64_MAX, INT64_MIN, INT64_MAX - 1, 1 << 62, -(1 << 62),
)  # fmt: skip
BEYOND_INT64 = (1 << 63, 1 << 64, -(1 << 63) - 1, 10**30, -(10**30), 10**400)
TIMEOUT_HEADER = "Modelpool-Timeout"
#: The longest valid client timeout the fuzz sends (about 31 years, in microseconds).
#: Longer ones, up to int64's 292,000 years, are valid too but get a 504 today: the
#: gateway hands them to grpc as the worker call's timeout, and grpc treats one past
#: about 4.4e9 s as already expired. test_bad_input.py pins that with a strict xfail.
LONGEST_TIMEOUT_US = 10**15
HEADER_LENGTH = "Inference-Header-Content-Length"
SERVICE = "/inference.GRPCInferenceService/"


@dataclass
class Case:
    """One request. REST: ``method``, ``path`` (already percent-encoded), ``headers``,
    ``body``. gRPC: ``method`` (the RPC), ``body`` (the serialized request) and
    ``timeout_s`` (the client deadline, None for none)."""

    index: int
    method: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    note: list[str] = field(default_factory=list)

    def describe(self) -> str:
        body = self.body[:300]
        return (
            f"case {self.index}: {self.method} {self.path[:200]} headers={self.headers} "
            f"mutations={self.note} body[:300]={body!r} ({len(self.body)} bytes)"
        )


# -- shared pieces ------------------------------------------------------------------------
def _model(rng: random.Random) -> Model:
    return rng.choices(MODELS, WEIGHTS)[0]


def _shape(rng: random.Random, model: Model, t: Tensor, batch: int) -> list[int]:
    dims = [d if d >= 0 else rng.choice((0, 1, 3, 5)) for d in t.dims]
    return ([batch] if model.max_batch > 0 else []) + dims


def _count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_POOLS: dict[str, tuple[Any, ...]] = {
    "FP32": (0.0, 1.5, -2.25, 0.125, 3.0, -0.5, 1e-3, 7.75),
    "INT64": (0, 1, 5, -3, INT64_MAX, INT64_MIN),
}


def _values(rng: random.Random, datatype: str, n: int) -> list[Any]:
    return rng.choices(_POOLS[datatype], k=n)


def _batch(rng: random.Random, model: Model) -> int:
    """Mostly small batches (cheap to build and run), sometimes the largest."""
    if not model.max_batch:
        return 1
    return min(model.max_batch, rng.choice((1, 1, 2, 3, model.max_batch)))


def _pack(datatype: str, values: list[Any]) -> bytes:
    fmt = {
        "FP32": "f", "FP64": "d", "FP16": "e", "INT64": "q", "INT32": "i", "INT16": "h",
        "INT8": "b", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "BOOL": "?",
    }[datatype]  # fmt: skip
    return struct.pack(f"<{len(values)}{fmt}", *values)


def bad_name(rng: random.Random) -> str:
    """A model (or tensor) name a repository cannot hold, or one it does not hold."""
    choices: list[Callable[[], str]] = [
        lambda: "a" * rng.choice((255, 256, 1000, 5000, 20000)),
        lambda: rng.choice((".", "..", "...", "../mlp_00_2mb", "a/../b", "/etc/passwd")),
        lambda: rng.choice(("a..b", ".hidden", "-", "_", "a b", "mlp_00_2mb\n", "MLP_00_2MB")),
        lambda: rng.choice(("é", "模型", "\u202e", "\ufeffmlp", "mlp\u200b", "\U0001f600")),
        lambda: "mlp_00_2mb" + rng.choice(("\0", "/", "\\", "%", "?", "#", "\t", "\x7f")),
        lambda: "".join(chr(rng.randrange(0, 0x250)) for _ in range(rng.randrange(1, 20))),
        lambda: rng.choice(("stats", "ready", "config", "infer", "versions", "nope", "0")),
        lambda: "",
    ]
    return rng.choice(choices)()


def bad_version(rng: random.Random) -> str:
    return rng.choice(
        (
            "0", "2", "7", "-1", "+1", " 1", "1 ", "1.0", "1e3", "01", "x", "\u0661", "1_0",
            "9" * 19, "9" * 20, "9" * 5000, str(INT64_MAX), str(1 << 64), "\0", "%", "é", "",
        )
    )  # fmt: skip


def bad_shape(rng: random.Random, shape: list[Any]) -> list[Any]:
    """``shape`` (perhaps already mutated) made wrong in one of ten ways."""
    good = [d for d in shape if isinstance(d, int) and not isinstance(d, bool)]
    kind = rng.randrange(10)
    if kind == 0:
        return [rng.choice(INTERESTING_INTS) for _ in range(rng.randrange(0, 5))]
    if kind == 1:
        shape = list(good)
        if shape:
            shape[rng.randrange(len(shape))] = rng.choice(BEYOND_INT64)
        return shape or [rng.choice(BEYOND_INT64)]
    if kind == 2:
        return [rng.choice((INT64_MAX, 1 << 32, 1 << 40))] * rng.randrange(2, 9)  # overflow
    if kind == 3:
        return [1] * rng.choice((65, 100, 3000)) + good  # very many dimensions
    if kind == 4:
        return [INT64_MAX] * rng.choice((65, 2000))  # many huge dimensions
    if kind == 5:
        shape = list(good)
        if shape:
            shape[rng.randrange(len(shape))] = rng.choice((-1, -2, INT64_MIN, 0))
        return shape
    if kind == 6:
        return [*good, 1] if rng.random() < 0.5 else good[:-1]
    if kind == 7:
        return [rng.choice((1.0, 1.5, "1", None, True, [1], {})) for _ in good] or [1.5]
    if kind == 8:
        return [0, *good[1:]]
    return [d + rng.choice((-1, 1)) for d in good]


# -- REST ---------------------------------------------------------------------------------
def rest_case(seed: int, index: int) -> Case:
    """Request ``index`` of REST run ``seed``."""
    rng = random.Random(f"rest:{seed}:{index}")
    model = _model(rng)
    note: list[str] = [model.name]
    batch = _batch(rng, model)
    binary = rng.random() < 0.35
    doc: dict[str, Any] = {"inputs": []}
    blob = b""
    for t in model.inputs:
        shape = _shape(rng, model, t, batch)
        values = _values(rng, t.datatype, _count(shape))
        entry: dict[str, Any] = {"name": t.name, "shape": shape, "datatype": t.datatype}
        if binary:
            raw = _pack(t.datatype, values)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blob += raw
        else:
            entry["data"] = values
        doc["inputs"].append(entry)
    if rng.random() < 0.3:
        doc["outputs"] = [{"name": o} for o in model.outputs]
        if rng.random() < 0.5:
            doc["outputs"][0]["parameters"] = {"binary_data": True}
    if rng.random() < 0.2:
        doc["id"] = f"req-{index}"
    name, version = model.name, None
    headers: dict[str, str] = {}
    endpoint = "infer"
    raw_text: str | None = None
    n_mutations = rng.choices((0, 1, 2, 3), (1, 5, 3, 1))[0]
    for _ in range(n_mutations):
        what = rng.choices(
            ("name", "version", "endpoint", "doc", "text", "header", "timeout"),
            (3, 2, 1, 8, 2, 2, 2),
        )[0]
        if what == "name":
            name = bad_name(rng)
            note.append(f"name={name[:40]!r}/{len(name)}")
        elif what == "version":
            version = bad_version(rng)
            note.append(f"version={version[:30]!r}/{len(version)}")
        elif what == "endpoint":
            endpoint = rng.choice(
                ("metadata", "ready", "config", "stats", "load", "unload", "index")
            )
            note.append(f"endpoint={endpoint}")
        elif what == "doc":
            note.append(_mutate_doc(rng, doc, model))
        elif what == "text":
            n = rng.choices((50, 1000, 5000, 200_000), (4, 4, 4, 1))[0]
            raw_text = json.dumps({"inputs": "__DEEP__"}).replace('"__DEEP__"', "[" * n + "]" * n)
            if rng.random() < 0.5:
                raw_text = raw_text.replace("]", "", 1)  # and unbalanced
            note.append(f"deep json {n}")
        elif what == "header":
            key, value = rng.choice(
                (
                    ("Content-Type", "application/json; charset=no-such-charset"),
                    ("Content-Type", "text/plain; charset=utf-16"),
                    ("Content-Type", "multipart/form-data; boundary=x"),
                    ("Content-Encoding", "gzip"),
                    ("Content-Encoding", "deflate"),
                    ("Content-Encoding", "br"),
                    ("Content-Encoding", "x-unknown"),
                    ("Expect", "100-continue"),
                    (HEADER_LENGTH, rng.choice(("", "abc", "-1", "+5", "1_0", "٣", "1e3"))),
                    ("Accept", "application/x-protobuf"),
                )
            )
            headers[key] = value
            note.append(f"header {key}={value!r}")
        else:
            _timeout(rng, doc, headers, note)

    body = (raw_text or json.dumps(doc, allow_nan=True)).encode()
    if binary and raw_text is None:
        header_length = len(body)
        body += blob
        kind = rng.random()
        if kind < 0.25:
            header_length += rng.choice((-1, 1, -len(body), len(body) + 1, 10**30, -(10**20)))
            note.append("header length off")
        elif kind < 0.4:
            cut = rng.randrange(0, max(1, len(blob)))
            body = body[: len(body) - cut]
            note.append(f"binary truncated by {cut}")
        elif kind < 0.45:
            body += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            note.append("binary extended")
        headers.setdefault(HEADER_LENGTH, str(header_length))
    if rng.random() < 0.1:
        body = _corrupt(rng, body, note)
    if rng.random() < 0.003:
        body = b'{"inputs": [' + b" " * (2 << 20) + b"]}"  # over the 1 MiB limit
        note.append("oversized body")
    return Case(index, *_rest_route(endpoint, name, version, body), headers=headers, note=note)


def _rest_route(
    endpoint: str, name: str, version: str | None, body: bytes
) -> tuple[str, str, bytes]:
    model = quote(name, safe="") if name else ""
    base = f"/v2/models/{model}" + (f"/versions/{quote(version, safe='')}" if version else "")
    if endpoint == "infer":
        return "POST", base + "/infer", body
    if endpoint in ("ready", "config", "stats"):
        return "GET", f"{base}/{endpoint}", b""
    if endpoint == "metadata":
        return "GET", base, b""
    if endpoint == "index":
        return "POST", "/v2/repository/index", body
    # Load and unload only names the repository cannot hold: a real load or unload of a
    # served model would make the rest of the run cold.
    if name in {m.name for m in MODELS}:
        name = name + "..x"
    return "POST", f"/v2/repository/models/{quote(name, safe='')}/{endpoint}", b""


def _timeout(
    rng: random.Random, doc: dict[str, Any], headers: dict[str, str], note: list[str]
) -> None:
    """A client deadline: generous (the request must still succeed) or malformed."""
    if rng.random() < 0.5:
        value = rng.choice(
            ("30", "120.5", "1e2", " 60 ", "", "0", "-1", "nan", "NaN", "inf", "-inf", "1e999",
             "abc", "1,5", "0x10", "\uff11", "30s", "1_0", "+5", "--1", "9" * 400)
        )  # fmt: skip
        headers[TIMEOUT_HEADER] = value
        note.append(f"{TIMEOUT_HEADER}={value[:20]!r}")
    else:
        value2 = rng.choice(
            (60_000_000, 0, -1, INT64_MIN, LONGEST_TIMEOUT_US, 1 << 64, 1.5, 3e7, float("nan"),
             float("inf"), "30", True, None, [1], {"a": 1})
        )  # fmt: skip
        params = doc.setdefault("parameters", {})
        if isinstance(params, dict):
            params["timeout"] = value2
        note.append(f"parameters.timeout={value2!r}")


def _mutate_doc(rng: random.Random, doc: dict[str, Any], model: Model) -> str:
    inputs = doc.get("inputs")
    tensor = rng.choice(inputs) if isinstance(inputs, list) and inputs else None
    kind = rng.randrange(22)
    if kind == 0 or tensor is None or not isinstance(tensor, dict):
        doc["inputs"] = rng.choice(([], None, "x", 5, {}, [None], [[]], ["input"], [{}]))
        return f"inputs={doc['inputs']!r}"
    if kind == 1:
        tensor["name"] = rng.choice((bad_name(rng), 5, None, "", ["input"], "\ud800"))
        return "input name"
    if kind == 2:
        tensor["datatype"] = rng.choice((*DATATYPES, None, 7, ["FP32"]))
        return f"datatype={tensor['datatype']!r}"
    if kind in (3, 4, 5):
        tensor["shape"] = bad_shape(rng, list(tensor.get("shape") or []))
        return f"shape={str(tensor['shape'])[:60]}/{len(tensor['shape'])}"
    if kind == 6:
        data = tensor.get("data")
        if isinstance(data, list):
            cut = rng.choice((0, 1, len(data) // 2, len(data) + 1))
            tensor["data"] = data[:cut] if cut <= len(data) else [*data, 0]
            return f"data length {len(tensor['data'])}"
        tensor["data"] = [0] * 3
        return "data beside binary"
    if kind == 7:
        tensor["data"] = rng.choice(
            (
                "abc", None, {}, [[1, 2], [3]], [None] * 4, ["1"] * 4, [1e308 * 10] * 4,
                [float("nan")] * 4, [10**30] * 4, [True] * 4, [[[[1]]]], [{}], 7,
                [1 << 64] * 64, [-(1 << 63)] * 64,
            )
        )  # fmt: skip
        return f"data={str(tensor['data'])[:40]}"
    if kind == 8:
        tensor["parameters"] = rng.choice(
            (
                {"binary_data_size": rng.choice((-1, 0, 1, 1 << 62, 10**30, True, "4", 1.5, None))},
                "x",
                [],
                None,
                {"shared_memory_region": "r"},
                {"binary_data_size": 256, "x": 1},
            )
        )
        return f"input parameters={tensor['parameters']!r}"
    if kind == 9:
        doc["inputs"] = [*inputs, dict(tensor)]
        return "input twice"
    if kind == 10:
        doc["inputs"] = [*inputs, {"name": "extra", "shape": [1], "datatype": "FP32", "data": [1]}]
        return "extra input"
    if kind == 11:
        doc["inputs"] = inputs[1:]
        return "input dropped"
    if kind == 12:
        doc["outputs"] = rng.choice(
            (
                [{"name": "nope"}], "x", {}, [None], [{"name": 5}], [{}],
                [{"name": model.outputs[0], "parameters": {"binary_data": "yes"}}],
                [{"name": model.outputs[0], "parameters": []}],
                [{"name": model.outputs[0]}, {"name": model.outputs[0]}],
                [{"name": model.outputs[0], "parameters": {"classification": 3}}],
                [{"name": "\ud800"}], [{"name": "o" * 5000}],
            )
        )  # fmt: skip
        return f"outputs={str(doc['outputs'])[:40]}"
    if kind == 13:
        doc["parameters"] = rng.choice(
            (
                "x", [], {"binary_data_output": "true"}, {"binary_data_output": True},
                {"priority": -1}, {"sequence_id": 1 << 70}, {"": None}, None,
            )
        )  # fmt: skip
        return f"parameters={doc['parameters']!r}"
    if kind == 14:
        doc["id"] = rng.choice((5, None, [], "\ud800", "x" * 20_000, "\0", "é"))
        return f"id={str(doc['id'])[:20]}"
    if kind == 15:
        tensor.pop(rng.choice(("name", "datatype", "shape", "data")), None)
        return "field dropped"
    if kind == 16:
        tensor["name"] = "x" * rng.choice((256, 20_000))
        return "long input name"
    if kind == 17:
        tensor["datatype"] = "FP32" * rng.choice((100, 5000))
        return "long datatype"
    if kind == 18:
        doc.clear()
        doc.update(rng.choice(({}, {"inputs": inputs, "inputs2": []}, {"INPUTS": inputs})))
        return "document reshaped"
    if kind == 19:
        tensor["shape"] = [
            rng.choice(INTERESTING_INTS) for _ in range(len(tensor.get("shape") or []))
        ]
        return f"shape={tensor['shape']}"
    if kind == 20:
        rest = list(tensor.get("shape") or [0])[1:]
        tensor["shape"] = [rng.choice((1, 2, 3, 4, 8, 16, 32, 64, 65)), *rest]
        return f"batch={tensor['shape'][0]}"
    tensor["data"] = [[0.5] * 64] * rng.choice((1, 2, 40))
    return "nested data"


def _truncate_or_flip(rng: random.Random, kind: int, body: bytes, note: list[str]) -> bytes | None:
    """Kinds 0 and 1 of both corrupters: cut the body short, or flip a few bytes."""
    if kind == 0 and body:
        cut = rng.randrange(len(body))
        note.append(f"truncated at {cut}")
        return body[:cut]
    if kind == 1 and body:
        b = bytearray(body)
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        note.append("bytes flipped")
        return bytes(b)
    return None


def _corrupt(rng: random.Random, body: bytes, note: list[str]) -> bytes:
    kind = rng.randrange(6)
    damaged = _truncate_or_flip(rng, kind, body, note)
    if damaged is not None:
        return damaged
    if kind == 2:
        note.append("empty body")
        return b""
    if kind == 3:
        note.append("invalid utf-8")
        return body.replace(b'"input', b'"\xff\xfeinput', 1) + b"\xc3"
    if kind == 4:
        note.append("random bytes")
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    note.append("utf-16 body")
    return body.decode("latin-1").encode("utf-16")


# -- gRPC ---------------------------------------------------------------------------------
#: RPCs other than ModelInfer that take a model name, and their request types.
NAMED_RPCS: dict[str, Callable[[str, str], Any]] = {
    "ModelMetadata": lambda n, v: pb.ModelMetadataRequest(name=n, version=v),
    "ModelReady": lambda n, v: pb.ModelReadyRequest(name=n, version=v),
    "ModelConfig": lambda n, v: pb.ModelConfigRequest(name=n, version=v),
    "ModelStatistics": lambda n, v: pb.ModelStatisticsRequest(name=n, version=v),
    "RepositoryModelLoad": lambda n, v: pb.RepositoryModelLoadRequest(model_name=n),
    "RepositoryModelUnload": lambda n, v: pb.RepositoryModelUnloadRequest(model_name=n),
}


def grpc_case(seed: int, index: int) -> Case:
    """Request ``index`` of gRPC run ``seed``."""
    rng = random.Random(f"grpc:{seed}:{index}")
    timeout_s = None if rng.random() < 0.2 else 60.0
    if rng.random() < 0.08:
        return _grpc_named(rng, index, timeout_s)
    model = _model(rng)
    note: list[str] = [model.name]
    batch = _batch(rng, model)
    req = pb.ModelInferRequest(model_name=model.name)
    typed = rng.random() < 0.25
    for t in model.inputs:
        shape = _shape(rng, model, t, batch)
        values = _values(rng, t.datatype, _count(shape))
        tensor = req.inputs.add(name=t.name, datatype=t.datatype, shape=shape)
        if typed:
            field_name = "fp32_contents" if t.datatype == "FP32" else "int64_contents"
            getattr(tensor.contents, field_name).extend(values)
        else:
            req.raw_input_contents.append(_pack(t.datatype, values))
    if rng.random() < 0.3:
        for o in model.outputs:
            req.outputs.add(name=o)
    if rng.random() < 0.2:
        req.id = f"req-{index}"
    n_mutations = rng.choices((0, 1, 2, 3), (1, 5, 3, 1))[0]
    for _ in range(n_mutations):
        note.append(_mutate_proto(rng, req, model))
    body = req.SerializeToString()
    if rng.random() < 0.12:
        body = _corrupt_proto(rng, body, note)
    return Case(index, "ModelInfer", "", body, timeout_s=timeout_s, note=note)


def _grpc_named(rng: random.Random, index: int, timeout_s: float | None) -> Case:
    rpc = rng.choice(sorted(NAMED_RPCS))
    name = bad_name(rng) if rng.random() < 0.7 else _model(rng).name
    version = bad_version(rng) if rng.random() < 0.5 else ""
    if rpc.startswith("Repository") and name in {m.name for m in MODELS}:
        name += "..x"  # never a real load or unload: see _rest_route
    body = NAMED_RPCS[rpc](name, version).SerializeToString()
    note = [rpc, f"name={name[:40]!r}/{len(name)}", f"version={version[:20]!r}"]
    if rng.random() < 0.3:
        body = _corrupt_proto(rng, body, note)
    return Case(index, rpc, "", body, timeout_s=timeout_s, note=note)


def _mutate_proto(rng: random.Random, req: pb.ModelInferRequest, model: Model) -> str:
    kind = rng.randrange(20)
    t = rng.choice(req.inputs) if req.inputs else None
    if kind == 0:
        req.model_name = bad_name(rng)
        return f"model_name={req.model_name[:40]!r}/{len(req.model_name)}"
    if kind == 1:
        req.model_version = bad_version(rng)
        return f"model_version={req.model_version[:20]!r}"
    if t is None or kind == 2:
        req.ClearField("inputs")
        return "no inputs"
    if kind in (3, 4, 5):
        shape = [
            d
            for d in bad_shape(rng, list(t.shape))
            if isinstance(d, int) and not isinstance(d, bool)
        ]
        t.ClearField("shape")
        t.shape.extend(max(INT64_MIN, min(INT64_MAX, d)) for d in shape)
        return f"shape={list(t.shape)[:8]}/{len(t.shape)}"
    if kind == 6:
        t.datatype = rng.choice(DATATYPES)
        return f"datatype={t.datatype!r}"
    if kind == 7:
        t.name = rng.choice((bad_name(rng), "", "extra", "x" * 20_000))
        return f"input name {t.name[:20]!r}/{len(t.name)}"
    if kind == 8 and req.raw_input_contents:
        i = rng.randrange(len(req.raw_input_contents))
        raw = req.raw_input_contents[i]
        cut = rng.choice((0, 1, len(raw) // 2, len(raw) + 1, len(raw) + 4))
        req.raw_input_contents[i] = raw[:cut] if cut <= len(raw) else raw + b"\0" * (cut - len(raw))
        return f"raw length {len(req.raw_input_contents[i])}"
    if kind == 9:
        req.raw_input_contents.append(b"\0" * rng.choice((0, 4, 256)))
        return "extra raw contents"
    if kind == 10 and req.raw_input_contents:
        del req.raw_input_contents[-1]
        return "raw contents dropped"
    if kind == 11:
        # Typed contents of the wrong field, out-of-range values, or beside raw bytes.
        t.datatype = rng.choice(
            ("UINT8", "INT8", "UINT16", "INT16", "BOOL", "FP16", "BYTES", t.datatype)
        )
        count = (
            _count([d for d in t.shape])
            if len(t.shape) < 8 and all(0 <= d < 4096 for d in t.shape)
            else 4
        )
        which = rng.choice(
            ("uint_contents", "int_contents", "uint64_contents", "bool_contents", "fp64_contents",
             "bytes_contents", "fp32_contents", "int64_contents")
        )  # fmt: skip
        values: list[Any] = {
            "uint_contents": [rng.choice((0, 255, 256, 70000, (1 << 32) - 1))] * count,
            "int_contents": [rng.choice((0, 127, 128, -129, 40000, -(1 << 31)))] * count,
            "uint64_contents": [(1 << 64) - 1] * count,
            "bool_contents": [True] * count,
            "fp64_contents": [1e308] * count,
            "bytes_contents": [b"x"] * count,
            "fp32_contents": [float("nan")] * count,
            "int64_contents": [INT64_MIN] * count,
        }[which]
        t.contents.ClearField(which)
        getattr(t.contents, which).extend(values)
        if rng.random() < 0.7:
            req.ClearField("raw_input_contents")
        return f"typed {which} as {t.datatype}"
    if kind == 12:
        key = rng.choice(
            ("timeout", "timeout", "timeout", "priority", "sequence_id", "binary_data_output", "")
        )
        param = req.parameters[key]
        choice = rng.randrange(7)
        if choice == 0:
            param.int64_param = rng.choice((60_000_000, 0, -1, INT64_MIN, LONGEST_TIMEOUT_US))
        elif choice == 1:
            param.uint64_param = rng.choice(((1 << 64) - 1, 60_000_000, 0))
        elif choice == 2:
            param.string_param = rng.choice(("30", "", "\0", "x" * 1000))
        elif choice == 3:
            param.double_param = rng.choice((float("nan"), float("inf"), -1.0, 3e7))
        elif choice == 4:
            param.bool_param = True
        elif choice == 5:
            pass  # present, with no value set
        else:
            param.int64_param = 60_000_000
        return f"parameter {key!r}={str(param).strip()[:40]!r}"
    if kind == 13:
        t.parameters["binary_data_size"].int64_param = rng.choice((-1, 0, 1 << 40))
        t.parameters["shared_memory_region"].string_param = rng.choice(("r", ""))
        return "input parameters"
    if kind == 14:
        o = req.outputs.add(name=rng.choice((*model.outputs, "nope", "", "o" * 5000)))
        if rng.random() < 0.5:
            o.parameters["classification"].int64_param = rng.choice((0, 3, -1))
        if rng.random() < 0.5:
            o.parameters["binary_data"].bool_param = True
        return f"output {o.name[:20]!r}"
    if kind == 15:
        dup = req.inputs.add()
        dup.CopyFrom(t)
        if req.raw_input_contents:
            req.raw_input_contents.append(req.raw_input_contents[0])
        return "input twice"
    if kind == 16:
        req.id = rng.choice(("x" * 20_000, "\0", "é", ""))
        return "id"
    if kind == 17:
        t.ClearField("shape")
        t.shape.extend([1] * rng.choice((65, 1000, 5000)))
        return f"rank {len(t.shape)}"
    if kind == 18:
        t.ClearField("shape")
        t.shape.extend(
            [rng.choice((1, 8, 9, 16, 17, 32, 33))]
            + [d if d >= 0 else 2 for d in model.inputs[0].dims]
        )
        return f"batch {t.shape[0]}"
    if rng.random() < 0.05:
        req.raw_input_contents.append(b"\0" * rng.choice((1 << 20, 2 << 20)))
        return "over the message size limit"
    req.ClearField("outputs")
    return "outputs cleared"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _corrupt_proto(rng: random.Random, body: bytes, note: list[str]) -> bytes:
    kind = rng.randrange(7)
    damaged = _truncate_or_flip(rng, kind, body, note)
    if damaged is not None:
        return damaged
    if kind == 2:
        note.append("random bytes")
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if kind == 3:
        # Field 1 (a name) as invalid UTF-8: proto3 strings must be valid.
        note.append("invalid utf-8 name")
        return body + b"\x0a" + _varint(3) + b"\xff\xfe\xfd"
    if kind == 4:
        note.append("length past the end")
        return body + b"\x0a" + _varint(1 << 20) + b"abc"
    if kind == 5:
        note.append("unknown fields")
        return body + b"\xf8\x7f\x01" + b"\x9a\x3f" + _varint(4) + b"abcd"
    note.append("deep group")
    return body + b"\x0b" * 200
