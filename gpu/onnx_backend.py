"""ONNX models (``platform: "onnxruntime_onnx"`` or ``backend: "onnxruntime"``) on
onnxruntime, behind the same seam as TorchScript: CPU torch tensors in, CPU torch
tensors out, in config order. So decoding, encoding and dynamic batching
(``gpu/batching.py``) are the runtime's own, whatever the backend.

onnxruntime is an optional extra (``pip install 'modelpool[onnx]'``) and is imported
on the first ONNX load only: a worker without it serves TorchScript as before and
answers a load of an ONNX model with a ModelLoadError naming the extra, which the
gateway lists as the version's UNAVAILABLE reason.

Footprints, as placement counts them (``gpu/accounting.py`` says why nothing there
subtracts two device-wide readings; here one cannot avoid it on a GPU):

- CPU: the bytes of the graph's initializers and Constant tensors (shape times item
  size, read with the ``onnx`` package; the file's size without it). Exact for the
  weights and independent of other threads, like torch's storages; what the session
  adds (prepacked weight copies, its arena) is not counted, as torch's CPU path does
  not count its allocator either.
- CUDA: the device memory the session took over its creation and a first forward on
  zeros, ``torch.cuda.mem_get_info`` before and after, less what torch's own allocator
  reserved meanwhile (forwards of TorchScript copies in this worker); never below the
  weights. onnxruntime's CUDA arena keeps what the first forward grew it to, so this
  is what the copy holds while resident. Loads in a worker run one at a time, but a
  load in *another* process on the same device inside the window biases it (up, or
  down for a free); the figure is a measurement, not an identity.
"""

from __future__ import annotations

import logging
import math
import traceback
import types
from pathlib import Path

import numpy as np
import torch

from modelpool.gpu.repository import ONNX_PLATFORM, ModelSpec
from modelpool.gpu.tensors import NUMPY_DTYPES
from modelpool.placement.errors import ModelLoadError, OutOfMemory

log = logging.getLogger(__name__)

__all__ = ["MISSING_EXTRA", "ONNX_PLATFORM", "OnnxModel", "load_onnx"]

MISSING_EXTRA = "onnxruntime is not installed: pip install 'modelpool[onnx]'"

#: onnxruntime's tensor type strings -> wire datatypes this backend serves. BYTES
#: (tensor(string)) and BF16 have no numpy-and-torch form shared by both sides.
ORT_TO_WIRE = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}
SUPPORTED_DATATYPES = frozenset(ORT_TO_WIRE.values())

#: How onnxruntime says a device allocation failed (CUDA EP and its arena).
_OOM_MARKERS = ("out of memory", "failed to allocate memory")


def import_onnxruntime(model: str) -> types.ModuleType:
    """onnxruntime, imported now for ``model``. Raises ModelLoadError naming the model
    and the extra when it is not installed, or the import error when it is installed
    but broken (a CUDA build without its libraries, say)."""
    try:
        import onnxruntime
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "onnxruntime":
            raise ModelLoadError(f"model '{model}': {MISSING_EXTRA}") from e
        raise ModelLoadError(f"model '{model}': onnxruntime cannot be imported: {e}") from e
    except ImportError as e:
        raise ModelLoadError(f"model '{model}': onnxruntime cannot be imported: {e}") from e
    return onnxruntime


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return any(m in text for m in _OOM_MARKERS)


class OnnxModel:
    """One InferenceSession bound to the config's tensor names.

    ``run`` takes and returns CPU torch tensors in config order, sharing memory with
    numpy both ways (onnxruntime copies to and from its device itself).
    """

    def __init__(
        self, name: str, session: object, input_names: list[str], output_names: list[str]
    ) -> None:
        self.name = name
        self.session = session
        self.input_names = input_names
        self.output_names = output_names

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses, first preferred."""
        return list(self.session.get_providers())  # type: ignore[attr-defined]

    def run(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        """Blocking: call it off the event loop. An allocation failure on the device is
        raised as ``torch.OutOfMemoryError`` so that the runtime maps both backends'
        out-of-memory in one place; any other error is onnxruntime's own."""
        feed = {n: a.numpy() for n, a in zip(self.input_names, args, strict=True)}
        try:
            outputs = self.session.run(self.output_names, feed)  # type: ignore[attr-defined]
        except Exception as e:  # onnxruntime's pybind errors share no useful base
            if is_out_of_memory(e):
                raise torch.OutOfMemoryError(str(e)) from e
            raise
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in outputs]


def load_onnx(
    spec: ModelSpec, version: int, path: Path, device: torch.device
) -> tuple[OnnxModel, int, int]:
    """Create the session of ``spec``/``version`` on ``device``: (model, footprint
    bytes, peak bytes). Raises ModelLoadError (extra missing, bad file, config that
    does not match the graph) or OutOfMemory, having released what it took."""
    ort = import_onnxruntime(spec.name)
    options = ort.SessionOptions()
    # The worker's --threads, as torch got it from the runtime; one graph at a time.
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    # Many sessions share the worker's cores: idle ones must not spin waiting for work.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: warnings go to stderr per session
    providers = _providers(ort, device)
    before = _cuda_reading(device)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime's Fail / InvalidProtobuf / NoSuchFile / ...
        if is_out_of_memory(e):
            raise OutOfMemory(
                f"model '{spec.name}' version {version}: out of device memory while loading",
                retry_after_s=1.0,
            ) from e
        lines = str(e).strip().splitlines()
        reason = lines[0] if lines else type(e).__name__
        raise ModelLoadError(f"model '{spec.name}': cannot load {path}: {reason}") from e
    model = OnnxModel(spec.name, session, *_bind(spec, session, path))
    weights = initializer_bytes(path)
    if before is None:
        return model, max(weights, 1), max(weights, 1)
    if "CUDAExecutionProvider" not in model.providers:
        log.warning(
            "model=%s runs on onnxruntime's CPU provider on device=%s (CUDA provider "
            "unavailable): its weights are in host memory but counted against the device",
            spec.name,
            device,
        )
        return model, max(weights, 1), max(weights, 1)
    try:
        _warm_up(spec, model)
    except torch.OutOfMemoryError as e:
        # The traceback's frames hold the session: cleared, its arena goes back now.
        traceback.clear_frames(e.__traceback__)
        del model, session
        raise OutOfMemory(
            f"model '{spec.name}' version {version}: out of device memory in its first forward",
            retry_after_s=1.0,
        ) from e
    after = _cuda_reading(device)
    assert after is not None
    footprint = device_footprint(before, after, weights)
    return model, footprint, footprint


def device_footprint(before: tuple[int, int], after: tuple[int, int], weights: int) -> int:
    """Bytes a session took on a device between two ``(device bytes in use, torch
    reserved bytes)`` readings: what the device lost, less what torch's allocator took
    meanwhile; never below ``weights`` (the initializers' bytes, exact) nor 1."""
    took = (after[0] - before[0]) - (after[1] - before[1])
    return max(took, weights, 1)


def _providers(ort: types.ModuleType, device: torch.device) -> list[object]:
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ["CPUExecutionProvider"]  # load_onnx logs it, from what the session uses
    cuda_options = {
        "device_id": device.index if device.index is not None else 0,
        # Grow the arena by what is asked, not to the next power of two: many models
        # share the device, and the measured footprint is what placement reserves.
        "arena_extend_strategy": "kSameAsRequested",
    }
    return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]


def _cuda_reading(device: torch.device) -> tuple[int, int] | None:
    """(device bytes in use, bytes torch's allocator reserves) on a CUDA device after
    its queued work; None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return total - free, int(torch.cuda.memory_reserved(device))


def _bind(spec: ModelSpec, session: object, path: Path) -> tuple[list[str], list[str]]:
    """The config's input and output names, checked against the graph: every config
    tensor exists with the same datatype, and every graph input is configured."""
    graph_in = {a.name: a for a in session.get_inputs()}  # type: ignore[attr-defined]
    graph_out = {a.name: a for a in session.get_outputs()}  # type: ignore[attr-defined]
    where = f"model '{spec.name}': {path.name}"
    for kind, tensors, graph in (
        ("input", spec.inputs, graph_in),
        ("output", spec.outputs, graph_out),
    ):
        for t in tensors:
            arg = graph.get(t.name)
            if arg is None:
                raise ModelLoadError(
                    f"{where} has no {kind} '{t.name}' (its {kind}s: {', '.join(sorted(graph))})"
                )
            wire = ORT_TO_WIRE.get(arg.type)
            if wire is None:
                raise ModelLoadError(
                    f"{where}: {kind} '{t.name}' is {arg.type}, which modelpool does not "
                    f"serve for ONNX (supported: {', '.join(sorted(SUPPORTED_DATATYPES))})"
                )
            if wire != t.datatype:
                raise ModelLoadError(
                    f"{where}: {kind} '{t.name}' is {wire} ({arg.type}), config.pbtxt "
                    f"declares {t.datatype}"
                )
    configured = {t.name for t in spec.inputs}
    missing = sorted(n for n in graph_in if n not in configured)
    if missing:
        raise ModelLoadError(
            f"{where} needs input(s) {', '.join(missing)} that config.pbtxt does not declare"
        )
    return [t.name for t in spec.inputs], [t.name for t in spec.outputs]


def _warm_up(spec: ModelSpec, model: OnnxModel) -> None:
    """One forward on zeros shaped from the config (batch 1, -1 dims as 1), so the
    arena holds its working set when measured; a model that rejects zeros is measured
    without it, as the TorchScript path does."""
    args = []
    for t in spec.inputs:
        shape = ([1] if spec.max_batch_size > 0 else []) + [max(1, d) for d in t.dims]
        args.append(torch.from_numpy(np.zeros(shape, dtype=NUMPY_DTYPES[t.datatype])))
    try:
        model.run(args)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # the model's own shape checks; only a measurement is lost
        lines = str(e).strip().splitlines()
        log.info("warm-up of model=%s skipped: %s", spec.name, lines[0] if lines else e)


def initializer_bytes(path: Path) -> int:
    """Bytes of the top-level graph's initializers and Constant tensors (shape times
    item size, whether stored inline or as external data); the file's size where the
    ``onnx`` package is missing or cannot read it."""
    try:
        import onnx
    except ImportError:
        return path.stat().st_size
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnxruntime read it; a stricter parser is only a figure lost
        log.info("cannot read initializers of %s (%s); counting its file size", path, e)
        return path.stat().st_size
    tensors = list(graph.initializer)
    tensors += [s.values for s in graph.sparse_initializer]
    for node in graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value"]
    total = 0
    for t in tensors:
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError):
            itemsize = 1
        total += math.prod(t.dims) * itemsize
    return total
