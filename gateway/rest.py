"""KServe v2 REST on aiohttp, as Triton serves it. Handlers parse, call the DataPlane,
render; the middleware maps typed errors once.

Credentials: ``Authorization: Bearer KEY``. Every handler but health and server metadata
resolves the caller with ``_tenant`` first and passes it on; what the tenant may see is
the data plane's business.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from tritonclient.grpc import service_pb2 as pb

from modelpool.gateway.dataplane import DataPlane
from modelpool.gateway.errors import retry_after, status_of
from modelpool.gateway.proto_json import message_to_json
from modelpool.gateway.rest_codec import HEADER_LENGTH, parse_infer, render_infer, request_timeout
from modelpool.gateway.routing import RouteHints, copy_route_parameters
from modelpool.gateway.settings import json_settings, trace_changes_from_json, trace_json
from modelpool.gateway.shm import CUDA_UNSUPPORTED
from modelpool.gateway.stats import statistics_json
from modelpool.gateway.tenants import Tenant
from modelpool.gateway.validate import client_timeout, parsed_or_deferred, timeout_seconds
from modelpool.gpu.repository import clip
from modelpool.placement.errors import (
    InvalidInput,
    ModelpoolError,
    NotAllowed,
    PayloadTooLarge,
    Unauthenticated,
)

log = logging.getLogger(__name__)

DATAPLANE = web.AppKey("dataplane", DataPlane)
MAX_BODY = web.AppKey("max_request_bytes", int)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: The seconds a REST client gives an inference request (see ``infer``).
TIMEOUT_HEADER = "Modelpool-Timeout"


def _error(status: int, message: str, retry_after_s: float | None = None) -> web.Response:
    headers = (
        {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
    )
    # Plain "application/json", no charset: the KServe SDK puts the message in its
    # exception only for exactly that content type (JSON is UTF-8 by definition).
    return web.Response(
        body=json.dumps({"error": message}).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ModelpoolError as e:
        status, _ = status_of(e)
        if status >= 500 and status != 503:
            log.exception("unmapped error on %s", request.path)
        response = _error(status, e.message, retry_after(e))
        if isinstance(e, Unauthenticated):
            response.headers["WWW-Authenticate"] = 'Bearer realm="modelpool"'
        if not request.content.is_eof():
            # The body was not (or could not be) read to its end: where the next
            # request on this connection starts is unknown, so the client must not
            # send one; without this it would see a reset instead of a reply.
            response.force_close()
        return response
    except web.HTTPException:
        raise
    except Exception:
        log.exception("bug: unhandled error on %s %s", request.method, request.path)
        return _error(500, "internal error (a bug): see the gateway log")


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def _source(request: web.Request) -> str:
    """The peer's address, for the audit log (a proxy's, behind one)."""
    return request.remote or ""


def _tenant(request: web.Request, action: str, model: str | None = None) -> Tenant | None:
    """The caller, from ``Authorization: Bearer KEY``; None when auth is off. Raises
    Unauthenticated (401) for a missing or unknown key."""
    return request.app[DATAPLANE].authenticate(
        request.headers.get("Authorization"), action=action, model=model, source=_source(request)
    )


async def live(request: web.Request) -> web.Response:
    """Status for tritonclient and probes, ``{"live": ...}`` for the KServe SDK."""
    is_live = request.app[DATAPLANE].live()
    return web.json_response({"live": is_live}, status=200 if is_live else 503)


async def ready(request: web.Request) -> web.Response:
    is_ready = request.app[DATAPLANE].server_ready()
    return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(message_to_json(request.app[DATAPLANE].server_metadata()))


async def model_metadata(request: web.Request) -> web.Response:
    name, version = _model(request)
    tenant = _tenant(request, "metadata", name)
    metadata = request.app[DATAPLANE].model_metadata(name, version, tenant=tenant)
    return web.json_response(message_to_json(metadata))


async def model_ready(request: web.Request) -> web.Response:
    name, version = _model(request)
    tenant = _tenant(request, "ready", name)
    dp = request.app[DATAPLANE]
    dp.check_known(name, version, tenant)  # unknown (or invisible) model or version: 404
    # Not ready is 400, as Triton answers; KServe's body rides along either way.
    is_ready = dp.model_ready(name, version, tenant=tenant)
    return web.json_response({"name": name, "ready": is_ready}, status=200 if is_ready else 400)


async def model_config(request: web.Request) -> web.Response:
    name, version = _model(request)
    tenant = _tenant(request, "config", name)
    config = request.app[DATAPLANE].model_config(name, version, tenant=tenant)
    return web.json_response(message_to_json(config))


async def infer(request: web.Request) -> web.Response:
    """``POST /v2/models/{model}[/versions/{version}]/infer``: JSON, or JSON followed by
    binary tensors (``Inference-Header-Content-Length`` says where the JSON ends).

    Deadlines: the header ``Modelpool-Timeout`` gives the request that many seconds (a
    positive decimal number, e.g. ``Modelpool-Timeout: 2.5``), and the request's
    ``parameters.timeout`` (Triton's schedule-policy parameter) that many whole
    microseconds, 0 meaning none. The smaller of the two given is passed on as the
    request's deadline; a malformed one is a 400 naming the header or parameter.
    """
    name, version = _model(request)
    tenant = _tenant(request, "infer", name)  # before the body is read
    dp = request.app[DATAPLANE]
    body = await _read(request, f"model '{name}'")
    doc: dict = {}

    def parse() -> tuple[pb.ModelInferRequest, float | None]:
        nonlocal doc
        dp.check_known(name, version, tenant)  # 404 for an unknown model before parsing
        header = request.headers.get(TIMEOUT_HEADER)
        header_s = (
            timeout_seconds(header, f"model '{name}': header {TIMEOUT_HEADER}")
            if header is not None
            else None
        )
        if isinstance(body, ModelpoolError):
            raise body
        parsed, doc = parse_infer(name, version, body, request.headers.get(HEADER_LENGTH))
        copy_route_parameters(doc, parsed)
        return parsed, client_timeout(header_s, request_timeout(name, doc))

    # Parsed before the data plane is called, as the deadline rides in the body; a
    # request that fails to parse still goes through ``dp.infer`` (raising there) so
    # it is counted like any other failed request.
    source, timeout_s = parsed_or_deferred(parse)
    outcome = await dp.infer(
        source,
        protocol="http",
        model=name,
        client_timeout_s=timeout_s,
        tenant=tenant,
        route=RouteHints.from_pairs(request.headers.items()),
        trace=request.headers,
    )
    payload, header_length = render_infer(outcome.parsed(), doc)
    if header_length is None:
        return web.Response(body=payload, content_type="application/json")
    return web.Response(
        body=payload,
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )


async def _read(request: web.Request, what: str) -> bytes | ModelpoolError:
    """The request body, or the error to answer for one that cannot be read (returned,
    not raised, so the caller can answer a 404 for an unknown model first)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return PayloadTooLarge(
            f"{what}: request body is over the {request.app[MAX_BODY]}-byte limit "
            "(--max-request-size)"
        )
    except RequestPayloadError as e:
        # A body its Content-Encoding does not decode (aiohttp decompresses gzip,
        # deflate and br), or a connection cut mid-body.
        cause = getattr(e.__cause__, "message", None) or str(e)
        return InvalidInput(f"{what}: request body cannot be read: {clip(cause, 200)}")


async def _json_body(request: web.Request, what: str) -> Any:
    """The request's JSON body, ``{}`` when it has none.

    Raises:
        InvalidInput: a body that is not JSON, naming ``what``.
    """
    if not request.can_read_body:
        return {}
    body = await _read(request, what)
    if isinstance(body, ModelpoolError):
        raise body
    try:
        # Not request.json(): it decodes by the Content-Type's charset, and an unknown
        # one raises LookupError.
        return json.loads(body) if body.strip() else {}
    except (ValueError, RecursionError) as e:
        raise InvalidInput(f"{what}: body is not valid JSON: {clip(e, 200)}") from None


async def repository_index(request: web.Request) -> web.Response:
    tenant = _tenant(request, "index")
    doc = await _json_body(request, "repository index")
    ready_only = bool(isinstance(doc, dict) and doc.get("ready"))
    entries = request.app[DATAPLANE].repository_index(ready_only, tenant=tenant)
    return web.json_response(
        [
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            for e in entries
        ]
    )


async def repository_load(request: web.Request) -> web.Response:
    """``POST /v2/repository/models/{model}/load``, optionally with Triton's body
    ``{"parameters": {"config": "<JSON model config>"}}`` replacing config.pbtxt."""
    name = request.match_info["model"]
    tenant = _tenant(request, "load", name)
    doc = await _json_body(request, f"model '{clip(name)}' load")
    params = doc.get("parameters", {}) if isinstance(doc, dict) else None
    if not isinstance(params, dict):
        raise InvalidInput(f"model '{clip(name)}' load: 'parameters' must be a JSON object")
    config = params.get("config")
    if config is not None and not isinstance(config, str):
        raise InvalidInput(
            f"model '{clip(name)}' load: parameter 'config' must be a string holding "
            "the model config as JSON"
        )
    await request.app[DATAPLANE].load_model(
        name, tenant=tenant, source=_source(request), config=config
    )
    return web.json_response({})


async def repository_unload(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    tenant = _tenant(request, "unload", name)
    await request.app[DATAPLANE].unload_model(name, tenant=tenant, source=_source(request))
    return web.json_response({})


async def model_statistics(request: web.Request) -> web.Response:
    name = request.match_info.get("model", "")
    version = request.match_info.get("version", "")
    tenant = _tenant(request, "statistics", name or None)
    stats = request.app[DATAPLANE].model_statistics(
        name, version, tenant=tenant, source=_source(request)
    )
    return web.json_response(statistics_json(stats))


async def log_settings(request: web.Request) -> web.Response:
    """``GET|POST /v2/logging`` (Triton's logging extension; an admin call)."""
    tenant = _tenant(request, "log_settings")
    dp = request.app[DATAPLANE]
    if request.method == "POST":
        body = await _read(request, "log settings")
        if isinstance(body, ModelpoolError):
            raise body
        changes = json_settings(body, "log settings")
        settings = dp.update_log_settings(changes, tenant=tenant, source=_source(request))
    else:
        settings = dp.log_settings(tenant=tenant, source=_source(request))
    return web.json_response(settings.as_dict())


async def trace_setting(request: web.Request) -> web.Response:
    """``GET|POST /v2[/models/{model}]/trace/setting`` (Triton's trace extension; an
    admin call). Settings are stored; tracing itself is not implemented."""
    name = request.match_info.get("model", "")
    tenant = _tenant(request, "trace_settings", name or None)
    dp = request.app[DATAPLANE]
    if request.method == "POST":
        what = f"model '{clip(name)}' trace settings" if name else "trace settings"
        body = await _read(request, what)
        if isinstance(body, ModelpoolError):
            raise body
        changes = trace_changes_from_json(json_settings(body, what), what)
        values = dp.update_trace_settings(name, changes, tenant=tenant, source=_source(request))
    else:
        values = dp.trace_settings(name, tenant=tenant, source=_source(request))
    return web.json_response(trace_json(values))


async def shm_status(request: web.Request) -> web.Response:
    """``GET /v2/systemsharedmemory[/region/{region}]/status``: the caller's regions."""
    tenant = _tenant(request, "shm_status")
    regions = request.app[DATAPLANE].shm_status(request.match_info.get("region", ""), tenant=tenant)
    return web.json_response([dataclasses.asdict(r) for r in regions])


async def shm_register(request: web.Request) -> web.Response:
    """``POST /v2/systemsharedmemory/region/{region}/register`` with Triton's body
    ``{"key": "/name", "offset": 0, "byte_size": N}``."""
    name = request.match_info["region"]
    tenant = _tenant(request, "shm_register")
    what = f"shared memory region '{clip(name)}' register"
    body = await _read(request, what)
    if isinstance(body, ModelpoolError):
        raise body
    try:
        doc = json.loads(body) if body.strip() else {}
    except (ValueError, RecursionError) as e:
        raise InvalidInput(f"{what}: body is not valid JSON: {clip(e, 200)}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("key"), str) or "byte_size" not in doc:
        raise InvalidInput(f"{what}: body needs 'key' (a string), 'offset' and 'byte_size'")
    request.app[DATAPLANE].shm_register(
        name, doc["key"], doc.get("offset", 0), doc["byte_size"], tenant=tenant
    )
    return web.json_response({})


async def shm_unregister(request: web.Request) -> web.Response:
    """``POST /v2/systemsharedmemory[/region/{region}]/unregister``."""
    tenant = _tenant(request, "shm_unregister")
    request.app[DATAPLANE].shm_unregister(request.match_info.get("region", ""), tenant=tenant)
    return web.json_response({})


async def cuda_shm(request: web.Request) -> web.Response:
    """``v2/cudasharedmemory/...``: not supported (workers may be on other hosts, and
    many run without CUDA); 400 saying so, after the caller is known."""
    _tenant(request, "cuda_shm")
    raise NotAllowed(CUDA_UNSUPPORTED)


async def routes(request: web.Request) -> web.Response:
    """``GET /v2/routes[/{name}]``, ``PUT /v2/routes/{name}`` with ``{"targets": [...]}``,
    ``DELETE /v2/routes/{name}`` (gateway/routing.py; admin calls)."""
    name = request.match_info.get("name", "")
    dp = request.app[DATAPLANE]
    if request.method == "GET":
        tenant = _tenant(request, "routes", name or None)
        found = dp.routes(name, tenant=tenant, source=_source(request))
        return web.json_response(found[0] if name else found)
    tenant = _tenant(request, "route_set", name)
    if request.method == "DELETE":
        dp.delete_route(name, tenant=tenant, source=_source(request))
        return web.json_response({})
    body = await _json_body(request, f"route '{clip(name)}'")
    return web.json_response(dp.set_route(name, body, tenant=tenant, source=_source(request)))


async def status(request: web.Request) -> web.Response:
    tenant = _tenant(request, "status")
    return web.json_response(request.app[DATAPLANE].status(tenant=tenant, source=_source(request)))


def add_routes(app: web.Application) -> None:
    versioned = "/v2/models/{model}/versions/{version}"
    plain = "/v2/models/{model}"
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    # Before /v2/models/{model}, which would take "stats" for a model name (as in Triton).
    app.router.add_get("/v2/models/stats", model_statistics)
    for prefix in (plain, versioned):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_get(prefix + "/config", model_config)
        app.router.add_post(prefix + "/infer", infer)
        app.router.add_get(prefix + "/stats", model_statistics)
    app.router.add_post("/v2/repository/index", repository_index)
    app.router.add_post("/v2/repository/models/{model}/load", repository_load)
    app.router.add_post("/v2/repository/models/{model}/unload", repository_unload)
    app.router.add_get("/v2/modelpool/status", status)
    app.router.add_get("/v2/routes", routes)
    for method in ("GET", "PUT", "DELETE"):
        app.router.add_route(method, "/v2/routes/{name}", routes)
    for kind, status_h, register_h, unregister_h in (
        ("system", shm_status, shm_register, shm_unregister),
        ("cuda", cuda_shm, cuda_shm, cuda_shm),
    ):
        base = f"/v2/{kind}sharedmemory"
        app.router.add_get(base + "/status", status_h)
        app.router.add_get(base + "/region/{region}/status", status_h)
        app.router.add_post(base + "/region/{region}/register", register_h)
        app.router.add_post(base + "/unregister", unregister_h)
        app.router.add_post(base + "/region/{region}/unregister", unregister_h)
    for path, handler in (
        ("/v2/logging", log_settings),
        ("/v2/trace/setting", trace_setting),
        (plain + "/trace/setting", trace_setting),
    ):
        app.router.add_get(path, handler)
        app.router.add_post(path, handler)


def create_rest_app(dataplane: DataPlane, max_request_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes, middlewares=[errors_middleware])
    app[DATAPLANE] = dataplane
    app[MAX_BODY] = max_request_bytes
    add_routes(app)
    return app
