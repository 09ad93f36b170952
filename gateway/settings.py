"""Triton's logging and trace extensions: the gateway's log settings, applied to its
Python logging, and trace settings, stored and returned but never acted on.

https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_logging.md
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_trace.md

Log settings map onto the gateway process's logging (workers keep their own
``--log-level``; their lines relayed by the supervisor are the gateway's INFO lines):

- ``log_verbose_level`` > 0: the ``modelpool`` loggers log DEBUG;
- ``log_info`` / ``log_warning`` / ``log_error``: records of that severity (ERROR
  includes CRITICAL) reach the log or not; Triton's flags are independent, so a filter
  on the root handlers drops a disabled severity that a logger level cannot skip;
- ``log_format``: ``default`` (the ``--log-level`` format) or ``ISO8601`` (the same
  lines, timestamps as ISO 8601 UTC);
- ``log_file``: always ``""`` (stderr); Triton also refuses to move the log file over
  the network.

Trace settings are accepted and reported as Triton reports them (global, and per
model falling back to global), but modelpool produces no traces: a ``trace_level``
other than ``OFF`` is refused with ``TracingNotImplemented``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from modelpool.gpu.repository import clip
from modelpool.placement.errors import InvalidInput, TracingNotImplemented

log = logging.getLogger(__name__)

LOG_FORMATS = ("default", "ISO8601")
TRACE_LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")

LogValue = bool | int | str


# -- logging ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LogSettings:
    """Triton's log settings, as ``GET /v2/logging`` renders them."""

    log_file: str
    log_info: bool
    log_warning: bool
    log_error: bool
    log_verbose_level: int
    log_format: str

    def as_dict(self) -> dict[str, LogValue]:
        return dataclasses.asdict(self)


_LOG_KEYS = tuple(f.name for f in dataclasses.fields(LogSettings))


class _Iso8601Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=UTC)
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _SeverityFilter(logging.Filter):
    """Drops records of a severity the settings turned off (on the root handlers, as a
    filter on a logger would not see records propagated from its children)."""

    def __init__(self, control: LogControl) -> None:
        super().__init__()
        self.control = control

    def filter(self, record: logging.LogRecord) -> bool:
        s = self.control.settings
        if s is None:
            return True
        if record.levelno >= logging.ERROR:
            return s.log_error
        if record.levelno >= logging.WARNING:
            return s.log_warning
        if record.levelno >= logging.INFO:
            return s.log_info
        return s.log_verbose_level > 0


class LogControl:
    """The gateway's log settings. Nothing changes in ``logging`` until the first
    ``update``; until then the settings read what ``--log-level`` configured.

    Args:
        logger: the loggers the verbose level governs (default: ``modelpool``).
        root: whose handlers get the severity filter and the format (default: root).
    """

    def __init__(
        self, logger: logging.Logger | None = None, root: logging.Logger | None = None
    ) -> None:
        self._logger = logger if logger is not None else logging.getLogger("modelpool")
        self._root = root if root is not None else logging.getLogger()
        #: What ``--log-level`` configured: the value a cleared setting returns to.
        self._defaults: LogSettings | None = None
        #: None until the first update: logging is then exactly as configured.
        self.settings: LogSettings | None = None
        self._filter = _SeverityFilter(self)
        self._formatters: weakref.WeakKeyDictionary[logging.Handler, logging.Formatter | None]
        self._formatters = weakref.WeakKeyDictionary()

    def defaults(self) -> LogSettings:
        if self._defaults is None:
            level = self._logger.getEffectiveLevel()
            self._defaults = LogSettings(
                log_file="",
                log_info=level <= logging.INFO,
                log_warning=level <= logging.WARNING,
                log_error=level <= logging.ERROR,
                log_verbose_level=1 if level <= logging.DEBUG else 0,
                log_format="default",
            )
        return self._defaults

    def current(self) -> LogSettings:
        return self.settings if self.settings is not None else self.defaults()

    def update(self, changes: Mapping[str, LogValue | None]) -> LogSettings:
        """Apply ``changes`` (None: back to the startup value) all at once, or none of
        them: every value is checked first.

        Raises:
            InvalidInput: an unknown setting, a value of the wrong type, an unknown
                format, or a log file other than "".
        """
        values: dict[str, Any] = self.current().as_dict()
        defaults = self.defaults().as_dict()
        for key, value in changes.items():
            values[key] = defaults[key] if value is None else _log_value(key, value)
        new = LogSettings(**values)
        old = self.current()
        self.settings = new
        self._apply(new)
        if new != old:
            log.info("log settings changed: %s", _diff(old.as_dict(), new.as_dict()))
        log.debug("log settings now %s", new.as_dict())
        return new

    def _apply(self, s: LogSettings) -> None:
        if s.log_verbose_level > 0:
            level = logging.DEBUG
        elif s.log_info:
            level = logging.INFO
        elif s.log_warning:
            level = logging.WARNING
        elif s.log_error:
            level = logging.ERROR
        else:
            level = logging.CRITICAL + 1
        self._logger.setLevel(level)
        for handler in self._root.handlers:
            if self._filter not in handler.filters:
                handler.addFilter(self._filter)
            if handler not in self._formatters:
                self._formatters[handler] = handler.formatter
            original = self._formatters[handler]
            if s.log_format == "ISO8601":
                # Formatter keeps its format string in ``_fmt``; the same lines, other stamps.
                handler.setFormatter(_Iso8601Formatter(getattr(original, "_fmt", None)))
            else:
                handler.setFormatter(original)


def _log_value(key: str, value: object) -> LogValue:
    if key not in _LOG_KEYS:
        raise InvalidInput(
            f"log setting '{clip(key)}' is unknown: the settings are {', '.join(_LOG_KEYS)}"
        )
    if key in ("log_info", "log_warning", "log_error"):
        if not isinstance(value, bool):
            raise InvalidInput(f"log setting '{key}' must be a boolean, not {clip(value)!r}")
        return value
    if key == "log_verbose_level":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(
                f"log setting 'log_verbose_level' must be an integer >= 0, not {clip(value)!r}"
            )
        return value
    if not isinstance(value, str):
        raise InvalidInput(f"log setting '{key}' must be a string, not {clip(value)!r}")
    if key == "log_format" and value not in LOG_FORMATS:
        raise InvalidInput(
            f"log setting 'log_format' must be one of {', '.join(LOG_FORMATS)}, not {clip(value)!r}"
        )
    if key == "log_file" and value:
        raise InvalidInput(
            "log setting 'log_file' cannot be changed over the network: the gateway logs to stderr"
        )
    return value


def _diff(old: Mapping[str, object], new: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={new[k]!r}" for k in new if old.get(k) != new[k])


# -- trace settings --------------------------------------------------------------------

TraceValues = dict[str, tuple[str, ...]]

#: Triton's defaults; every value is a list of strings in its protocol.
TRACE_DEFAULTS: Mapping[str, tuple[str, ...]] = {
    "trace_level": ("OFF",),
    "trace_rate": ("1000",),
    "trace_count": ("-1",),
    "log_frequency": ("0",),
    "trace_file": ("",),
    "trace_mode": ("triton",),
}
#: Integer settings and their smallest value.
_TRACE_INTS = {"trace_rate": 0, "trace_count": -1, "log_frequency": 0}
#: Settings fixed at start: Triton does not move its trace file over the network either.
_TRACE_FIXED = ("trace_file", "trace_mode")


class TraceSettings:
    """Global trace settings and per-model overrides. A model's settings are the
    global ones with its overrides on top; clearing a model's setting (None) makes it
    follow the global one again, clearing a global one restores the default."""

    def __init__(self) -> None:
        self._global: TraceValues = dict(TRACE_DEFAULTS)
        self._models: dict[str, TraceValues] = {}

    def get(self, model: str = "") -> TraceValues:
        """The settings of ``model`` ("" for the global ones)."""
        return {**self._global, **self._models.get(model, {})}

    def update(self, model: str, changes: Mapping[str, Sequence[str] | None]) -> TraceValues:
        """Apply ``changes`` to ``model`` ("" for the global settings), all or none.

        Raises:
            InvalidInput: an unknown setting or level, a malformed number, a fixed
                setting changed.
            TracingNotImplemented: a trace level other than OFF.
        """
        where = f"model '{clip(model)}'" if model else "global trace settings"
        checked = {
            key: None if not value else _trace_value(where, key, tuple(value))
            for key, value in changes.items()
        }
        target = self._models.setdefault(model, {}) if model else self._global
        for key, value in checked.items():
            if value is not None:
                target[key] = value
            elif model:
                target.pop(key, None)
            else:
                target[key] = TRACE_DEFAULTS[key]
        if model and not target:
            del self._models[model]
        return self.get(model)


def _trace_value(where: str, key: str, value: tuple[str, ...]) -> tuple[str, ...]:
    if key not in TRACE_DEFAULTS:
        raise InvalidInput(
            f"{where}: trace setting '{clip(key)}' is unknown: the settings are "
            f"{', '.join(TRACE_DEFAULTS)}"
        )
    if key == "trace_level":
        unknown = [v for v in value if v not in TRACE_LEVELS]
        if unknown:
            raise InvalidInput(
                f"{where}: trace_level {clip(unknown[0])!r} is unknown: the levels are "
                f"{', '.join(TRACE_LEVELS)}"
            )
        asked = [v for v in value if v != "OFF"]
        if asked:
            raise TracingNotImplemented(
                f"{where}: trace_level {asked[0]} is not available: modelpool does not "
                "implement tracing; only OFF is accepted"
            )
        return ("OFF",)
    if len(value) != 1:
        raise InvalidInput(f"{where}: trace setting '{key}' takes one value, not {len(value)}")
    if key in _TRACE_FIXED:
        if value != TRACE_DEFAULTS[key]:
            raise InvalidInput(f"{where}: trace setting '{key}' cannot be changed over the network")
        return value
    try:
        number = int(value[0])
    except ValueError:
        number = None
    if number is None or number < _TRACE_INTS[key]:
        raise InvalidInput(
            f"{where}: trace setting '{key}' must be an integer >= {_TRACE_INTS[key]}, "
            f"not {clip(value[0])!r}"
        )
    return (str(number),)


# -- wire forms ------------------------------------------------------------------------


def json_settings(body: bytes, what: str) -> dict[str, Any]:
    """A POST body of settings: a JSON object (empty body: no changes)."""
    try:
        doc = json.loads(body) if body.strip() else {}
    except (ValueError, RecursionError) as e:
        raise InvalidInput(f"{what}: body is not valid JSON: {clip(e, 200)}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what}: body must be a JSON object of settings")
    return doc


def trace_changes_from_json(doc: Mapping[str, Any], what: str) -> dict[str, tuple[str, ...] | None]:
    """Triton's REST form: a string, a list of strings, or null (clear)."""
    changes: dict[str, tuple[str, ...] | None] = {}
    for key, value in doc.items():
        if value is None:
            changes[key] = None
        elif isinstance(value, str):
            changes[key] = (value,)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            changes[key] = tuple(value)
        else:
            raise InvalidInput(
                f"{what}: trace setting '{clip(key)}' must be a string, a list of strings or null"
            )
    return changes


def trace_json(values: TraceValues) -> dict[str, str | list[str]]:
    """As Triton's REST renders them: trace_level a list, the others a string."""
    return {k: list(v) if k == "trace_level" else (v[0] if v else "") for k, v in values.items()}


def trace_changes_from_grpc(
    request: pb.TraceSettingRequest,
) -> dict[str, tuple[str, ...] | None]:
    """An empty SettingValue clears the setting (tritonclient's ``None``)."""
    return {k: tuple(v.value) or None for k, v in request.settings.items()}


def trace_grpc(values: TraceValues) -> pb.TraceSettingResponse:
    resp = pb.TraceSettingResponse()
    for key, value in values.items():
        resp.settings[key].value.extend(value)
    return resp


def log_changes_from_grpc(request: pb.LogSettingsRequest) -> dict[str, LogValue | None]:
    """An empty SettingValue puts the setting back to its startup value."""
    changes: dict[str, LogValue | None] = {}
    for key, value in request.settings.items():
        kind = value.WhichOneof("parameter_choice")
        changes[key] = getattr(value, kind) if kind is not None else None
    return changes


def log_grpc(settings: LogSettings) -> pb.LogSettingsResponse:
    resp = pb.LogSettingsResponse()
    for key, value in settings.as_dict().items():
        if isinstance(value, bool):
            resp.settings[key].bool_param = value
        elif isinstance(value, int):
            resp.settings[key].uint32_param = value
        else:
            resp.settings[key].string_param = value
    return resp
