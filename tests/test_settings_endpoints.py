"""Triton's logging and trace extensions (``/v2/logging``, ``/v2[/models/m]/trace/setting``,
gRPC ``LogSettings`` and ``TraceSetting``) through tritonclient over HTTP and gRPC: log
settings change what the gateway logs; trace settings are stored, tracing itself is
refused; both are admin calls under an auth config."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import yaml
from tritonclient.utils import InferenceServerException

from modelpool.gateway.tenants import hash_key, new_key
from tests.conftest import Served, start_serve
from tests.modelgen import write_sized

pytestmark = pytest.mark.slow

MODEL = "acme-m"
DEFAULT_LOG = {
    "log_file": "",
    "log_info": True,
    "log_warning": True,
    "log_error": True,
    "log_verbose_level": 0,
    "log_format": "default",
}
DEFAULT_TRACE = {
    "trace_level": ["OFF"],
    "trace_rate": "1000",
    "trace_count": "-1",
    "log_frequency": "0",
    "trace_file": "",
    "trace_mode": "triton",
}


def _repo(root: Path) -> Path:
    repo = root / "models"
    write_sized(repo, MODEL, 4096)
    return repo


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("settings")
    s = start_serve(_repo(root), root / "serve.log", "--device-memory-budget", "256MB")
    yield s
    s.stop()


@pytest.fixture
def http(served: Served) -> Iterator[thttp.InferenceServerClient]:
    client = thttp.InferenceServerClient(served.http_url)
    yield client
    client.close()


@pytest.fixture
def grpc(served: Served) -> Iterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(served.grpc_url)
    yield client
    client.close()


def grpc_log(client: tgrpc.InferenceServerClient, settings: dict[str, Any] | None = None) -> dict:
    """gRPC log settings as plain values (the response wraps each in a oneof)."""
    if settings is None:
        doc = client.get_log_settings(as_json=True)
    else:
        doc = client.update_log_settings(settings, as_json=True)
    return {k: next(iter(v.values()), None) for k, v in doc["settings"].items()}


def grpc_trace(
    client: tgrpc.InferenceServerClient, model: str = "", settings: dict | None = None
) -> dict:
    if settings is None:
        doc = client.get_trace_settings(model, as_json=True)
    else:
        doc = client.update_trace_settings(model, settings, as_json=True)
    return {k: v.get("value", []) for k, v in doc["settings"].items()}


def refused(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value


# -- logging ---------------------------------------------------------------------------


def test_log_settings_defaults_over_http_and_grpc(http, grpc) -> None:
    assert http.get_log_settings() == DEFAULT_LOG
    # Typed over gRPC: each value in the oneof member of its type.
    assert grpc_log(grpc) == DEFAULT_LOG


class LogTail:
    """The server's log from a point on, waited for against a deadline."""

    def __init__(self, served: Served) -> None:
        self.path = served.log_path

    def mark(self) -> int:
        return self.path.stat().st_size

    def since(self, offset: int) -> str:
        with self.path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def wait(self, pattern: str, offset: int, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.since(offset), re.MULTILINE)
            if m is not None:
                return m
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.since(offset)}"
            time.sleep(0.05)


def _infer_cold(http: thttp.InferenceServerClient) -> None:
    """Unload the model, then infer: the gateway places it again and logs that at INFO."""
    http.unload_model(MODEL)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    np.testing.assert_allclose(http.infer(MODEL, [x]).as_numpy("y"), np.full((1, 4), 2.0))


def test_log_settings_change_what_the_gateway_logs(served: Served, http, grpc) -> None:
    tail = LogTail(served)
    try:
        # INFO off, verbose on: the flags are independent, as in Triton.
        start = tail.mark()
        got = http.update_log_settings({"log_info": False, "log_verbose_level": 1})
        assert got == {**DEFAULT_LOG, "log_info": False, "log_verbose_level": 1}
        tail.wait(r"DEBUG modelpool\.gateway\.settings: log settings now", start)
        _infer_cold(http)
        # A DEBUG line after the load, in ISO 8601 now (changed over gRPC).
        got = grpc_log(grpc, {"log_format": "ISO8601"})
        assert got["log_format"] == "ISO8601" and got["log_info"] is False
        after = tail.wait(
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z DEBUG modelpool\.gateway\.settings: "
            r"log settings now .*ISO8601",
            start,
        )
        silent = tail.since(start)[: after.start()]
        assert f"placed model={MODEL}" not in silent
        # (Workers are processes of their own, logging at their --log-level.)
        assert " INFO modelpool.gateway." not in silent

        # INFO back on, verbose off: the next load is logged, DEBUG is not.
        start = tail.mark()
        got = grpc_log(grpc, {"log_info": True, "log_verbose_level": 0})
        assert got["log_info"] is True and got["log_verbose_level"] == 0
        _infer_cold(http)
        placed = tail.wait(rf"^(\S+) INFO \S+: placed model={MODEL} ", start)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", placed[1]), placed[0]
        assert "log settings changed: log_info=True, log_verbose_level=0" in tail.since(start)
        assert " DEBUG modelpool.gateway." not in tail.since(start)
    finally:
        restored = http.update_log_settings(
            {"log_info": True, "log_verbose_level": 0, "log_format": "default"}
        )
    assert restored == DEFAULT_LOG
    start = tail.mark()
    _infer_cold(http)
    placed = tail.wait(rf"^(\S+ \S+) INFO \S+: placed model={MODEL} ", start)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", placed[1]), placed[0]


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"log_info": "yes"}, "log_info' must be a boolean"),
        ({"log_verbose_level": -1}, "log_verbose_level' must be an integer >= 0"),
        ({"log_format": "json"}, "log_format' must be one of default, ISO8601"),
        ({"log_file": "/tmp/x.log"}, "log_file' cannot be changed"),
        ({"log_colour": True}, "log setting 'log_colour' is unknown"),
    ],
)
def test_bad_log_settings_are_400_and_change_nothing(
    http, grpc, settings: dict[str, Any], words: str
) -> None:
    e = refused(lambda: http.update_log_settings({"log_warning": False, **settings}))
    assert e.status() == "400" and words in e.message()
    assert http.get_log_settings() == DEFAULT_LOG
    if settings.keys() & {"log_info", "log_verbose_level"}:
        return  # tritonclient's gRPC types these (bool, uint32): "yes" and -1 cannot be sent
    e = refused(lambda: grpc.update_log_settings({"log_warning": False, **settings}))
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and words in e.message()
    assert http.get_log_settings() == DEFAULT_LOG


# -- trace settings --------------------------------------------------------------------


def test_trace_settings_are_stored_globally_and_per_model(http, grpc) -> None:
    assert http.get_trace_settings() == DEFAULT_TRACE
    assert http.get_trace_settings(MODEL) == DEFAULT_TRACE
    try:
        got = http.update_trace_settings(settings={"trace_rate": "10", "trace_level": ["OFF"]})
        assert got == {**DEFAULT_TRACE, "trace_rate": "10"}
        # A model's own setting, over gRPC, on top of the global ones.
        got = grpc_trace(grpc, MODEL, {"trace_count": "5"})
        assert got["trace_count"] == ["5"] and got["trace_rate"] == ["10"]
        assert http.get_trace_settings(MODEL) == {
            **DEFAULT_TRACE,
            "trace_rate": "10",
            "trace_count": "5",
        }
        assert grpc_trace(grpc)["trace_count"] == ["-1"]
        # Cleared: the model follows the global setting again; a global one its default.
        assert grpc_trace(grpc, MODEL, {"trace_count": None})["trace_count"] == ["-1"]
        assert http.update_trace_settings(settings={"trace_rate": None}) == DEFAULT_TRACE
    finally:
        http.update_trace_settings(settings={"trace_rate": None})
        http.update_trace_settings(MODEL, settings={"trace_rate": None, "trace_count": None})


def test_tracing_itself_is_not_implemented(http, grpc) -> None:
    e = refused(lambda: http.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}))
    assert e.status() == "400" and "does not implement tracing" in e.message()
    e = refused(lambda: grpc.update_trace_settings(MODEL, {"trace_level": ["TENSORS"]}))
    assert e.status() == "StatusCode.UNIMPLEMENTED"
    assert f"model '{MODEL}'" in e.message() and "does not implement tracing" in e.message()
    assert http.get_trace_settings(MODEL) == DEFAULT_TRACE


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"trace_level": ["LOUD"]}, "trace_level 'LOUD' is unknown"),
        ({"trace_rate": "often"}, "'trace_rate' must be an integer >= 0"),
        ({"trace_count": "-2"}, "'trace_count' must be an integer >= -1"),
        ({"trace_file": "/tmp/t.json"}, "'trace_file' cannot be changed"),
        ({"trace_colour": "red"}, "trace setting 'trace_colour' is unknown"),
    ],
)
def test_bad_trace_settings_are_400(http, grpc, settings: dict[str, Any], words: str) -> None:
    e = refused(lambda: http.update_trace_settings(MODEL, settings))
    assert e.status() == "400" and words in e.message() and f"model '{MODEL}'" in e.message()
    e = refused(lambda: grpc.update_trace_settings(settings=settings))
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and words in e.message()
    assert http.get_trace_settings(MODEL) == DEFAULT_TRACE


def test_trace_settings_of_an_unknown_model_are_404(http, grpc) -> None:
    e = refused(lambda: http.get_trace_settings("no-such-model"))
    assert e.status() == "404" and "no-such-model" in e.message()
    e = refused(lambda: grpc.update_trace_settings("no-such-model", {"trace_rate": "1"}))
    assert e.status() == "StatusCode.NOT_FOUND"


# -- admin only ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, dict[str, str]]]:
    root = tmp_path_factory.mktemp("settings-auth")
    keys = {"acme": new_key(), "ops": new_key()}
    config = root / "auth.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tenants": [
                    {"name": "acme", "keys": [hash_key(keys["acme"])], "models": ["acme-*"]},
                    {"name": "ops", "role": "admin", "keys": [hash_key(keys["ops"])]},
                ]
            }
        )
    )
    s = start_serve(
        _repo(root), root / "serve.log",
        "--auth-config", str(config), "--device-memory-budget", "256MB",
    )  # fmt: skip
    yield s, keys
    s.stop()


CALLS: dict[str, Callable[[Any, dict[str, str] | None], Any]] = {
    "get_log": lambda c, h: c.get_log_settings(headers=h),
    "update_log": lambda c, h: c.update_log_settings({"log_warning": True}, headers=h),
    "get_trace": lambda c, h: c.get_trace_settings(headers=h),
    "get_model_trace": lambda c, h: c.get_trace_settings(MODEL, headers=h),
    "update_trace": lambda c, h: c.update_trace_settings(MODEL, {"trace_rate": "1000"}, headers=h),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_settings_are_admin_calls(
    authed: tuple[Served, dict[str, str]], protocol: str, call: str
) -> None:
    served, keys = authed
    client: Any = (
        thttp.InferenceServerClient(served.http_url)
        if protocol == "http"
        else tgrpc.InferenceServerClient(served.grpc_url)
    )
    want = {
        "http": {None: "401", "acme": "403"},
        "grpc": {None: "StatusCode.UNAUTHENTICATED", "acme": "StatusCode.PERMISSION_DENIED"},
    }[protocol]
    try:
        e = refused(lambda: CALLS[call](client, None))
        assert e.status() == want[None]
        acme = {"authorization": f"Bearer {keys['acme']}"}
        e = refused(lambda: CALLS[call](client, acme))
        assert e.status() == want["acme"] and "admin" in e.message()
        assert CALLS[call](client, {"authorization": f"Bearer {keys['ops']}"}) is not None
    finally:
        client.close()
