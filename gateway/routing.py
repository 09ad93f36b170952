"""Aliases and canary splits: a public model name served by weighted targets.

The routing file (``--routing FILE``, YAML) maps public names to targets::

    fraud:                                   # canary v4 of fraud in place
      targets:
        - {model: fraud, version: 3, weight: 90}
        - {model: fraud, version: 4, weight: 10}
    scoring:                                 # an alias of a model's latest version
      targets: [{model: scoring-2026-11}]

A target is a model of the repository, never another route; without ``version`` it is
the model's latest version under its version policy. Weights are non-negative numbers
(with two targets or more every target needs one; at least one must be above 0); a
target of weight 0 gets no traffic but can still be pinned. A route wins over a model of
the same name, so ``fraud`` can be canaried in place.

Per request (``RouteHints``, filled by the REST and gRPC edges):

- pin: header / gRPC metadata ``modelpool-target: MODEL[:VERSION]`` or the request
  parameter ``modelpool_target`` (the parameter wins over the header): only targets of
  the route matching it; one that matches none is a 400 naming the route and the pin.
- session: header / metadata ``modelpool-session`` or parameter ``modelpool_session``:
  the same key always gets the same target while the weights stay the same (a hash of
  route and key placed in the cumulative weights), and keys spread as the weights say.

``Router`` holds the table in use: ``reload`` and ``set_route``/``delete_route`` swap it
in one assignment, so a request that chose a target keeps it and the next one sees the
new weights; a file that does not parse is logged and the old table kept (as the auth
config, ``gateway/tenants.py``).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from modelpool.gateway.filewatch import read_yaml, signature, watch
from modelpool.gpu.repository import check_model_name, clip
from modelpool.placement.errors import InvalidInput, ModelNotFound, ModelpoolError

log = logging.getLogger(__name__)

PIN_HEADER = "modelpool-target"
SESSION_HEADER = "modelpool-session"
PIN_PARAMETER = "modelpool_target"
SESSION_PARAMETER = "modelpool_session"
_ROUTE_FIELDS = frozenset({"targets"})
_TARGET_FIELDS = frozenset({"model", "version", "weight"})
#: Bounds what a header or parameter may make us hash or echo.
_MAX_HINT = 1024


class RoutingError(ValueError):
    """A routing table cannot be used; the message names the file, route and problem.
    A ValueError so that a bad file at start fails ``modelpool serve`` with its message."""


@dataclass(frozen=True)
class Target:
    """One model (and version; None: its latest) a route sends a share of requests to."""

    model: str
    version: int | None
    weight: float

    def __str__(self) -> str:
        return self.model if self.version is None else f"{self.model}:{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "weight": self.weight}


@dataclass(frozen=True)
class RouteHints:
    """What a request says about its route: a pin (``MODEL[:VERSION]``) and a session
    key, from headers or metadata at the edge, or from request parameters (which win)."""

    pin: str | None = None
    session: str | None = None

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, object]]) -> RouteHints:
        """From HTTP headers or gRPC metadata (names compared case-insensitively)."""
        pin = session = None
        for key, value in pairs:
            if not isinstance(value, str):
                continue
            k = key.lower()
            if k == PIN_HEADER:
                pin = value
            elif k == SESSION_HEADER:
                session = value
        return cls(pin, session)

    def over(self, pin: str | None, session: str | None) -> RouteHints:
        """These hints with ``pin``/``session`` (request parameters) taking precedence."""
        return RouteHints(pin if pin is not None else self.pin,
                          session if session is not None else self.session)  # fmt: skip


@dataclass(frozen=True)
class Route:
    """A public name and its targets. ``choose`` is pure but for the random draw of an
    unsticky request."""

    name: str
    targets: tuple[Target, ...]
    #: Where it came from: the file's path, or "runtime" for an admin edit.
    source: str = ""
    _cumulative: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        total = 0.0
        cumulative = []
        for t in self.targets:
            total += t.weight
            cumulative.append(total)
        object.__setattr__(self, "_cumulative", tuple(cumulative))

    @property
    def total_weight(self) -> float:
        return self._cumulative[-1] if self._cumulative else 0.0

    def choose(self, hints: RouteHints = RouteHints(), rng: random.Random | None = None) -> Target:
        """The target for one request: among the pinned targets if pinned, by a hash of
        the session key if any, else at random, each in proportion to its weight.

        Raises:
            InvalidInput: a pin that is malformed or matches none of the targets.
        """
        if hints.pin is not None:
            targets = self._pinned(hints.pin)
        else:
            targets = self.targets
        if len(targets) == 1:
            return targets[0]
        if targets is self.targets:
            cumulative = self._cumulative
        else:
            acc, sums = 0.0, []
            for t in targets:
                acc += t.weight
                sums.append(acc)
            cumulative = tuple(sums)
        total = cumulative[-1]
        if total <= 0:  # only weight-0 targets pinned: the first of them
            return targets[0]
        if hints.session is not None:
            u = _unit_hash(self.name, hints.session)
        else:
            u = (rng or _RNG).random()
        # bisect_right skips weight-0 targets (their sum equals the one before);
        # min() guards u * total rounding up to total.
        i = bisect.bisect_right(cumulative, u * total)
        i = min(i, len(targets) - 1)
        while targets[i].weight <= 0:  # only after rounding at the very top
            i -= 1
        return targets[i]

    def _pinned(self, pin: str) -> tuple[Target, ...]:
        """The targets a pin ``MODEL`` (every target of that model) or
        ``MODEL:VERSION`` (that one) names."""
        listed = ", ".join(str(t) for t in self.targets)
        model, sep, version_text = pin.strip().partition(":")
        version: int | None = None
        if sep:
            if not (version_text.isascii() and version_text.isdigit() and len(version_text) < 19):
                raise InvalidInput(
                    f"route '{self.name}': target {clip(pin)!r} is not MODEL[:VERSION] "
                    f"(targets: {listed})"
                )
            version = int(version_text)
        found = tuple(
            t for t in self.targets
            if t.model == model and (not sep or t.version == version)
        )  # fmt: skip
        if not found:
            raise InvalidInput(
                f"route '{self.name}': target {clip(pin)!r} is not one of its targets ({listed})"
            )
        return found

    def with_version(self, version: int, latest: Callable[[str], int | None]) -> Route:
        """The route narrowed to the targets of ``version`` (a request or metadata call
        that names a version of a route); a target without a version is its model's
        ``latest(model)`` (None: unknown).

        Raises:
            ModelNotFound: no target has that version.
        """
        found = tuple(
            t for t in self.targets
            if (t.version if t.version is not None else latest(t.model)) == version
        )  # fmt: skip
        if not found:
            raise ModelNotFound(
                f"route '{self.name}' has no target of version {version} "
                f"(targets: {', '.join(str(t) for t in self.targets)})"
            )
        return Route(self.name, found, self.source)

    def as_dict(self) -> dict[str, Any]:
        total = self.total_weight
        return {
            "name": self.name,
            "source": self.source,
            "targets": [
                {**t.as_dict(), "share": (t.weight / total) if total > 0 else 0.0}
                for t in self.targets
            ],
        }


_RNG = random.Random()


def _unit_hash(route: str, session: str) -> float:
    """A number in [0, 1) fixed by route and session key: stable across processes and
    restarts (not Python's salted ``hash``), so every gateway sends a key the same way."""
    digest = hashlib.blake2b(f"{route}\0{session}".encode(errors="replace"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2.0**64


@dataclass(frozen=True)
class RoutingTable:
    """Every route by public name."""

    routes: tuple[Route, ...] = ()
    source: str = ""
    _by_name: Mapping[str, Route] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {r.name: r for r in self.routes})

    def get(self, name: str) -> Route | None:
        return self._by_name.get(name)

    def with_route(self, route: Route) -> RoutingTable:
        kept = tuple(r for r in self.routes if r.name != route.name)
        return RoutingTable(tuple(sorted((*kept, route), key=lambda r: r.name)), self.source)

    def without(self, name: str) -> RoutingTable:
        return RoutingTable(tuple(r for r in self.routes if r.name != name), self.source)


# -- parsing -------------------------------------------------------------------------------


def load_routing(path: str | os.PathLike[str]) -> RoutingTable:
    """Read and validate the routing file at ``path``.

    Raises:
        RoutingError: unreadable file, bad YAML, or a bad route (the message names it).
    """
    doc = read_yaml(path, "routing file", RoutingError)
    return parse_routing(doc, str(path))


def parse_routing(doc: object, source: str = "<routing>") -> RoutingTable:
    """Validate a loaded YAML document: ``{NAME: {targets: [...]}, ...}`` (an empty
    file is an empty table)."""
    if doc is None:
        return RoutingTable((), source)
    if not isinstance(doc, Mapping):
        raise RoutingError(
            f"routing file {source}: expected a mapping of public names to "
            "{targets: [{model: M, version: V, weight: W}, ...]}"
        )
    routes = [
        parse_route(name, body, f"routing file {source}: ", source) for name, body in doc.items()
    ]
    return RoutingTable(tuple(sorted(routes, key=lambda r: r.name)), source)


def parse_route(name: object, body: object, where: str = "", source: str = "") -> Route:
    """One route from its name and ``{targets: [...]}``; the message of any error starts
    with ``where`` and names the route, the target and the field."""
    if not isinstance(name, str):
        raise RoutingError(f"{where}route name {name!r} is not a string")
    try:
        check_model_name(name)
    except InvalidInput as e:
        raise RoutingError(f"{where}route {clip(name)!r}: {e.message}") from None
    here = f"{where}route '{name}'"
    if not isinstance(body, Mapping):
        raise RoutingError(f"{here}: expected {{targets: [{{model: M, version: V, weight: W}}]}}")
    unknown = sorted(str(k) for k in body if k not in _ROUTE_FIELDS)
    if unknown:
        raise RoutingError(f"{here}: unknown field(s) {', '.join(unknown)} (known: targets)")
    entries = body.get("targets")
    if not isinstance(entries, list) or not entries:
        raise RoutingError(f"{here}: 'targets' must be a non-empty list")
    targets: list[Target] = []
    for i, entry in enumerate(entries):
        target = _parse_target(entry, f"{here}: targets[{i}]", weighted=len(entries) > 1)
        if any((t.model, t.version) == (target.model, target.version) for t in targets):
            raise RoutingError(f"{here}: target {target} is listed twice")
        targets.append(target)
    if not any(t.weight > 0 for t in targets):
        raise RoutingError(f"{here}: every weight is 0; at least one target needs traffic")
    return Route(name, tuple(targets), source)


def _parse_target(entry: object, where: str, *, weighted: bool) -> Target:
    if not isinstance(entry, Mapping):
        raise RoutingError(f"{where}: expected {{model: M, version: V, weight: W}}")
    unknown = sorted(str(k) for k in entry if k not in _TARGET_FIELDS)
    if unknown:
        raise RoutingError(
            f"{where}: unknown field(s) {', '.join(unknown)} (known: model, version, weight)"
        )
    model = entry.get("model")
    if not isinstance(model, str):
        raise RoutingError(f"{where}: field 'model': expected a model name")
    try:
        check_model_name(model)
    except InvalidInput as e:
        raise RoutingError(f"{where}: field 'model': {e.message}") from None
    version = entry.get("version")
    if isinstance(version, str) and version.isascii() and version.isdigit():
        version = int(version)
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or not 0 < version < 2**63
    ):
        raise RoutingError(
            f"{where} (model '{model}'): field 'version': {clip(repr(version))} is not a version "
            "number (a positive whole number; leave it out for the latest)"
        )
    weight = entry.get("weight")
    if weight is None:
        if weighted:
            raise RoutingError(
                f"{where} (model '{model}'): field 'weight' is required when a route has "
                "several targets"
            )
        weight = 1
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not 0 <= weight < float("inf")
    ):
        raise RoutingError(
            f"{where} (model '{model}'): field 'weight': {clip(repr(weight))} is not a "
            "non-negative number"
        )
    return Target(model, version, float(weight))


def parse_target_spec(text: str) -> dict[str, Any]:
    """``MODEL[:VERSION]=WEIGHT`` (the CLI's form) as a target mapping for the admin
    endpoint; raises ValueError saying what is wrong."""
    left, sep, weight_text = text.rpartition("=")
    if not sep or not left:
        raise ValueError(f"target {text!r} is not MODEL[:VERSION]=WEIGHT")
    model, colon, version_text = left.partition(":")
    try:
        weight = float(weight_text)
    except ValueError:
        raise ValueError(f"target {text!r}: weight {weight_text!r} is not a number") from None
    entry: dict[str, Any] = {
        "model": model,
        "weight": int(weight) if weight.is_integer() else weight,
    }
    if colon:
        if not (version_text.isascii() and version_text.isdigit()):
            raise ValueError(f"target {text!r}: version {version_text!r} is not a number")
        entry["version"] = int(version_text)
    return entry


# -- the table in use, and reloads -------------------------------------------------------------


#: Checks a route against the repository: raises RoutingError for a target that names
#: a model or version it does not hold.
RouteCheck = Callable[[Route], None]


class Router:
    """The routing table in use.

    ``path`` None: no routing file; routes come only from admin edits. ``reload`` reads
    the file and replaces the whole table, runtime edits included (the file is what an
    operator versions and reviews; an edit made with ``modelpool route set`` lasts until
    the file next changes or SIGHUP). ``check`` validates each route's targets against
    the repository: at start a bad table fails the start, on reload it is logged and the
    old table kept, on an admin edit it is a 400.
    """

    def __init__(self, path: str | None = None, check: RouteCheck | None = None) -> None:
        self.path = path
        self.check = check
        self.table = RoutingTable()
        self._seen: tuple[int, int, int] | None = None
        if path is not None:
            self._seen = signature(path)
            self.table = self._load(path)

    def _load(self, path: str) -> RoutingTable:
        table = load_routing(path)
        if self.check is not None:
            for route in table.routes:
                self.check(route)
        return table

    def get(self, name: str) -> Route | None:
        return self.table.get(name)

    def reload(self) -> bool:
        """Re-read the file; True when the new table is in use. A bad file is logged
        (naming the route and problem) and the old table kept."""
        if self.path is None:
            log.info("no --routing file: nothing to reload (routes set at run time stay)")
            return False
        self._seen = signature(self.path)
        try:
            table = self._load(self.path)
        except RoutingError as e:
            log.error("routing file not reloaded, keeping the previous routes: %s", e)
            return False
        self.table = table
        log.info(
            "routing reloaded from %s: %d routes (%s)",
            self.path,
            len(table.routes),
            ", ".join(r.name for r in table.routes) or "none",
        )
        return True

    def set_route(self, name: str, body: object) -> Route:
        """Add or replace route ``name`` from ``{targets: [...]}`` (an admin edit).

        Raises:
            InvalidInput: the route or a target is malformed, or names a model or
                version the repository does not hold (the message says which).
        """
        try:
            route = parse_route(name, body, source="runtime")
            if self.check is not None:
                self.check(route)
        except RoutingError as e:
            raise InvalidInput(str(e)) from None
        self.table = self.table.with_route(route)
        log.info(
            "route %s set at run time: %s",
            name,
            ", ".join(f"{t}={t.weight:g}" for t in route.targets),
        )
        return route

    def delete_route(self, name: str) -> None:
        """Drop route ``name`` (an admin edit). Raises ModelNotFound if there is none."""
        if self.table.get(name) is None:
            raise ModelNotFound(f"route '{clip(name)}' does not exist")
        self.table = self.table.without(name)
        log.info("route %s deleted at run time", name)

    async def watch(self, interval_s: float = 1.0) -> None:
        """Reload whenever the file changes (mtime, size or inode), checking every
        ``interval_s`` seconds; runs until cancelled."""
        if self.path is not None:
            await watch(self.path, lambda: self._seen, self.reload, "routing file", interval_s)


def repository_check(get_versions: Callable[[str], tuple[int, ...]]) -> RouteCheck:
    """A ``RouteCheck`` over ``get_versions(model)``: the versions the repository holds
    of a model (raising ModelpoolError when it holds no such model)."""

    def check(route: Route) -> None:
        for t in route.targets:
            try:
                versions = get_versions(t.model)
            except ModelpoolError as e:
                raise RoutingError(f"route '{route.name}': target {t}: {e.message}") from None
            if t.version is not None and t.version not in versions:
                raise RoutingError(
                    f"route '{route.name}': target {t}: model '{t.model}' has no version "
                    f"{t.version} (available: {', '.join(map(str, versions)) or 'none'})"
                )

    return check


def hint_text(value: object, what: str) -> str | None:
    """A pin or session given as a request parameter: a string, bounded in length.

    Raises:
        InvalidInput: not a string, or too long.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"parameter '{what}' must be a string")
    if len(value) > _MAX_HINT:
        raise InvalidInput(f"parameter '{what}' is over {_MAX_HINT} characters")
    return value


def copy_route_parameters(doc: Mapping[str, Any], request: pb.ModelInferRequest) -> None:
    """Carry a REST body's ``parameters.modelpool_target``/``modelpool_session`` into
    the request's parameters, where the data plane reads them for gRPC too.

    Raises:
        InvalidInput: a value that is not a string, or too long.
    """
    params = doc.get("parameters")
    if not isinstance(params, Mapping):
        return
    for key in (PIN_PARAMETER, SESSION_PARAMETER):
        value = hint_text(params.get(key), key)
        if value is not None:
            request.parameters[key].string_param = value
