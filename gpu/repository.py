"""Triton's model repository layout, read with Triton's own ModelConfig protobuf.

    <repo>/<model>/config.pbtxt
    <repo>/<model>/<version>/model.pt      (TorchScript, platform pytorch_libtorch)
    <repo>/<model>/<version>/model.onnx    (ONNX, platform onnxruntime_onnx; gpu/onnx_backend.py)

A model whose config or artifacts are bad is still listed, with ``error`` naming the
file and the problem, so one broken model never stops the server.

The files come from a source (``gpu/sources.py``): a local directory, or with
``s3://bucket/prefix`` an S3-compatible bucket whose artifacts are fetched on demand
into a bounded cache. A version's artifact is verified against its declared sha256
(``gpu/checksums.py``) before it loads, whatever the source.
https://github.com/triton-inference-server/server/blob/main/docs/user_guide/model_repository.md
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from modelpool.gpu.checksums import (
    CONFIG_PARAMETER,
    SIDECAR_SUFFIX,
    Declared,
    config_digest,
    parse_digest,
)
from modelpool.gpu.sources import (
    Artifact,
    ModelFiles,
    RepositorySettings,
    RepositorySource,
    StoredFile,
    local_files,
    open_source,
)
from modelpool.gpu.tensors import DATATYPES
from modelpool.placement.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    RepositoryUnavailable,
)

log = logging.getLogger(__name__)

TORCHSCRIPT_PLATFORM = "pytorch_libtorch"
ONNX_PLATFORM = "onnxruntime_onnx"
#: Platform -> the file a version directory holds unless default_model_filename says.
DEFAULT_FILENAMES = {TORCHSCRIPT_PLATFORM: "model.pt", ONNX_PLATFORM: "model.onnx"}
#: Triton's ``backend:`` names -> the platform each means here.
BACKEND_PLATFORMS = {"pytorch": TORCHSCRIPT_PLATFORM, "onnxruntime": ONNX_PLATFORM}
SUPPORTED_PLATFORMS = set(DEFAULT_FILENAMES)
SUPPORTED_BACKENDS = {*BACKEND_PLATFORMS, ""}
DEFAULT_FILENAME = DEFAULT_FILENAMES[TORCHSCRIPT_PLATFORM]
#: Loaded TorchScript weights take about their file's size; the rest covers the
#: interpreter's buffers and the first forward's activations until a load measures it.
ESTIMATE_HEADROOM = 1.25
ESTIMATE_FLOOR_BYTES = 1 << 20

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
#: NAME_MAX of Linux file systems: a longer name cannot be a directory, and asking the
#: file system about one raises OSError (ENAMETOOLONG) instead of answering "absent".
MAX_NAME_LENGTH = 255
#: Versions are int64 in Triton's protocol; longer digit strings name no version.
MAX_VERSION_DIGITS = 19
#: How much of a client's string (model, tensor, version) an error message repeats.
SHOWN_CHARS = 64


def clip(text: object, limit: int = SHOWN_CHARS) -> str:
    """``text`` for an error message: at most ``limit`` characters, so a client's
    megabyte-long name never comes back megabyte-long in the reply or the log."""
    s = str(text)
    if len(s) <= limit:
        return s
    return f"{s[:limit]}...({len(s)} chars)"


@dataclass(frozen=True)
class TensorSpec:
    """An input or output as configured. ``dims`` exclude the batch dimension; -1 is any."""

    name: str
    datatype: str  # wire name: FP32, INT64, ...
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A model as the repository describes it. ``error`` is set when it cannot serve.

    ``versions`` are those the version policy makes available, ascending, and
    ``artifacts`` maps each to its file.
    """

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    versions: tuple[int, ...]
    artifacts: dict[int, Path]
    config: mc.ModelConfig
    error: str | None = None
    #: Bytes of each version's artifact, measured once by ``read_model``: placement asks
    #: for sizes of every resident model on every plan, and a file deleted since the
    #: scan must not make those plans fail.
    artifact_sizes: dict[int, int] = field(default_factory=dict)
    #: From ``parameters { key: "modelpool.pinned" ... }``: never evicted.
    pinned: bool = False
    #: From ``modelpool.estimated_bytes``: the operator's size before a first load.
    declared_bytes: int | None = None
    #: From ``modelpool.min_copies``: copies kept resident whatever the demand.
    min_copies: int = 0
    #: Per version: what changes when the artifact does (size and mtime locally, the
    #: ETag on S3), recorded by the scan; the poller compares these.
    stamps: dict[int, str] = field(default_factory=dict)
    #: Per version: the sha256 digests declared for its artifact (``modelpool.sha256``
    #: in the config, a ``<artifact>.sha256`` sidecar), checked before each load.
    checksums: dict[int, tuple[Declared, ...]] = field(default_factory=dict)

    @property
    def latest(self) -> int:
        return self.versions[-1]

    def resolve_version(self, version: str | int | None) -> int:
        """The version to serve for a request's version string ('' or None: latest)."""
        if self.error is not None:
            raise ModelNotReady(f"model '{self.name}' is not available: {self.error}")
        if version is None or version in ("", 0):
            return self.latest
        if isinstance(version, str):
            # ASCII digits only: int() would also take " 1", "+1", "1_0" and other
            # scripts' digits, and raise ValueError past 4300 digits.
            if not (version.isascii() and version.isdigit()):
                raise InvalidInput(
                    f"model '{self.name}': version '{clip(version)}' is not a version number "
                    "(digits only)"
                )
            if len(version) > MAX_VERSION_DIGITS:
                raise ModelNotFound(
                    f"model '{self.name}' has no version {clip(version)} "
                    f"(available: {', '.join(map(str, self.versions))})"
                )
        v = int(version)
        if v not in self.versions:
            raise ModelNotFound(
                f"model '{self.name}' has no version {clip(v)} "
                f"(available: {', '.join(map(str, self.versions))})"
            )
        return v

    def artifact_bytes(self, version: int) -> int:
        """The artifact's size when the repository was read (0 for an unknown version);
        never touches the disk, so a file deleted since cannot make this raise."""
        return self.artifact_sizes.get(version, 0)

    def estimated_bytes(self, version: int) -> int:
        """Bytes to reserve before a first load has measured the model (from the
        recorded artifact size; no file system access)."""
        if self.declared_bytes is not None:
            return self.declared_bytes
        return max(ESTIMATE_FLOOR_BYTES, int(self.artifact_bytes(version) * ESTIMATE_HEADROOM))


def check_model_name(name: str) -> None:
    """Reject names that could escape the repository or are not directory names: only
    ASCII letters, digits, '_', '-' and '.', no '..', no leading '.', at most
    MAX_NAME_LENGTH characters."""
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"model name '{clip(name)}' is not allowed: {len(name)} characters, "
            f"at most {MAX_NAME_LENGTH}"
        )
    # A leading '.' would name the repository itself ('.'), its parent ('..') or a
    # hidden directory, which the full scan skips too.
    if not name or not _NAME_RE.fullmatch(name) or ".." in name or name.startswith("."):
        raise InvalidInput(
            f"model name {clip(name)!r} is not allowed (letters, digits, '_', '-', '.')"
        )


class ModelRepository:
    """Reads a repository (a directory, or ``s3://bucket/prefix`` with ``settings``).
    Specs are cached and re-read on ``refresh``.

    Raises:
        ValueError: not a directory, or a bucket that cannot be listed (at start).
    """

    def __init__(self, root: str | Path, settings: RepositorySettings | None = None) -> None:
        self.source: RepositorySource = open_source(root, settings)
        #: A local directory standing for the repository (for S3: its cache folder).
        self.root = self.source.root
        #: What the operator named, for messages and for workers' command lines.
        self.location = self.source.location
        self._specs: dict[str, ModelSpec] = {}
        #: Configs that replace a model's config.pbtxt (Triton's load with a
        #: ``config`` parameter), until a load without one.
        self._overrides: dict[str, mc.ModelConfig] = {}
        self.refresh()

    def refresh(self, name: str | None = None) -> None:
        """Re-read one model (None: the whole repository) from its source. While a
        remote repository is unreachable the models read before keep serving (logged)."""
        if name is None:
            try:
                self._specs = self.scan()
            except RepositoryUnavailable as e:
                log.warning("keeping the models read before: %s", e)
            return
        check_model_name(name)
        self.install(name, self.read(name))

    def scan(self) -> dict[str, ModelSpec]:
        """Every model as the source (and the overrides) describe it now, without
        installing anything: the poller compares this with what serves.

        Raises:
            RepositoryUnavailable: a remote repository cannot be listed (never an empty
                answer, which would read as every model removed).
        """
        found = {}
        for name, files in self.source.models().items():
            if (
                _NAME_RE.fullmatch(name)
                and len(name) <= MAX_NAME_LENGTH
                and not name.startswith(".")
            ):
                found[name] = model_from_files(files, self._overrides.get(name))
        return found

    def read(self, name: str) -> ModelSpec | None:
        """One model as the source (and its override) describe it now, not installed;
        None when its directory is gone. A model read before stands while a remote
        repository is unreachable.

        Raises:
            RepositoryUnavailable: unreachable, and the model was never read.
        """
        check_model_name(name)
        try:
            files = self.source.model(name)
        except RepositoryUnavailable as e:
            known = self._specs.get(name)
            if known is None:
                raise
            log.warning("model %s: using the config read before: %s", name, e)
            return known
        return model_from_files(files, self._overrides.get(name)) if files is not None else None

    def artifact(self, spec: ModelSpec, version: int) -> AbstractContextManager[Path]:
        """``version``'s artifact as a local file whose declared sha256 matched, kept
        (not evicted from a cache) until the block ends.

        Raises:
            ModelLoadError: its checksum does not match (the version never serves).
            RepositoryUnavailable: it had to be fetched and could not be (503).
        """
        path = spec.artifacts[version]
        relpath = f"{version}/{path.name}"
        stamp = spec.stamps.get(version, "")
        stored = StoredFile(spec.artifact_bytes(version), stamp, path)
        declared = spec.checksums.get(version, ())
        return self.source.artifact(Artifact(spec.name, version, relpath, stored, declared))

    def install(self, name: str, spec: ModelSpec | None) -> None:
        """Serve ``spec`` for ``name`` from now on (None: the model is gone)."""
        if spec is None:
            self._specs.pop(name, None)
        else:
            self._specs[name] = spec

    def set_override(self, name: str, config: mc.ModelConfig | None) -> None:
        """Read ``name`` from ``config`` instead of its config.pbtxt (None: from the
        file again). Takes effect at the next read of the model."""
        check_model_name(name)
        if config is None:
            self._overrides.pop(name, None)
        else:
            self._overrides[name] = config

    def override(self, name: str) -> mc.ModelConfig | None:
        return self._overrides.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[ModelSpec]:
        return [self._specs[n] for n in self.names()]

    def get(self, name: str) -> ModelSpec:
        """The spec of ``name``; a model added to disk since the last scan is found too."""
        check_model_name(name)
        spec = self._specs.get(name)
        if spec is None:
            self.refresh(name)
            spec = self._specs.get(name)
        if spec is None:
            raise model_not_found(name)
        return spec


def config_from_json(name: str, text: str) -> mc.ModelConfig:
    """A model config given as JSON (Triton's repository load ``config`` parameter),
    checked against Triton's ModelConfig message.

    Raises:
        InvalidInput: not JSON, or not a ModelConfig (400 naming the model).
    """
    from google.protobuf import json_format

    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except (json_format.ParseError, ValueError, RecursionError) as e:
        raise InvalidInput(
            f"model '{name}': the load request's config is not a valid model config "
            f"(JSON of Triton's ModelConfig): {clip(e, 200)}"
        ) from None
    return config


def model_not_found(name: str) -> ModelNotFound:
    """The error for a name the repository does not hold: one message wherever it is
    raised, so that no caller can tell two kinds of absence apart."""
    return ModelNotFound(f"model '{name}' is not in the model repository")


def _tensor(t: mc.ModelInput | mc.ModelOutput, where: str) -> TensorSpec:
    dt = mc.DataType.Name(t.data_type)
    if not dt.startswith("TYPE_") or dt[5:] == "INVALID":
        raise ValueError(f"{where} '{t.name}' has no data_type")
    wire = "BYTES" if dt == "TYPE_STRING" else dt[5:]
    if wire not in DATATYPES:  # every Triton datatype is served; this is a newer one
        raise ValueError(f"{where} '{t.name}': data_type {dt} is not supported by modelpool")
    dims = tuple(int(d) for d in t.dims)
    if not dims and not t.HasField("reshape"):
        raise ValueError(f"{where} '{t.name}' has no dims")
    return TensorSpec(name=t.name, datatype=wire, dims=dims)


def _versions(files: ModelFiles, config: mc.ModelConfig, filename: str) -> dict[int, StoredFile]:
    """Version -> its artifact as listed, under the version policy."""
    listed: dict[int, StoredFile] = {}
    for rel, stored in files.files.items():
        head, _, name = rel.partition("/")
        if name == filename and head.isascii() and head.isdigit() and int(head) > 0:
            listed[int(head)] = stored
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice") or "latest"
    if kind == "all":
        chosen = sorted(listed)
    elif kind == "specific":
        chosen = sorted(v for v in policy.specific.versions if v in listed)
    else:
        n = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions else 1
        chosen = sorted(listed)[-n:]
    return {v: listed[v] for v in chosen}


def read_model(model_dir: Path, override: mc.ModelConfig | None = None) -> ModelSpec:
    """Parse one local model directory; problems land in ``error``, never raise.
    ``override`` stands in for its config.pbtxt (a load request's config)."""
    return model_from_files(local_files(model_dir), override)


def model_from_files(files: ModelFiles, override: mc.ModelConfig | None = None) -> ModelSpec:
    """Parse one model as its source listed it; problems land in ``error``. Raises
    only RepositoryUnavailable (a remote source that stopped answering)."""
    name = files.name
    config = mc.ModelConfig()
    cfg_path = f"{files.where}/" + ("config.pbtxt" if override is None else "config override")

    def failed(reason: str) -> ModelSpec:
        log.warning("model %s is unavailable: %s", name, reason)
        return ModelSpec(name, config.platform, 0, (), (), (), {}, config, error=reason)

    if files.error is not None:
        return failed(files.error)
    try:
        return _read_model(files, name, config, cfg_path, failed, override)
    except OSError as e:
        # Unreadable, or changed under us while being read: listed with the reason.
        return failed(f"{files.where}: {e.strerror or e}")


def _read_model(
    files: ModelFiles,
    name: str,
    config: mc.ModelConfig,
    cfg_path: str,
    failed: Callable[[str], ModelSpec],
    override: mc.ModelConfig | None = None,
) -> ModelSpec:
    if override is not None:
        config.CopyFrom(override)
    elif "config.pbtxt" not in files.files:
        return failed(f"{cfg_path} is missing")
    else:
        try:
            text_format.Parse(files.read_text("config.pbtxt"), config)
        except (text_format.ParseError, UnicodeDecodeError) as e:
            return failed(f"{cfg_path}: {e}")
    if config.name and config.name != name:
        return failed(f"{cfg_path}: name '{config.name}' does not match directory '{name}'")
    config.name = name
    # Triton names a model's framework by platform, backend or both; both must agree.
    platform = config.platform or BACKEND_PLATFORMS.get(config.backend, "")
    if platform not in SUPPORTED_PLATFORMS or (
        config.backend and BACKEND_PLATFORMS.get(config.backend) != platform
    ):
        named = " with ".join(
            f"{k} '{v}'"
            for k, v in (("platform", config.platform), ("backend", config.backend))
            if v
        )
        return failed(
            f"{cfg_path}: {f'{named} is not supported' if named else 'names no platform'} "
            "(modelpool serves pytorch_libtorch TorchScript models and, with onnxruntime "
            "installed, onnxruntime_onnx ONNX models)"
        )
    config.platform = platform
    if config.max_batch_size < 0:
        return failed(f"{cfg_path}: max_batch_size must be >= 0")
    try:
        inputs = tuple(_tensor(t, "input") for t in config.input)
        outputs = tuple(_tensor(t, "output") for t in config.output)
    except ValueError as e:
        return failed(f"{cfg_path}: {e}")
    if not inputs or not outputs:
        return failed(f"{cfg_path}: a model needs at least one input and one output")
    filename = config.default_model_filename or DEFAULT_FILENAMES[config.platform]
    if "/" in filename or filename.startswith("."):
        return failed(f"{cfg_path}: default_model_filename '{filename}' is not a file name")
    artifacts = _versions(files, config, filename)
    if not artifacts:
        return failed(
            f"{files.where}: no version directory holds {filename} under the version policy"
        )
    try:
        pinned, declared, min_copies = _modelpool_parameters(config)
        config_sha = config.parameters.get(CONFIG_PARAMETER)
        model_digest = config_digest(config_sha.string_value) if config_sha is not None else None
    except ValueError as e:
        return failed(f"{cfg_path}: {e}")
    checksums = {v: _declared(files, f"{v}/{filename}", model_digest, cfg_path) for v in artifacts}
    return ModelSpec(
        name=name,
        platform=config.platform,
        max_batch_size=config.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        versions=tuple(sorted(artifacts)),
        artifacts={v: stored.path for v, stored in artifacts.items()},
        config=config,
        artifact_sizes={v: stored.size for v, stored in artifacts.items()},
        pinned=pinned,
        declared_bytes=declared,
        min_copies=min_copies,
        stamps={v: stored.stamp for v, stored in artifacts.items()},
        checksums=checksums,
    )


def _declared(
    files: ModelFiles, artifact: str, model_digest: str | None, cfg_path: str
) -> tuple[Declared, ...]:
    """The digests declared for one artifact: the config's, and its sidecar's."""
    found = []
    if model_digest is not None:
        found.append(Declared(model_digest, f"{CONFIG_PARAMETER} in {cfg_path}"))
    sidecar = artifact + SIDECAR_SUFFIX
    if sidecar in files.files:
        where = f"{files.where}/{sidecar}"
        try:
            text = files.read_text(sidecar)
        except UnicodeDecodeError:
            text = ""
        except FileNotFoundError:
            return tuple(found)  # removed since the listing
        found.append(Declared(parse_digest(text), where))
    return tuple(found)


def _modelpool_parameters(config: mc.ModelConfig) -> tuple[bool, int | None, int]:
    """modelpool's own settings ride in Triton's free-form ``parameters`` map, so the
    same config.pbtxt still loads in Triton."""
    params = {k: v.string_value for k, v in config.parameters.items()}
    pinned_text = params.get("modelpool.pinned", "false").strip().lower()
    if pinned_text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"parameter modelpool.pinned must be true or false, not '{pinned_text}'")
    declared = params.get("modelpool.estimated_bytes")
    if declared is not None:
        from modelpool.placement.units import parse_size

        declared_bytes: int | None = parse_size(declared)
    else:
        declared_bytes = None
    min_text = params.get("modelpool.min_copies", "0").strip()
    if not min_text.isdigit():
        raise ValueError(f"parameter modelpool.min_copies must be a whole number, not '{min_text}'")
    return pinned_text in ("true", "1", "yes"), declared_bytes, int(min_text)
