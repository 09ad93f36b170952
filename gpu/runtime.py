"""The torch side of a worker: load TorchScript models, run them, measure what they hold.

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
from dataclasses import dataclass, field

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
from modelpool.gpu.repository import ModelRepository, ModelSpec
from modelpool.gpu.tensors import NUMPY_DTYPES
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
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
_TORCH_TO_WIRE = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}


@dataclass
class LoadedModel:
    spec: ModelSpec
    version: int
    module: torch.jit.ScriptModule
    footprint_bytes: int
    peak_bytes: int
    load_seconds: float
    last_used: float = field(default_factory=time.time)
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    #: Forward calls and requests answered: with dynamic batching the first is smaller.
    executions: int = 0
    inferences: int = 0


class ModelRuntime:
    """Models resident on one device. Thread-safe for concurrent infer calls; loads run
    one at a time; a load and an unload of one model are serialised by the caller.

    Args:
        allocator: the device's memory allocator, for peaks and retained bytes (see
            ``gpu.accounting``); None: the real one of ``device``.
    """

    def __init__(
        self,
        repository: ModelRepository,
        device: str,
        threads: int | None = None,
        allocator: Allocator | None = None,
    ) -> None:
        self.repository = repository
        self.device = torch.device(device)
        self.allocator = allocator if allocator is not None else allocator_for(self.device, {})
        self.models: dict[tuple[str, int], LoadedModel] = {}
        self._lock = threading.Lock()
        # One load at a time: a second load's weights inside the first one's
        # measurement window would be taken for the first model's peak.
        self._load_serial = threading.Lock()
        if threads:
            torch.set_num_threads(threads)

    # -- lifecycle -------------------------------------------------------------------
    def load(self, name: str, version: int) -> LoadedModel:
        """Load ``name``/``version`` (no-op if resident). Raises ModelLoadError with the
        file and the reason; memory taken by a failed load is released."""
        key = (name, version)
        if key in self.models:
            return self.models[key]
        with self._load_serial:
            if key in self.models:  # loaded while this call waited for the lock
                return self.models[key]
            return self._load(name, version)

    def _load(self, name: str, version: int) -> LoadedModel:
        key = (name, version)
        self.repository.refresh(name)
        spec = self.repository.get(name)
        version = spec.resolve_version(version)
        path = spec.artifacts[version]
        start = time.perf_counter()
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
        if self.device.type == "cuda":
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
        peak = meter.peak(footprint)
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

    def _warm_up(self, spec: ModelSpec, module: torch.jit.ScriptModule) -> None:
        """One forward on zeros shaped from the config (batch 1, -1 dims as 1), to
        measure the peak; a model that rejects zeros is measured without it."""
        args = []
        for t in spec.inputs:
            shape = ([1] if spec.max_batch_size > 0 else []) + [max(1, d) for d in t.dims]
            args.append(torch.zeros(shape, dtype=_WIRE_TO_TORCH[t.datatype], device=self.device))
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
        with self._lock:
            loaded = self.models.get((name, version))
            if loaded is None:
                return 0, 0
            if loaded.inflight:
                raise Unavailable(
                    f"model '{name}' version {version} has {loaded.inflight} requests in flight"
                )
            del self.models[(name, version)]
        freed = loaded.footprint_bytes
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
        return freed, retained

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

    def begin(self, request: pb.ModelInferRequest) -> LoadedModel:
        """The copy a request is for, counted in flight until ``end``."""
        version = int(request.model_version) if request.model_version else 0
        if not version:
            version = max((v for (n, v) in self.models if n == request.model_name), default=0)
        loaded = self.get(request.model_name, version)
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
            with torch.inference_mode():
                result = loaded.module(*[a.to(self.device, non_blocking=True) for a in args])
        except torch.OutOfMemoryError as e:
            self._release()
            raise OutOfMemory(f"model '{spec.name}': out of device memory during inference") from e
        except Exception as e:  # a model's own error must never take the worker down
            msg = str(e).strip().splitlines()
            raise InferenceError(
                f"model '{spec.name}' failed on this input: {msg[-1] if msg else type(e).__name__}"
            ) from e
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        tensors = [t.detach().to("cpu") for t in values if isinstance(t, torch.Tensor)]
        if len(values) != len(spec.outputs) or len(tensors) != len(values):
            raise InferenceError(
                f"model '{spec.name}' returned {len(values)} values; its config declares "
                f"{len(spec.outputs)} tensor outputs"
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
            dtype = NUMPY_DTYPES[t.datatype]
            if len(raw) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise InvalidInput(
                    f"model '{spec.name}': input '{t.name}' has {len(raw)} bytes, "
                    f"shape {list(shape)} of {t.datatype} needs "
                    f"{int(np.prod(shape, dtype=np.int64)) * dtype.itemsize}"
                )
            array = np.frombuffer(raw, dtype=dtype).reshape(shape)
            with warnings.catch_warnings():
                # Read-only protobuf bytes: inference never writes its inputs, and a
                # copy per request would cost more than the warning is worth.
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.from_numpy(array)
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
            wire = _TORCH_TO_WIRE.get(tensor.dtype, str(tensor.dtype))
            if wire != out_spec.datatype:
                raise InferenceError(
                    f"model '{spec.name}': output '{out_spec.name}' is {wire}, "
                    f"config declares {out_spec.datatype}"
                )
            array = tensor.contiguous().numpy()
            out = response.outputs.add()
            out.name = out_spec.name
            out.datatype = wire
            out.shape.extend(array.shape)
            response.raw_output_contents.append(array.tobytes())
        loaded.inferences += 1
        return response
