"""Triton's system shared memory extension: a client registers a named region of a
POSIX shared memory object (``/dev/shm/<key>``), then names it in an input's or a
requested output's parameters instead of sending the tensor's bytes.
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_shared_memory.md

The gateway reads such inputs into ``raw_input_contents`` before the request is
validated and forwarded, so workers never see shared memory; outputs asked for in a
region are written there after the worker answers, and the reply carries them without
data (an empty ``raw_output_contents`` entry, so indexes still line up, as in Triton).

Regions belong to an owner: the tenant's name with auth on, ``""`` without. One
tenant never sees, uses or unregisters another's regions by name. The key is the
capability, as in Triton: whoever may reach the gateway's ``/dev/shm`` and knows a key
can register it (see docs/security.md).

Why ``pread``/``pwrite`` on a descriptor opened at register and not an ``mmap``: a
client that shrinks its object (``ftruncate``) after registering would make any later
access through a mapping raise SIGBUS, which kills the whole gateway; a read past the
end of a file is only a short read. The copy costs the same: the bytes go into the
protobuf either way.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from modelpool.gateway.validate import contents_to_raw
from modelpool.gpu.repository import clip
from modelpool.placement.errors import InvalidInput, NotAllowed

SHM_DIR = Path("/dev/shm")
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
PARAMETERS = (REGION, BYTE_SIZE, OFFSET)
#: Regions one owner may hold at once: each keeps a file descriptor open.
MAX_REGIONS = 128
CUDA_UNSUPPORTED = "CUDA shared memory is not supported by this server"


@dataclass(frozen=True)
class RegionStatus:
    """A registered region, as Triton's status calls report it (bytes)."""

    name: str
    key: str
    offset: int
    byte_size: int


class _Region:
    """One registered region: an open descriptor on its object. Every access checks
    the object's size first, so one the client shrank or removed is a 400, never a
    crash (a removed object stays readable until unregistered: it is still open)."""

    def __init__(self, status: RegionStatus, fd: int) -> None:
        self.status = status
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _span(self, offset: int, size: int, what: str) -> tuple[int, int]:
        """The descriptor and file position of ``size`` bytes at ``offset`` in the
        region; raises InvalidInput (naming ``what``) when they are not all there."""
        s = self.status
        if self._fd is None:
            raise InvalidInput(
                f"{what}: shared memory region '{clip(s.name)}' was unregistered while the "
                "request ran"
            )
        if offset + size > s.byte_size:
            raise InvalidInput(
                f"{what}: bytes {offset}..{offset + size} are outside shared memory region "
                f"'{clip(s.name)}' ({s.byte_size} bytes)"
            )
        start = s.offset + offset
        if start + size > os.fstat(self._fd).st_size:
            raise InvalidInput(
                f"{what}: shared memory region '{clip(s.name)}' (key '{clip(s.key)}') no "
                f"longer holds its {s.byte_size} bytes: the object was shrunk"
            )
        return self._fd, start

    def read(self, offset: int, size: int, what: str) -> bytes:
        fd, start = self._span(offset, size, what)
        data = os.pread(fd, size, start)
        if len(data) != size:  # shrunk between the size check and the read
            raise InvalidInput(
                f"{what}: shared memory region '{clip(self.status.name)}' returned "
                f"{len(data)} of {size} bytes: the object was shrunk"
            )
        return data

    def write(self, offset: int, data: bytes, what: str) -> None:
        fd, start = self._span(offset, len(data), what)
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, start)
            view, start = view[written:], start + written


@dataclass(frozen=True)
class _Slot:
    """Where one output goes: ``byte_size`` bytes at ``offset`` in ``region``."""

    region: _Region
    offset: int
    byte_size: int


class OutputPlan:
    """The outputs of one request that go to shared memory (possibly none: the
    request still named shared memory, so it was rewritten)."""

    def __init__(self, model: str, slots: dict[str, _Slot]) -> None:
        self.model = model
        self.slots = slots

    def write(self, response: pb.ModelInferResponse) -> pb.ModelInferResponse:
        """Write the planned outputs into their regions and take their bytes out of
        ``response`` (in place; returned for convenience). Each such output keeps its
        name, datatype and shape, and says where its bytes went in its parameters."""
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
            slot = self.slots.get(out.name)
            if slot is None:
                continue
            what = f"model '{self.model}': output '{clip(out.name)}'"
            if len(raw) > slot.byte_size:
                raise InvalidInput(
                    f"{what} is {len(raw)} bytes, more than the {slot.byte_size} bytes of "
                    f"shared memory given for it ({BYTE_SIZE})"
                )
            slot.region.write(slot.offset, raw, what)
            out.parameters[REGION].string_param = slot.region.status.name
            out.parameters[BYTE_SIZE].int64_param = len(raw)
            if slot.offset:
                out.parameters[OFFSET].int64_param = slot.offset
        for i, out in enumerate(response.outputs):
            if out.name in self.slots:
                response.raw_output_contents[i] = b""
        return response


class SharedMemoryRegistry:
    """The registered regions of every owner (a tenant's name, ``""`` with auth off).

    All methods are synchronous and touch only this object and the owner's files, so
    they run on the event loop without a lock: nothing awaits between a lookup and
    its use. ``directory`` is where keys live (``/dev/shm``; tests may pass another).
    """

    def __init__(
        self, directory: Path = SHM_DIR, max_regions: int = MAX_REGIONS, enabled: bool = True
    ) -> None:
        self.directory = directory
        self.max_regions = max_regions
        #: Off, registering is refused: a key names any object in /dev/shm on the
        #: gateway's host, so a tenant that guesses another process's key could read
        #: it out through an identity model. ``--system-shared-memory`` decides.
        self.enabled = enabled
        self._regions: dict[str, dict[str, _Region]] = {}

    # -- the extension's calls -------------------------------------------------------
    def register(self, owner: str, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open ``key`` and check that ``byte_size`` bytes at ``offset`` lie inside it.

        Raises:
            InvalidInput: a bad name or key, no such object, a range outside it, a name
                already registered, or too many regions.
        """
        if not self.enabled:
            raise NotAllowed(
                "system shared memory is off on this server (an auth config turns it off "
                "unless the server runs with --system-shared-memory on)"
            )
        regions = self._regions.setdefault(owner, {})
        what = f"shared memory region '{clip(name)}'"
        if not name:
            raise InvalidInput("a shared memory region needs a name")
        if name in regions:
            raise InvalidInput(f"{what} is already registered (unregister it first)")
        if len(regions) >= self.max_regions:
            raise InvalidInput(
                f"{what}: {self.max_regions} regions are registered already, the most one "
                "client may hold (unregister some first)"
            )
        for label, value in (("offset", offset), ("byte_size", byte_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"{what}: {label} {clip(repr(value))} is not a whole number")
        if byte_size == 0:
            raise InvalidInput(f"{what}: byte_size must be more than 0")
        path = self._path(key, what)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            reason = "no such object" if e.errno == errno.ENOENT else e.strerror
            if e.errno == errno.ELOOP:
                reason = "it is a symbolic link"
            raise InvalidInput(
                f"{what}: unable to open shared memory key '{clip(key)}': {reason}"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInput(f"{what}: key '{clip(key)}' is not a shared memory object")
            if offset + byte_size > st.st_size:
                raise InvalidInput(
                    f"{what}: offset {offset} + byte_size {byte_size} runs past the end of "
                    f"key '{clip(key)}' ({st.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        regions[name] = _Region(RegionStatus(name, key, offset, byte_size), fd)

    def status(self, owner: str, name: str = "") -> list[RegionStatus]:
        """Every region of ``owner``, or the one named.

        Raises:
            InvalidInput: ``name`` is not a region of ``owner``.
        """
        regions = self._regions.get(owner, {})
        if name:
            return [self._get(owner, name, "").status]
        return [r.status for _, r in sorted(regions.items())]

    def unregister(self, owner: str, name: str = "") -> None:
        """Close ``name`` (every region of ``owner`` when empty). Unknown names are not
        an error, as in Triton: the region is gone either way."""
        regions = self._regions.get(owner, {})
        names = [name] if name else list(regions)
        for n in names:
            region = regions.pop(n, None)
            if region is not None:
                region.close()

    def close(self) -> None:
        """Close every region (the gateway is stopping)."""
        for owner in list(self._regions):
            self.unregister(owner)
        self._regions.clear()

    # -- inference -------------------------------------------------------------------
    def resolve(self, owner: str, request: pb.ModelInferRequest) -> OutputPlan | None:
        """Read the inputs ``request`` places in shared memory into its
        ``raw_input_contents`` (in input order) and plan its outputs that go there; the
        shared memory parameters are taken out, so the rest of the path sees an
        ordinary request. None (and ``request`` untouched) when it names none.

        Raises:
            InvalidInput: an unknown region, a range outside it, malformed parameters,
                or data sent beside shared memory.
        """
        if not (_uses_shm(request.inputs) or _uses_shm(request.outputs)):
            return None
        model = clip(request.model_name)
        plain = [t for t in request.inputs if not _names_shm(t.parameters)]
        if not request.raw_input_contents and any(t.HasField("contents") for t in plain):
            # Typed contents beside shared memory: convert just those inputs.
            sub = pb.ModelInferRequest(model_name=request.model_name)
            sub.inputs.extend(plain)
            contents_to_raw(sub)
            given = list(sub.raw_input_contents)
            for t in plain:
                t.ClearField("contents")
        else:
            given = list(request.raw_input_contents)
        if len(given) != len(plain):
            raise InvalidInput(
                f"model '{model}': {len(plain)} inputs are not in shared memory but "
                f"{len(given)} raw_input_contents were sent"
            )
        contents: list[bytes] = []
        it = iter(given)
        for t in request.inputs:
            if not _names_shm(t.parameters):
                contents.append(next(it))
                continue
            what = f"model '{model}': input '{clip(t.name)}'"
            if t.HasField("contents"):
                raise InvalidInput(f"{what} is in shared memory and must not also have contents")
            region, offset, size = self._slot(owner, t.parameters, what)
            contents.append(region.read(offset, size, what))
            _strip(t.parameters)
        del request.raw_input_contents[:]
        request.raw_input_contents.extend(contents)
        slots: dict[str, _Slot] = {}
        for o in request.outputs:
            if not _names_shm(o.parameters):
                continue
            what = f"model '{model}': output '{clip(o.name)}'"
            region, offset, size = self._slot(owner, o.parameters, what)
            region._span(offset, size, what)  # the range must be there before any compute
            slots[o.name] = _Slot(region, offset, size)
            _strip(o.parameters)
        return OutputPlan(model, slots)

    # -- helpers ---------------------------------------------------------------------
    def _path(self, key: str, what: str) -> Path:
        """``/dev/shm/<key>`` for a POSIX key (``/name`` or ``name``): one file name, so
        a key can never reach outside the directory."""
        name = key.lstrip("/")
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise InvalidInput(
                f"{what}: key '{clip(key)}' is not a POSIX shared memory name ('/name')"
            )
        return self.directory / name

    def _get(self, owner: str, name: str, what: str) -> _Region:
        region = self._regions.get(owner, {}).get(name)
        if region is None:
            prefix = f"{what}: " if what else ""
            raise InvalidInput(f"{prefix}shared memory region '{clip(name)}' is not registered")
        return region

    def _slot(
        self, owner: str, params: MutableMapping[str, Any], what: str
    ) -> tuple[_Region, int, int]:
        if REGION not in params or BYTE_SIZE not in params:
            raise InvalidInput(f"{what}: shared memory needs both {REGION} and {BYTE_SIZE}")
        name = _string(params[REGION], f"{what}: {REGION}")
        size = _whole(params[BYTE_SIZE], f"{what}: {BYTE_SIZE}")
        offset = _whole(params[OFFSET], f"{what}: {OFFSET}") if OFFSET in params else 0
        return self._get(owner, name, what), offset, size


def _names_shm(params: MutableMapping[str, Any]) -> bool:
    return any(p in params for p in PARAMETERS)


def _uses_shm(tensors: Iterable[Any]) -> bool:
    return any(_names_shm(t.parameters) for t in tensors)


def _strip(params: MutableMapping[str, Any]) -> None:
    for p in PARAMETERS:
        if p in params:
            del params[p]


def _string(param: pb.InferParameter, what: str) -> str:
    if param.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"{what} must be a string (the region's name)")
    return param.string_param


def _whole(param: pb.InferParameter, what: str) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param") or getattr(param, kind) < 0:
        raise InvalidInput(f"{what} must be a whole, non-negative number of bytes")
    return int(getattr(param, kind))


def json_parameters(params: dict[str, Any], target: MutableMapping[str, Any], what: str) -> bool:
    """Copy the shared memory parameters of a REST tensor's JSON ``parameters`` into a
    protobuf tensor's; True when there were any. JSON strings become string_param and
    integers int64_param; anything else is refused here, naming ``what``."""
    found = False
    for key in PARAMETERS:
        if key not in params:
            continue
        found = True
        value = params[key]
        if isinstance(value, str):
            target[key].string_param = value
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63:
            target[key].int64_param = value
        else:
            raise InvalidInput(
                f"{what}: parameter '{key}' {clip(repr(value))} must be a string (region) "
                "or a whole, non-negative number (bytes)"
            )
    return found
