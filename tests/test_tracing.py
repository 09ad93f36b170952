"""OpenTelemetry tracing (gpu/tracing.py): the span helpers against the SDK's in-memory
exporter, then the real ``modelpool serve`` (gateway and worker processes) exporting
over OTLP/gRPC to a trace receiver run by this module."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsvc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tsvc_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelpool.gpu import tracing
from tests.conftest import ROOT, Served, start_serve
from tests.modelgen import Sized, write_model

# -- the span helpers, in process ---------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[tuple[tracing.Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracing.Tracing(provider), exporter
    provider.shutdown()


def _traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """(header value, trace id, parent span id) of a fresh client span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317"}, False),
    ],
)
def test_the_switch(env: dict[str, str], on: bool) -> None:
    assert (tracing.config_from_env(env) is not None) is on


def test_sampling_defaults_and_arguments() -> None:
    base = {"OTEL_TRACES_EXPORTER": "otlp"}
    config = tracing.config_from_env(base)
    assert config is not None
    assert (config.sampler, config.ratio, config.protocol) == (
        "parentbased_traceidratio",
        1.0,
        "grpc",
    )
    config = tracing.config_from_env({**base, "OTEL_TRACES_SAMPLER_ARG": "0.01"})
    assert config is not None and config.ratio == 0.01
    # A typo does not stop the server: the defaults, with a warning.
    config = tracing.config_from_env(
        {**base, "OTEL_TRACES_SAMPLER": "sometimes", "OTEL_TRACES_SAMPLER_ARG": "2"}
    )
    assert config is not None
    assert (config.sampler, config.ratio) == ("parentbased_traceidratio", 1.0)


def test_off_by_default_loads_no_sdk() -> None:
    """With no OTEL_* variables the gateway (and the worker: the same call) builds no
    tracer, and the SDK and exporter are never imported."""
    code = (
        "import sys, modelpool.gateway.server\n"
        "from modelpool.gpu import tracing\n"
        "assert tracing.from_env('gateway', {}) is None\n"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
        "'opentelemetry.exporter'))]\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=60)


def test_missing_extra_warns_and_stays_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.resources", None)
    with caplog.at_level("WARNING", logger="modelpool.gpu.tracing"):
        assert tracing.from_env("gateway", {"OTEL_TRACES_EXPORTER": "otlp"}) is None
    assert "pip install 'modelpool[tracing]'" in caplog.text


def test_load_wait_recorded_only_when_the_request_waited(memory: Any) -> None:
    t, exporter = memory
    with t.request("grpc", None):
        with t.load_wait():
            pass  # warm: no source set
        with t.load_wait() as waited:
            waited.source = tracing.LOAD_FROM_DISK
        with pytest.raises(RuntimeError), t.load_wait():
            raise RuntimeError("no room")
    spans = exporter.get_finished_spans()
    waits = [s for s in spans if s.name == tracing.LOAD_WAIT]
    assert [w.attributes[tracing.LOAD_SOURCE] for w in waits] == ["disk", "disk"]
    assert waits[0].status.is_ok and not waits[1].status.is_ok
    assert waits[1].events[0].name == "exception"
    (root,) = [s for s in spans if s.name == tracing.INFER]
    assert all(w.parent.span_id == root.context.span_id for w in waits)


async def test_a_pipelined_load_wait_ends_with_the_load(memory: Any) -> None:
    """Leased while the copy loads, the request forwards at once; its wait's span
    still ends when the load does (or fails, or the request gives it up)."""
    t, exporter = memory
    loads = [asyncio.get_running_loop().create_future() for _ in range(3)]
    with t.request("grpc", None):
        for load in loads:
            with t.load_wait() as waited:
                waited.source = tracing.LOAD_FROM_DISK
                waited.until = load
            with t.span(tracing.FORWARD):
                pass
    assert [s.name for s in exporter.get_finished_spans()] == [tracing.FORWARD] * 3 + [
        tracing.INFER
    ]
    loads[0].set_result("host")
    loads[1].set_exception(RuntimeError("no room"))
    loads[2].cancel()
    await asyncio.sleep(0)  # the loads' done-callbacks
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == tracing.INFER]
    forwards = [s for s in spans if s.name == tracing.FORWARD]
    waits = [s for s in spans if s.name == tracing.LOAD_WAIT]
    assert len(waits) == 3
    assert all(w.parent.span_id == root.context.span_id for w in waits)
    # Each overlaps the forward sent while the copy loaded.
    assert all(w.end_time >= f.end_time for w, f in zip(waits, forwards, strict=True))
    assert [w.status.is_ok for w in waits] == [True, False, True]
    # The source the load reported; the one set at the lease when it reported none.
    assert [w.attributes[tracing.LOAD_SOURCE] for w in waits] == ["host", "disk", "disk"]
    assert waits[1].events[0].name == "exception"


@pytest.mark.parametrize("mapping", [True, False], ids=["headers", "metadata"])
def test_client_parent_forward_and_compute(memory: Any, mapping: bool) -> None:
    t, exporter = memory
    header, trace_id, parent_id = _traceparent()
    pairs = [("authorization", "x"), ("traceparent", header)]
    with t.request("http", dict(pairs) if mapping else pairs, tenant="acme"):
        t.annotate("m", 3)
        with t.span(tracing.QUEUE):
            pass
        with t.forward("w1") as metadata:
            sent = dict(metadata)
        # The worker side: a fresh context from the metadata alone.
    with t.compute(tuple(sent.items()), "m", "3", "w1"):
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root, forward, compute = spans[tracing.INFER], spans[tracing.FORWARD], spans[tracing.COMPUTE]
    assert format(root.context.trace_id, "032x") == trace_id
    assert format(root.parent.span_id, "016x") == parent_id
    assert root.attributes[tracing.MODEL] == "m" and root.attributes[tracing.VERSION] == 3
    assert root.attributes[tracing.TENANT] == "acme"
    assert spans[tracing.QUEUE].parent.span_id == root.context.span_id
    assert forward.parent.span_id == root.context.span_id
    assert sent["traceparent"].split("-")[2] == format(forward.context.span_id, "016x")
    assert compute.parent.span_id == forward.context.span_id
    assert compute.context.trace_id == root.context.trace_id
    assert compute.attributes[tracing.VERSION] == 3


def test_unsampled_request_starts_no_child_and_sends_no_context() -> None:
    """An unsampled request (here: the SDK's ratio 0, no client parent) records no span
    and sends the worker no metadata; workers never start a trace, so they record only
    a call whose traceparent is sampled."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    t = tracing.Tracing(provider)
    with t.request("grpc", None):
        with t.load_wait() as waited:
            assert waited is None
        with t.forward("w1") as metadata:
            assert metadata is None
    unsampled, _, _ = _traceparent(sampled=False)
    for carrier in (None, [("user-agent", "x")], [("traceparent", unsampled)]):
        with t.compute(carrier, "m", "1", "w1"):
            pass
    assert not exporter.get_finished_spans()
    header, trace_id, _ = _traceparent()  # a sampled parent is honoured at ratio 0
    with t.compute([("traceparent", header)], "m", "1", "w1"):
        pass
    (span,) = exporter.get_finished_spans()
    assert (span.name, format(span.context.trace_id, "032x")) == (tracing.COMPUTE, trace_id)
    provider.shutdown()


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_new_traces_sampled_at_the_edge(ratio: float) -> None:
    """parentbased_traceidratio as from_env builds it: the ratio decides new traces
    before the SDK is asked; a client's sampled parent is followed whatever the ratio."""
    config = tracing.config_from_env(
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
    )
    assert config is not None and tracing.root_ratio(config) == ratio
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=tracing._sampler(config))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    t = tracing.Tracing(provider, parent_based=False, root_ratio=tracing.root_ratio(config))
    with t.request("grpc", None), t.forward("w1") as metadata:
        sent = metadata
    if ratio:
        assert sent is not None and int(dict(sent)["traceparent"][-2:], 16) & 1
    else:
        assert sent is None
    header, trace_id, _ = _traceparent()
    with t.request("http", {"traceparent": header}):
        pass
    spans = exporter.get_finished_spans()
    expected = [tracing.FORWARD, tracing.INFER] if ratio else []
    assert [s.name for s in spans] == [*expected, tracing.INFER]
    assert format(spans[-1].context.trace_id, "032x") == trace_id
    provider.shutdown()


def test_error_recorded_on_the_request_span(memory: Any) -> None:
    t, exporter = memory
    with pytest.raises(ValueError), t.request("grpc", [("traceparent", "garbage")]):
        raise ValueError("bad tensor")
    (span,) = exporter.get_finished_spans()
    assert span.parent is None  # a malformed traceparent starts a trace of its own
    assert not span.status.is_ok
    assert span.events[0].attributes["exception.type"] == "ValueError"


# -- the real processes -------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    service: str
    process: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    start_ns: int
    end_ns: int


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value"))


class Receiver(tsvc_grpc.TraceServiceServicer):
    """A tiny OTLP/gRPC trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.changed = threading.Condition()

    def Export(self, request: Any, context: Any) -> Any:
        got = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Received(
                            resource.get("service.name", ""),
                            resource.get("modelpool.process", ""),
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            {a.key: _value(a.value) for a in s.attributes},
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                        )
                    )
        with self.changed:
            self.spans.extend(got)
            self.changed.notify_all()
        return tsvc.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Received]:
        with self.changed:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_trace(self, trace_id: str, names: set[str], timeout: float = 20.0) -> list[Received]:
        """The spans of ``trace_id`` once all of ``names`` have arrived."""
        with self.changed:
            ok = self.changed.wait_for(
                lambda: names <= {s.name for s in self.spans if s.trace_id == trace_id},
                timeout,
            )
            spans = [s for s in self.spans if s.trace_id == trace_id]
        assert ok, f"trace {trace_id}: got {sorted(s.name for s in spans)}, wanted {names}"
        return spans


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    r = Receiver()
    tsvc_grpc.add_TraceServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield r, f"http://127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trace-repo")
    for name in ("cold_http", "cold_grpc", "warm", "ratio", "off"):
        write_model(out, name, Sized(4096))
    return out


def _env(endpoint: str, service: str, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": service,
        # Export quickly: the tests wait for spans, never sleep.
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **extra,
    }


@pytest.fixture(scope="module")
def servers(
    receiver: tuple[Receiver, str], repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Served]]:
    """Three servers started side by side: sampling everything, sampling no new trace
    (ratio 0), and with the SDK disabled."""
    _, endpoint = receiver
    logs = tmp_path_factory.mktemp("trace-logs")
    envs = {
        "traced": _env(endpoint, "traced"),
        "ratio0": _env(endpoint, "ratio0", OTEL_TRACES_SAMPLER_ARG="0"),
        "disabled": _env(endpoint, "disabled", OTEL_SDK_DISABLED="true"),
    }
    with futures.ThreadPoolExecutor(len(envs)) as pool:
        started = {
            k: pool.submit(start_serve, repo, logs / f"{k}.log", env=e) for k, e in envs.items()
        }
        served = {k: f.result() for k, f in started.items()}
    yield served
    for s in served.values():  # stopped side by side: each drains for a moment
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGINT)
    for s in served.values():
        s.stop()


X = np.ones((1, 4), dtype=np.float32)


def _http(served: Served, model: str, traceparent: str | None) -> None:
    client = thttp.InferenceServerClient(served.http_url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(X)
    headers = {"traceparent": traceparent} if traceparent else None
    y = client.infer(model, [x], headers=headers).as_numpy("y")
    np.testing.assert_allclose(y, X * 2)


def _grpc(served: Served, model: str, traceparent: str | None) -> None:
    client = tgrpc.InferenceServerClient(served.grpc_url)
    x = tgrpc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(X)
    headers = {"traceparent": traceparent} if traceparent else None
    y = client.infer(model, [x], headers=headers).as_numpy("y")
    np.testing.assert_allclose(y, X * 2)


ALL = {tracing.INFER, tracing.LOAD_WAIT, tracing.QUEUE, tracing.FORWARD, tracing.COMPUTE}


def tree(spans: list[Received]) -> str:
    """The trace as an indented text tree with each span's offset and duration."""
    t0 = min(s.start_ns for s in spans)
    children: dict[str, list[Received]] = {}
    for s in spans:
        children.setdefault(s.parent_id, []).append(s)
    ids = {s.span_id for s in spans}
    lines: list[str] = []

    def walk(s: Received, depth: int) -> None:
        keys = ("modelpool.model.name", "modelpool.model.version", "modelpool.load.source")
        attrs = " ".join(f"{k.split('.')[-1]}={s.attributes[k]}" for k in keys if k in s.attributes)
        lines.append(
            f"{'  ' * depth}{s.name:<{24 - 2 * depth}} [{s.process:<7}] "
            f"+{(s.start_ns - t0) / 1e6:8.2f} ms {(s.end_ns - s.start_ns) / 1e6:8.2f} ms  {attrs}"
        )
        for c in sorted(children.get(s.span_id, []), key=lambda c: c.start_ns):
            walk(c, depth + 1)

    for root in sorted((s for s in spans if s.parent_id not in ids), key=lambda s: s.start_ns):
        walk(root, 0)
    return "\n".join(lines)


def _check_cold(spans: list[Received], client_span: str, model: str, protocol: str) -> None:
    by = {s.name: s for s in spans}
    assert sorted(s.name for s in spans) == sorted(ALL), tree(spans)
    root = by[tracing.INFER]
    assert (root.process, root.service) == ("gateway", "traced")
    assert root.parent_id == client_span
    assert root.attributes[tracing.MODEL] == model
    assert root.attributes[tracing.VERSION] == 1
    assert root.attributes[tracing.PROTOCOL] == protocol
    for name in (tracing.LOAD_WAIT, tracing.QUEUE, tracing.FORWARD):
        assert by[name].parent_id == root.span_id and by[name].process == "gateway"
    assert by[tracing.LOAD_WAIT].attributes[tracing.LOAD_SOURCE] == "disk"
    compute = by[tracing.COMPUTE]
    assert compute.process == "worker"
    assert compute.parent_id == by[tracing.FORWARD].span_id
    assert compute.attributes[tracing.MODEL] == model
    assert compute.attributes[tracing.VERSION] == 1


def test_cold_request_over_http_is_one_trace(receiver: Any, servers: Any) -> None:
    r, _ = receiver
    header, trace_id, parent = _traceparent()
    _http(servers["traced"], "cold_http", header)
    spans = r.wait_trace(trace_id, ALL)
    print("\n" + tree(spans))
    _check_cold(spans, parent, "cold_http", "http")


def test_cold_request_over_grpc_is_one_trace(receiver: Any, servers: Any) -> None:
    r, _ = receiver
    header, trace_id, parent = _traceparent()
    _grpc(servers["traced"], "cold_grpc", header)
    _check_cold(r.wait_trace(trace_id, ALL), parent, "cold_grpc", "grpc")


@pytest.fixture(scope="module")
def tiered(
    receiver: tuple[Receiver, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """A server whose device fits one of its two models and whose worker keeps the
    other in host RAM (the fake host tier, as in tests/test_host_tier.py)."""
    _, endpoint = receiver
    root = tmp_path_factory.mktemp("trace-tiered")
    for name in ("one", "two"):
        write_model(root / "repo", name, Sized(3 << 20))
    server = start_serve(
        root / "repo", root / "serve.log",
        "--device-memory-budget", "5MiB", "--host-memory-budget", "64MiB",
        "--min-residency", "0", "--admission-window", "0",
        env={**_env(endpoint, "tiered"), "MODELPOOL_FAKE_HOST_TIER": "1"},
    )  # fmt: skip
    yield server
    server.stop()


def test_a_reload_from_host_ram_says_so(receiver: Any, tiered: Served) -> None:
    """The wait's span names where the load came from, as the worker reported it."""
    r, _ = receiver
    for model in ("one", "two"):  # "one" goes to host RAM to make room for "two"
        _grpc(tiered, model, None)
    header, trace_id, _ = _traceparent()
    _grpc(tiered, "one", header)
    spans = r.wait_trace(trace_id, ALL)
    (wait,) = [s for s in spans if s.name == tracing.LOAD_WAIT]
    assert wait.attributes[tracing.LOAD_SOURCE] == "host", tree(spans)
    assert (
        tiered.metric("modelpool_model_loads_total", model="one", outcome="success", source="host")
        == 1
    )


def test_warm_request_has_no_load_wait(receiver: Any, servers: Any) -> None:
    r, _ = receiver
    _grpc(servers["traced"], "warm", None)  # loads it
    header, trace_id, _ = _traceparent()
    _grpc(servers["traced"], "warm", header)
    want = {tracing.INFER, tracing.QUEUE, tracing.FORWARD, tracing.COMPUTE}
    spans = r.wait_trace(trace_id, want)
    assert sorted(s.name for s in spans) == sorted(want), tree(spans)


def test_ratio_zero_exports_only_sampled_clients(receiver: Any, servers: Any) -> None:
    r, _ = receiver
    unsampled, unsampled_trace, _ = _traceparent(sampled=False)
    _http(servers["ratio0"], "ratio", unsampled)
    _grpc(servers["ratio0"], "ratio", None)  # a new trace: ratio 0 samples none
    # A sampled client parent is honoured (parentbased): this trace is exported, and
    # each process's exporter sends spans in the order they ended, so once it is here
    # anything the requests before it had recorded would be here too.
    header, trace_id, parent = _traceparent()
    _grpc(servers["ratio0"], "ratio", header)
    spans = r.wait_trace(trace_id, {tracing.INFER, tracing.COMPUTE})
    assert {s.service for s in spans} == {"ratio0"}
    assert [s.parent_id for s in spans if s.name == tracing.INFER] == [parent]
    with r.changed:
        mine = [s for s in r.spans if s.service == "ratio0"]
    assert {s.trace_id for s in mine} == {trace_id}, tree(mine)
    assert not r.trace(unsampled_trace)


def test_sdk_disabled_exports_nothing(receiver: Any, servers: Any) -> None:
    r, _ = receiver
    served = servers["disabled"]
    header, trace_id, _ = _traceparent()
    _http(served, "off", header)
    _grpc(served, "off", header)
    # Every process flushes its exporter at exit: stopped, nothing can arrive later.
    assert served.stop() == 0
    assert "tracing on" not in served.log()
    with r.changed:
        assert not [s for s in r.spans if s.service == "disabled"]
    assert not r.trace(trace_id)


def test_streamed_requests_carry_the_stream_traceparent(receiver: Any, servers: Any) -> None:
    r, _ = receiver
    header, trace_id, parent = _traceparent()
    client = tgrpc.InferenceServerClient(servers["traced"].grpc_url)
    done: list[Any] = []
    event = threading.Event()

    def callback(result: Any, error: Any) -> None:
        done.append(error or result)
        event.set()

    client.start_stream(callback, headers={"traceparent": header})
    x = tgrpc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(X)
    client.async_stream_infer("warm", [x])
    assert event.wait(20)
    client.stop_stream()
    assert not isinstance(done[0], Exception), done[0]
    spans = r.wait_trace(trace_id, {tracing.INFER, tracing.COMPUTE})
    (root,) = [s for s in spans if s.name == tracing.INFER]
    assert root.parent_id == parent


def test_overhead_benchmark_servers_and_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """loadtests/tracing_overhead.py: the "off" server gets no OTEL_* variable even
    when this environment has some, the others export to the benchmark's receiver at
    their ratio; every path is timed as often, and none always goes first."""
    from modelpool.loadtests import tracing_overhead as bench

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://elsewhere:4317")
    off = bench._env("http://127.0.0.1:1", "off", None)
    assert not [k for k in off if k.startswith("OTEL_")]
    on = bench._env("http://127.0.0.1:1", "on, 1% sampled", {"OTEL_TRACES_SAMPLER_ARG": "0.01"})
    config = tracing.config_from_env(on)
    assert config is not None and tracing.root_ratio(config) == 0.01
    assert on["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:1"
    order: list[str] = []
    samples = bench.time_rotated({k: (lambda k=k: order.append(k)) for k in "abc"}, 3)
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    timed = order[-9:]  # after the warm-up calls
    assert [timed[i] for i in (0, 3, 6)] == ["a", "b", "c"]
