"""The torch side of a worker: load TorchScript models, run them, measure what they hold.
ONNX models load through ``gpu/onnx_backend.py`` and run behind the same forward.

Inference runs on a thread pool (torch releases the GIL in its kernels) so the worker's
event loop keeps answering health checks and other models while one computes.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from tritonclient.grpc import service_pb2 as pb

from modelpool.gpu.accounting import (
    Allocator,
    AllocatorUsage,
    PeakMeter,
    allocator_for,
    module_bytes,
    retained_after_release,
)
from modelpool.gpu.host_tier import FAKE_HOST_TIER_ENV, HostEntry, HostTier
from modelpool.gpu.onnx_backend import ONNX_PLATFORM, OnnxModel, load_onnx
from modelpool.gpu.repository import ModelRepository, ModelSpec, TensorSpec
from modelpool.gpu.tensors import (
    STORAGE_DTYPES,
    StringTensor,
    TensorFormatError,
    deserialize_bytes,
    element_count,
    serialize_bytes,
)
from modelpool.placement.errors import (
    InferenceError,
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
    OutOfMemory,
    Unavailable,
)

log = logging.getLogger(__name__)

_WIRE_TO_TORCH = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
}
_TORCH_TO_WIRE = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.uint16: "UINT16",
    torch.uint32: "UINT32",
    torch.uint64: "UINT64",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.float64: "FP64",
    torch.bfloat16: "BF16",
}
# Datatypes and TorchScript (Triton's libtorch backend does the same):
# - BYTES input: forward() gets List[str], every element of the tensor in row-major
#   order, batch included (a StringTensor, which also carries the wire shape). The
#   bytes must be UTF-8: TorchScript's str is text.
# - BYTES output: forward() returns List[str]; its shape is the config's dims with the
#   request's batch size in front and one -1 dim (at most) inferred from the count.
# - BF16 is torch.bfloat16 (raw 16 bits on the wire); UINT16/32/64 are torch's uint
#   dtypes, which pass through a model but have few kernels (arithmetic on them may
#   fail in the model, which is the model's error, as in Triton).


@dataclass
class LoadedModel:
    spec: ModelSpec
    version: int
    #: A TorchScript module, or an onnxruntime session (``spec.platform`` says which).
    module: torch.jit.ScriptModule | OnnxModel
    footprint_bytes: int
    peak_bytes: int
    load_seconds: float
    last_used: float = field(default_factory=time.time)
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    #: Forward calls and requests answered: with dynamic batching the first is smaller.
    executions: int = 0
    inferences: int = 0
    #: Where this load came from: "disk" (the artifact, read and deserialised) or
    #: "host" (promoted from the host tier: a host-to-device copy).
    source: str = "disk"


@dataclass(frozen=True)
class Unloaded:
    """What an unload did: ``freed_bytes`` left the device; ``retained_bytes`` is what
    the allocator still holds that no tensor uses (worker-wide, see ``unload``);
    ``kept_bytes`` went to the host tier (0: the copy was dropped)."""

    freed_bytes: int
    retained_bytes: int
    kept_bytes: int = 0


class ModelRuntime:
    """Models resident on one device. Thread-safe for concurrent infer calls; loads run
    one at a time; a load and an unload of one model are serialised by the caller.

    Host tier (``gpu/host_tier.py``): with ``host_budget_bytes`` > 0 on a CUDA device,
    an unload that asks to keep the copy demotes it to pinned host memory, and a later
    load of the same version promotes it back (a host-to-device copy, no file read, no
    warm-up). On CPU the tier is off: the budget is ignored (logged once), never an
    error, since a CPU copy already lives in host memory.

    Args:
        allocator: the device's memory allocator, for peaks and retained bytes (see
            ``gpu.accounting``); None: the real one of ``device``.
        host_budget_bytes: the host tier's budget (``--host-memory-budget``); 0: off.
        fake_host_tier: TEST HOOK, never for production (``MODELPOOL_FAKE_HOST_TIER=1``,
            read once by the worker): turns the tier on for a CPU worker, the "fake
            device". Demotion keeps the module object as it is and moves its bytes from
            the device account (``ours_bytes``) to the host account, so end-to-end
            tests drive the gateway's host-tier paths without a GPU.
    """

    def __init__(
        self,
        repository: ModelRepository,
        device: str,
        threads: int | None = None,
        allocator: Allocator | None = None,
        host_budget_bytes: int = 0,
        fake_host_tier: bool = False,
    ) -> None:
        self.repository = repository
        self.device = torch.device(device)
        self.allocator = allocator if allocator is not None else allocator_for(self.device, {})
        self.models: dict[tuple[str, int], LoadedModel] = {}
        self.host = HostTier(self._host_budget(host_budget_bytes, fake_host_tier))
        self._fake_host = fake_host_tier and self.device.type != "cuda"
        self._lock = threading.Lock()
        # One load at a time: a second load's weights inside the first one's
        # measurement window would be taken for the first model's peak.
        self._load_serial = threading.Lock()
        if threads:
            torch.set_num_threads(threads)

    def _host_budget(self, budget: int, fake: bool) -> int:
        """The host tier's budget on this device: 0 (off) on CPU unless the test hook."""
        if budget <= 0 or self.device.type == "cuda":
            if fake and self.device.type == "cuda":
                log.warning(
                    "%s is a CPU test hook; ignored on device=%s", FAKE_HOST_TIER_ENV, self.device
                )
            return max(0, budget)
        if fake:
            log.warning(
                "test hook %s=1: host tier of %d bytes on CPU (the fake device)",
                FAKE_HOST_TIER_ENV, budget,
            )  # fmt: skip
            return budget
        log.info(
            "--host-memory-budget ignored on device=%s: a CPU copy already lives in host memory",
            self.device,
        )
        return 0

    # -- lifecycle -------------------------------------------------------------------
    def load(self, name: str, version: int, known_peak_bytes: int = 0) -> LoadedModel:
        """Load ``name``/``version`` (no-op if resident). Raises ModelLoadError with the
        file and the reason; memory taken by a failed load is released.
        ``known_peak_bytes`` (0: unknown) is a peak measured before: no warm-up then."""
        key = (name, version)
        if key in self.models:
            return self.models[key]
        with self._load_serial:
            if key in self.models:  # loaded while this call waited for the lock
                return self.models[key]
            return self._load(name, version, known_peak_bytes)

    def _load(self, name: str, version: int, known_peak_bytes: int = 0) -> LoadedModel:
        key = (name, version)
        self.repository.refresh(name)
        spec = self.repository.get(name)
        version = spec.resolve_version(version)
        promoted = self._promote(spec, version, known_peak_bytes)
        if promoted is not None:
            with self._lock:
                self.models[key] = promoted
            return promoted
        start = time.perf_counter()
        module: torch.jit.ScriptModule | OnnxModel
        # The artifact as a local file whose declared sha256 matched (fetched into the
        # cache first for an S3 repository), kept from eviction while it loads.
        with self.repository.artifact(spec, version) as path:
            if spec.platform == ONNX_PLATFORM:
                # Its own session, errors and measurement: gpu/onnx_backend.py.
                module, footprint, peak = load_onnx(spec, version, path, self.device)
            else:
                module, footprint, peak = self._load_torchscript(
                    spec, version, path, known_peak_bytes
                )
        loaded = LoadedModel(
            spec=spec,
            version=version,
            module=module,
            footprint_bytes=max(footprint, 1),
            peak_bytes=max(peak, footprint, 1),
            load_seconds=time.perf_counter() - start,
        )
        with self._lock:
            self.models[key] = loaded
        log.info(
            "loaded model=%s version=%s device=%s footprint=%d peak=%d load_s=%.3f",
            name,
            version,
            self.device,
            loaded.footprint_bytes,
            loaded.peak_bytes,
            loaded.load_seconds,
        )
        return loaded

    def _promote(self, spec: ModelSpec, version: int, known_peak_bytes: int) -> LoadedModel | None:
        """The host tier's copy of ``spec``/``version`` back on the device; None when the
        tier has none, or its files changed since it was demoted (then it is dropped
        and the caller reads the disk)."""
        entry = self.host.take(spec.name, version)
        if entry is None:
            return None
        stamp = spec.stamps.get(version, "")
        if entry.stamp != stamp:
            log.info(
                "host tier: model=%s version=%d changed on disk since it was demoted; "
                "loading the new files",
                spec.name, version,
            )  # fmt: skip
            return None
        start = time.perf_counter()
        module = cast(torch.jit.ScriptModule, entry.module)
        if not self._fake_host:
            try:
                # From pinned buffers, so the copies run asynchronously; wait for them
                # before the copy is READY (and before its footprint is read).
                module.to(self.device, non_blocking=True)
                self.allocator.synchronize()
            except torch.OutOfMemoryError as e:
                # The partial device copy goes with the module; the host copy is lost.
                traceback.clear_frames(e.__traceback__)
                del module, entry
                self._release()
                raise OutOfMemory(
                    f"model '{spec.name}' version {version}: out of device memory while "
                    "promoting it from the host tier",
                    retry_after_s=1.0,
                ) from e
        footprint = module_bytes(module)
        loaded = LoadedModel(
            spec=spec,
            version=version,
            module=module,
            footprint_bytes=max(footprint, 1),
            # Measured by its first load: no warm-up forward here.
            peak_bytes=max(entry.peak_bytes, known_peak_bytes, footprint, 1),
            load_seconds=time.perf_counter() - start,
            source="host",
        )
        log.info(
            "promoted model=%s version=%s device=%s footprint=%d load_s=%.3f",
            spec.name, version, self.device, loaded.footprint_bytes, loaded.load_seconds,
        )  # fmt: skip
        return loaded

    def _demote(self, loaded: LoadedModel) -> int:
        """Keep an unloaded copy in the host tier; returns the host bytes it holds (0:
        dropped). ONNX sessions are never demoted: onnxruntime owns their memory and
        has no device move. A copy bigger than the whole budget is dropped too."""
        spec, version = loaded.spec, loaded.version
        if isinstance(loaded.module, OnnxModel) or not self.host.fits(loaded.footprint_bytes):
            return 0
        module = loaded.module
        if not self._fake_host:
            try:
                _to_pinned_host(module, self.allocator.synchronize)
            except Exception as e:  # pinned host memory ran out: drop the copy instead
                log.warning(
                    "host tier: cannot demote model=%s version=%d: %s", spec.name, version, e
                )
                return 0
        nbytes = loaded.footprint_bytes if self._fake_host else module_bytes(module)
        if not self.host.fits(nbytes):
            return 0
        self.host.put(
            HostEntry(
                model=spec.name,
                version=version,
                module=module,
                spec=spec,
                stamp=spec.stamps.get(version, ""),
                nbytes=nbytes,
                peak_bytes=loaded.peak_bytes,
                last_used=loaded.last_used,
            )
        )
        log.info(
            "demoted model=%s version=%d to the host tier: %d bytes", spec.name, version, nbytes
        )
        return nbytes

    def _load_torchscript(
        self, spec: ModelSpec, version: int, path: Path, known_peak_bytes: int = 0
    ) -> tuple[torch.jit.ScriptModule, int, int]:
        """(module, footprint bytes, peak bytes) of a TorchScript file on this device."""
        name = spec.name
        meter = PeakMeter(self.allocator)
        try:
            module = torch.jit.load(str(path), map_location=self.device)
            module.eval()
        except torch.OutOfMemoryError as e:
            self._release()
            raise OutOfMemory(
                f"model '{name}' version {version}: out of device memory while loading",
                retry_after_s=1.0,
            ) from e
        except Exception as e:  # torch raises RuntimeError/ValueError/zip errors for bad files
            self._release()
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelLoadError(f"model '{name}': cannot load {path}: {reason}") from e
        if self.device.type == "cuda" and known_peak_bytes <= 0:
            try:
                self._warm_up(spec, module)
            except torch.OutOfMemoryError as e:
                # The traceback's frames hold the module and its inputs; cleared, the
                # cache can give the partial copy back now rather than after a gc.
                traceback.clear_frames(e.__traceback__)
                del module
                self._release()
                raise OutOfMemory(
                    f"model '{name}' version {version}: out of device memory in its first forward",
                    retry_after_s=1.0,
                ) from e
        # The module's own storages, not a difference of device-wide counters, which
        # would also count what other threads of this worker allocate meanwhile.
        footprint = module_bytes(module)
        # The peak includes a first forward's activations and workspaces: what the
        # next admission of this model must find free, not only its weights.
        peak = max(meter.peak(footprint), known_peak_bytes)
        return module, footprint, peak

    def _warm_up(self, spec: ModelSpec, module: torch.jit.ScriptModule) -> None:
        """One forward on zeros shaped from the config (batch 1, -1 dims as 1), to
        measure the peak; a model that rejects zeros is measured without it."""
        args = []
        for t in spec.inputs:
            shape = ([1] if spec.max_batch_size > 0 else []) + [max(1, d) for d in t.dims]
            args.append(
                StringTensor([""] * element_count(shape), shape)
                if t.datatype == "BYTES"
                else torch.zeros(shape, dtype=_WIRE_TO_TORCH[t.datatype], device=self.device)
            )
        try:
            with torch.inference_mode():
                module(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # the model's own input checks; only a measurement is lost
            log.info(
                "warm-up of model=%s skipped: %s",
                spec.name,
                str(e).splitlines()[0] if str(e) else e,
            )

    def unload(self, name: str, version: int) -> tuple[int, int]:
        """Drop a copy; returns (bytes it held, bytes the allocator still holds after
        ``empty_cache()`` that no live tensor uses: memory only a new process gets
        back). The second figure is worker-wide, not this copy's share, and loads or
        forwards running meanwhile cannot inflate it (``gpu.accounting``). Refuses while
        requests are in flight."""
        done = self.release(name, version)
        return done.freed_bytes, done.retained_bytes

    def release(self, name: str, version: int, keep: bool = False) -> Unloaded:
        """Take a copy off the device: with ``keep`` and the host tier on, demote it
        there (see ``unload`` for the figures); without ``keep`` any host copy of it
        goes too. Refuses while requests are in flight."""
        with self._lock:
            loaded = self.models.get((name, version))
            if loaded is None:
                if not keep:
                    self.host.drop(name, version)
                return Unloaded(0, 0)
            if loaded.inflight:
                raise Unavailable(
                    f"model '{name}' version {version} has {loaded.inflight} requests in flight"
                )
            del self.models[(name, version)]
        freed = loaded.footprint_bytes
        if keep and self.host.enabled:
            kept = self._demote(loaded)
            if kept:
                del loaded
                # The device storages went with the move: give them back as a drop does.
                retained = retained_after_release(self.allocator)
                log.info(
                    "unloaded model=%s version=%s freed=%d retained=%d kept=%d",
                    name, version, freed, retained, kept,
                )  # fmt: skip
                return Unloaded(freed, retained, kept)
        else:
            self.host.drop(name, version)
        module_ref = weakref.ref(loaded.module)
        del loaded
        if module_ref() is not None:
            gc.collect()  # a reference cycle (an exception's traceback) may hold it
        if module_ref() is not None:
            # Its tensors are live, so they are not counted as retained; they come
            # back when the last holder (a forward of a cancelled request) lets go.
            log.warning(
                "model=%s version=%s is still referenced after unload; its %d bytes "
                "come back when that reference goes",
                name,
                version,
                freed,
            )
        retained = retained_after_release(self.allocator)
        log.info(
            "unloaded model=%s version=%s freed=%d retained=%d", name, version, freed, retained
        )
        return Unloaded(freed, retained)

    def _release(self) -> None:
        self.allocator.empty_cache()

    def ours_bytes(self) -> int:
        return sum(m.footprint_bytes for m in list(self.models.values()))

    def allocator_usage(self) -> AllocatorUsage:
        """The device allocator's allocated and reserved bytes now (zeros on CPU)."""
        return self.allocator.usage()

    # -- inference -------------------------------------------------------------------
    def get(self, name: str, version: int) -> LoadedModel:
        loaded = self.models.get((name, version))
        if loaded is None:
            raise ModelNotReady(f"model '{name}' version {version} is not loaded on this worker")
        return loaded

    def version_of(self, request: pb.ModelInferRequest) -> int:
        """The version a request is for: its own, or the newest resident here (0: none).
        Raises ValueError for a version that is not a number."""
        version = int(request.model_version) if request.model_version else 0
        if not version:
            version = max((v for (n, v) in self.models if n == request.model_name), default=0)
        return version

    def begin(self, request: pb.ModelInferRequest) -> LoadedModel:
        """The copy a request is for, counted in flight until ``end``."""
        loaded = self.get(request.model_name, self.version_of(request))
        with self._lock:
            loaded.inflight += 1
            loaded.last_used = time.time()
        return loaded

    def end(self, loaded: LoadedModel) -> None:
        with self._lock:
            loaded.inflight -= 1

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Run one request. Inputs arrive as raw little-endian bytes (the gateway
        normalises typed contents), go to forward() in config order, and outputs come
        back as raw bytes in config order."""
        loaded = self.begin(request)
        try:
            args = self.decode(loaded.spec, request)
            return self.encode(loaded, request, self.forward(loaded, args))
        finally:
            self.end(loaded)

    def forward(self, loaded: LoadedModel, args: list[torch.Tensor]) -> list[torch.Tensor]:
        """The model on CPU tensors, in config order; CPU tensors out, in config order.
        Blocking: call it off the event loop."""
        spec = loaded.spec
        try:
            if isinstance(loaded.module, OnnxModel):
                # CPU tensors both ways: onnxruntime copies to and from its device.
                result = loaded.module.run(args)
            else:
                with torch.inference_mode():
                    result = loaded.module(*[_to_device(a, self.device) for a in args])
        except torch.OutOfMemoryError as e:
            self._release()
            raise OutOfMemory(f"model '{spec.name}': out of device memory during inference") from e
        except Exception as e:  # a model's own error must never take the worker down
            msg = str(e).strip().splitlines()
            raise InferenceError(
                f"model '{spec.name}' failed on this input: {msg[-1] if msg else type(e).__name__}"
            ) from e
        values: list[object]
        if _is_strings(result):
            values = [result]  # one BYTES output, as List[str]
        else:
            values = list(result) if isinstance(result, (tuple, list)) else [result]
        # A List[str] (a BYTES output) stands in a tensor's place: see the top of this file.
        tensors = [
            v.detach().to("cpu") if isinstance(v, torch.Tensor) else cast(torch.Tensor, v)
            for v in values
            if isinstance(v, torch.Tensor) or _is_strings(v)
        ]
        if len(values) != len(spec.outputs) or len(tensors) != len(values):
            raise InferenceError(
                f"model '{spec.name}' returned {len(values)} values; its config declares "
                f"{len(spec.outputs)} outputs (tensors, or List[str] for BYTES)"
            )
        loaded.executions += 1
        return tensors

    def decode(self, spec: ModelSpec, request: pb.ModelInferRequest) -> list[torch.Tensor]:
        """The request's inputs as CPU tensors in config order (no copy of the bytes)."""
        by_name = {t.name: i for i, t in enumerate(request.inputs)}
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(
                f"model '{spec.name}': {len(request.inputs)} inputs but "
                f"{len(request.raw_input_contents)} raw_input_contents"
            )
        args = []
        for t in spec.inputs:
            i = by_name.get(t.name)
            if i is None:
                raise InvalidInput(f"model '{spec.name}': input '{t.name}' is missing")
            shape = tuple(request.inputs[i].shape)
            raw = request.raw_input_contents[i]
            tensor = _decode_input(spec.name, t.name, t.datatype, shape, raw)
            args.append(tensor)
        return args

    def encode(
        self, loaded: LoadedModel, request: pb.ModelInferRequest, tensors: list[torch.Tensor]
    ) -> pb.ModelInferResponse:
        spec = loaded.spec
        wanted = {o.name for o in request.outputs} or {o.name for o in spec.outputs}
        response = pb.ModelInferResponse(
            model_name=spec.name, model_version=str(loaded.version), id=request.id
        )
        for out_spec, tensor in zip(spec.outputs, tensors, strict=True):
            if out_spec.name not in wanted:
                continue
            shape, raw = _encode_output(spec, out_spec, request, tensor)
            out = response.outputs.add()
            out.name = out_spec.name
            out.datatype = out_spec.datatype
            out.shape.extend(shape)
            response.raw_output_contents.append(raw)
        loaded.inferences += 1
        return response


def _to_pinned_host(module: torch.jit.ScriptModule, synchronize: Callable[[], None]) -> None:
    """Move a module's parameters and buffers into pinned (page-locked) host memory in
    place, so promoting it is an asynchronous DMA copy. Each device tensor is copied
    straight into a pinned buffer (no pageable copy in between) and swapped in with
    ``.data``, which a ScriptModule's slots see as well; once the last reference to
    the device storages goes, ``empty_cache()`` can give them back."""
    moved: dict[int, torch.Tensor] = {}
    tensors = [*module.parameters(), *module.buffers()]
    for t in tensors:
        if t.device.type == "cpu" and t.is_pinned():
            continue
        pinned = torch.empty(t.size(), dtype=t.dtype, device="cpu", pin_memory=True)
        pinned.copy_(t.data, non_blocking=True)
        moved[id(t)] = pinned
    synchronize()  # the module's device: the copies must land before the swap
    for t in tensors:
        if id(t) in moved:
            t.data = moved[id(t)]


def _to_device(arg: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A StringTensor (List[str]) has no device: TorchScript takes it as it is.
    return arg if isinstance(arg, list) else arg.to(device, non_blocking=True)


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _decode_input(
    model: str, name: str, datatype: str, shape: tuple[int, ...], raw: bytes
) -> torch.Tensor:
    """One input's raw bytes as what forward() takes: a tensor sharing the bytes, or
    for BYTES a StringTensor (typed as a tensor: it stands in one's place)."""
    if datatype == "BYTES":
        try:
            items = deserialize_bytes(raw, element_count(shape))
        except TensorFormatError as e:
            raise InvalidInput(f"model '{model}': input '{name}' (BYTES): {e}") from None
        texts = []
        for k, item in enumerate(items):
            try:
                texts.append(item.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"model '{model}': input '{name}' element {k} is not UTF-8; the pytorch "
                    "backend passes BYTES to the model as List[str]"
                ) from None
        return cast(torch.Tensor, StringTensor(texts, shape))
    dtype = STORAGE_DTYPES[datatype]
    need = element_count(shape) * dtype.itemsize
    if len(raw) != need:
        raise InvalidInput(
            f"model '{model}': input '{name}' has {len(raw)} bytes, "
            f"shape {list(shape)} of {datatype} needs {need}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    with warnings.catch_warnings():
        # Read-only protobuf bytes: inference never writes its inputs, and a
        # copy per request would cost more than the warning is worth.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    # BF16 arrives as its bits in uint16: the same bytes, reinterpreted.
    return tensor.view(torch.bfloat16) if datatype == "BF16" else tensor


def _encode_output(
    spec: ModelSpec, out_spec: TensorSpec, request: pb.ModelInferRequest, value: torch.Tensor
) -> tuple[list[int], bytes]:
    """(shape, raw bytes) of one output as forward() returned it."""
    where = f"model '{spec.name}': output '{out_spec.name}'"
    if isinstance(value, list):  # List[str], checked by forward()
        if out_spec.datatype != "BYTES":
            raise InferenceError(
                f"{where} is List[str] (BYTES), config declares {out_spec.datatype}"
            )
        shape = _string_shape(spec, out_spec, request, len(value), where)
        return shape, serialize_bytes(s.encode("utf-8", "surrogatepass") for s in value)
    wire = _TORCH_TO_WIRE.get(value.dtype, str(value.dtype))
    if wire != out_spec.datatype:
        raise InferenceError(f"{where} is {wire}, config declares {out_spec.datatype}")
    tensor = value.contiguous()
    if wire == "BF16":
        tensor = tensor.view(torch.uint16)  # numpy has no bfloat16: its bits go as they are
    array = tensor.numpy()
    return list(array.shape), array.tobytes()


def _string_shape(
    spec: ModelSpec, out_spec: TensorSpec, request: pb.ModelInferRequest, count: int, where: str
) -> list[int]:
    """The shape of a List[str] output: the config's dims behind the request's batch
    size, one -1 among them inferred from ``count``."""
    batch = [int(request.inputs[0].shape[0])] if spec.max_batch_size > 0 and request.inputs else []
    dims = list(out_spec.dims)
    free = [k for k, d in enumerate(dims) if d < 0]
    known = element_count(batch) * element_count([d for d in dims if d >= 0])
    if len(free) == 1 and known > 0 and count % known == 0:
        dims[free[0]] = count // known
    if any(d < 0 for d in dims) or element_count(batch + dims) != count:
        raise InferenceError(
            f"{where}: the model returned {count} strings, which do not fill "
            f"dims {list(out_spec.dims)}" + (f" at batch size {batch[0]}" if batch else "")
        )
    return batch + dims
