"""Routing tables (gateway/routing.py): parsing and its errors, the weighted choice over
many draws, sticky sessions, pins, reloads, and the route CLI's target syntax."""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from modelpool.gateway.routing import (
    Route,
    RouteHints,
    Router,
    RoutingError,
    Target,
    parse_route,
    parse_routing,
    parse_target_spec,
    repository_check,
)
from modelpool.placement.errors import InvalidInput, ModelNotFound

N = 10_000


def route(*targets: tuple[str, int | None, float], name: str = "fraud") -> Route:
    return Route(name, tuple(Target(m, v, w) for m, v, w in targets))


def shares(counts: Counter[str], n: int) -> dict[str, float]:
    return {k: 100.0 * c / n for k, c in counts.items()}


# -- parsing -----------------------------------------------------------------------------


def test_parses_the_issue_example() -> None:
    doc = yaml.safe_load(
        "fraud: {targets: [{model: fraud, version: 3, weight: 90},"
        " {model: fraud, version: 4, weight: 10}]}\n"
        "scoring: {targets: [{model: scoring-v2}]}\n"
    )
    table = parse_routing(doc, "r.yaml")
    fraud = table.get("fraud")
    assert fraud is not None
    assert fraud.targets == (Target("fraud", 3, 90.0), Target("fraud", 4, 10.0))
    alias = table.get("scoring")
    assert alias is not None and alias.targets == (Target("scoring-v2", None, 1.0),)
    assert table.get("other") is None
    assert parse_routing(None).routes == ()


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ([1, 2], "expected a mapping of public names"),
        ({"../x": {"targets": [{"model": "a"}]}}, "route '../x'"),
        ({"r": [1]}, "route 'r': expected {targets"),
        ({"r": {"targets": [], "x": 1}}, "route 'r': unknown field(s) x"),
        ({"r": {"targets": []}}, "route 'r': 'targets' must be a non-empty list"),
        ({"r": {"targets": [{"model": 3}]}}, "route 'r': targets[0]: field 'model'"),
        ({"r": {"targets": [{"model": "a", "colour": 1}]}}, "targets[0]: unknown field(s) colour"),
        (
            {"r": {"targets": [{"model": "a", "version": "x"}]}},
            "route 'r': targets[0] (model 'a'): field 'version'",
        ),
        ({"r": {"targets": [{"model": "a", "version": 0}]}}, "field 'version'"),
        (
            {"r": {"targets": [{"model": "a", "weight": 1}, {"model": "b"}]}},
            "route 'r': targets[1] (model 'b'): field 'weight' is required",
        ),
        (
            {"r": {"targets": [{"model": "a", "weight": -1}]}},
            "targets[0] (model 'a'): field 'weight': -1 is not a non-negative number",
        ),
        ({"r": {"targets": [{"model": "a", "weight": True}]}}, "field 'weight'"),
        (
            {"r": {"targets": [{"model": "a", "weight": 0}, {"model": "b", "weight": 0}]}},
            "route 'r': every weight is 0",
        ),
        (
            {"r": {"targets": [{"model": "a", "version": 1, "weight": 1}] * 2}},
            "route 'r': target a:1 is listed twice",
        ),
    ],
)
def test_bad_tables_name_the_route_and_the_problem(doc: object, needle: str) -> None:
    with pytest.raises(RoutingError) as e:
        parse_routing(doc, "routes.yaml")
    assert "routes.yaml" in str(e.value)
    assert needle in str(e.value)


def test_repository_check_names_missing_models_and_versions() -> None:
    held = {"fraud": (3, 4)}

    def versions(model: str) -> tuple[int, ...]:
        if model not in held:
            raise ModelNotFound(f"model '{model}' is not in the model repository")
        return held[model]

    check = repository_check(versions)
    check(parse_route("fraud", {"targets": [{"model": "fraud", "version": 4}]}))
    with pytest.raises(RoutingError, match=r"route 'r': target fraud:5: .*no version 5 \(av"):
        check(parse_route("r", {"targets": [{"model": "fraud", "version": 5}]}))
    with pytest.raises(RoutingError, match="route 'r': target ghost: model 'ghost' is not in"):
        check(parse_route("r", {"targets": [{"model": "ghost"}]}))


def test_cli_target_syntax() -> None:
    assert parse_target_spec("fraud:3=90") == {"model": "fraud", "version": 3, "weight": 90}
    assert parse_target_spec("fraud=2.5") == {"model": "fraud", "weight": 2.5}
    for bad in ("fraud", "fraud:x=1", "fraud:3=much", "=3"):
        with pytest.raises(ValueError, match="target"):
            parse_target_spec(bad)


# -- the weighted choice -----------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [
        {"fraud:3": 90, "fraud:4": 10},
        {"fraud:3": 50, "fraud:4": 50},
        {"a:1": 60, "b:1": 30, "c:1": 10},
        {"a:1": 7, "b:1": 0, "c:1": 3},
    ],
)
def test_random_split_lies_within_two_points_of_the_weights(weights: dict[str, int]) -> None:
    r = route(*((k.split(":")[0], int(k.split(":")[1]), w) for k, w in weights.items()))
    rng = random.Random(1)
    counts = Counter(str(r.choose(RouteHints(), rng)) for _ in range(N))
    got = shares(counts, N)
    total = sum(weights.values())
    for target, w in weights.items():
        assert abs(got.get(target, 0.0) - 100.0 * w / total) <= 2.0, (target, got)
    assert "b:1" not in counts or weights["b:1"] > 0  # weight 0: never drawn


@pytest.mark.parametrize("weights", [(90, 10), (50, 50), (60, 30, 10)])
def test_session_keys_spread_as_the_weights_say(weights: tuple[int, ...]) -> None:
    r = route(*((f"m{i}", 1, w) for i, w in enumerate(weights)))
    counts = Counter(r.choose(RouteHints(session=f"user-{i}")).model for i in range(N))
    got = shares(counts, N)
    for i, w in enumerate(weights):
        assert abs(got.get(f"m{i}", 0.0) - 100.0 * w / sum(weights)) <= 2.0, got


def test_the_same_session_key_always_gets_the_same_target() -> None:
    r = route(("fraud", 3, 50), ("fraud", 4, 50))
    seen = {
        key: {r.choose(RouteHints(session=key), random.Random(i)) for i in range(50)}
        for key in (f"k{i}" for i in range(200))
    }
    assert all(len(targets) == 1 for targets in seen.values())
    # ... and the keys do not all land on one side.
    assert len({next(iter(t)) for t in seen.values()}) == 2
    # Stable across processes: a fixed key's target is a fixed function of its hash.
    assert r.choose(RouteHints(session="k1")) == r.choose(RouteHints(session="k1"))


def test_moving_weight_moves_only_the_sessions_it_must() -> None:
    """A stable hash into cumulative weights: going 90/10 -> 80/20, every key on v4
    stays on v4 (no session flips back to the old version mid-canary)."""
    before = route(("fraud", 3, 90), ("fraud", 4, 10))
    after = route(("fraud", 3, 80), ("fraud", 4, 20))
    keys = [f"s{i}" for i in range(2000)]
    on_v4 = {k for k in keys if before.choose(RouteHints(session=k)).version == 4}
    assert on_v4
    assert all(after.choose(RouteHints(session=k)).version == 4 for k in on_v4)


# -- pins ----------------------------------------------------------------------------------


def test_pins_choose_among_the_named_targets() -> None:
    r = route(("fraud", 3, 100), ("fraud", 4, 0), ("other", None, 1))
    rng = random.Random(0)
    # A weight-0 target takes no traffic but can be pinned.
    assert {r.choose(RouteHints(pin="fraud:4"), rng) for _ in range(50)} == {Target("fraud", 4, 0)}
    assert {r.choose(RouteHints(pin="other"), rng) for _ in range(50)} == {Target("other", None, 1)}
    # A model without a version: any of its targets, by weight.
    assert {r.choose(RouteHints(pin="fraud"), rng).version for _ in range(50)} == {3}
    # A pin wins over the session key.
    assert r.choose(RouteHints(pin="fraud:4", session="k")).version == 4


@pytest.mark.parametrize("pin", ["fraud:5", "ghost", "fraud:x", "other:1"])
def test_a_pin_that_is_not_a_target_is_a_400_naming_route_and_target(pin: str) -> None:
    r = route(("fraud", 3, 90), ("fraud", 4, 10), ("other", None, 1))
    with pytest.raises(InvalidInput) as e:
        r.choose(RouteHints(pin=pin))
    assert "route 'fraud'" in e.value.message
    assert repr(pin) in e.value.message
    assert "fraud:3, fraud:4, other" in e.value.message


def test_hints_from_headers_and_parameters() -> None:
    hints = RouteHints.from_pairs(
        [("Modelpool-Target", "fraud:4"), ("MODELPOOL-SESSION", "u1"), ("other", "x")]
    )
    assert hints == RouteHints("fraud:4", "u1")
    assert hints.over(None, None) == hints
    assert hints.over("fraud:3", None) == RouteHints("fraud:3", "u1")  # parameter wins


def test_a_version_narrows_a_route() -> None:
    r = route(("fraud", 3, 90), ("fraud", None, 10))
    assert r.with_version(3, lambda m: 4).targets == (Target("fraud", 3, 90),)
    assert r.with_version(4, lambda m: 4).targets == (Target("fraud", None, 10),)
    with pytest.raises(ModelNotFound, match="route 'fraud' has no target of version 5"):
        r.with_version(5, lambda m: 4)


# -- the table in use ----------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    # A fresh inode each time, as editors and config maps do: the signature changes
    # even when mtime and size would not.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_reload_replaces_the_table_and_a_bad_file_keeps_the_old_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "routes.yaml"
    _write(path, "fraud: {targets: [{model: fraud, version: 3}]}\n")
    router = Router(str(path))
    assert router.get("fraud") == Route("fraud", (Target("fraud", 3, 1.0),), str(path))

    # A runtime edit lasts until the file is reloaded, which replaces it.
    router.set_route("fraud", {"targets": [{"model": "fraud", "version": 4}]})
    router.set_route("extra", {"targets": [{"model": "x"}]})
    assert router.get("fraud").targets[0].version == 4  # type: ignore[union-attr]
    _write(path, "fraud: {targets: [{model: fraud, version: 5}]}\n")
    assert router.reload()
    assert router.get("fraud").targets[0].version == 5  # type: ignore[union-attr]
    assert router.get("extra") is None

    _write(path, "fraud: {targets: [{model: fraud, weight: -3}]}\n")
    with caplog.at_level(logging.ERROR, logger="modelpool.gateway.routing"):
        assert not router.reload()
    assert "keeping the previous routes" in caplog.text
    assert "route 'fraud'" in caplog.text
    assert router.get("fraud").targets[0].version == 5  # type: ignore[union-attr]


def test_a_bad_file_at_start_fails_with_its_message(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("fraud: {targets: [{model: fraud, weight: x}]}\n")
    with pytest.raises(RoutingError, match=r"route 'fraud'.*field 'weight'"):
        Router(str(path))
    with pytest.raises(RoutingError, match="cannot read it"):
        Router(str(tmp_path / "missing.yaml"))
    path.write_text("fraud: [unclosed\n")
    with pytest.raises(RoutingError, match="not valid YAML"):
        Router(str(path))


def test_runtime_edits_are_400s_when_bad_and_deletes_404_when_absent() -> None:
    router = Router(check=repository_check(lambda m: (1, 2)))
    with pytest.raises(InvalidInput, match=r"route 'r': target m:3: model 'm' has no version 3"):
        router.set_route("r", {"targets": [{"model": "m", "version": 3}]})
    with pytest.raises(InvalidInput, match="route 'r': 'targets' must be a non-empty list"):
        router.set_route("r", {"targets": []})
    assert router.get("r") is None
    router.set_route("r", {"targets": [{"model": "m", "version": 2}]})
    assert router.get("r") is not None and router.get("r").source == "runtime"  # type: ignore[union-attr]
    router.delete_route("r")
    with pytest.raises(ModelNotFound, match="route 'r' does not exist"):
        router.delete_route("r")
