"""KServe v2 REST on aiohttp, as Triton serves it. Handlers parse, call the DataPlane,
render; the middleware maps typed errors once.

Credentials: ``Authorization: Bearer KEY``. Every handler but health and server metadata
resolves the caller with ``_tenant`` first and passes it on; what the tenant may see is
the data plane's business.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from tritonclient.grpc import service_pb2 as pb

from modelpool.gateway.dataplane import DataPlane
from modelpool.gateway.errors import retry_after, status_of
from modelpool.gateway.proto_json import message_to_json
from modelpool.gateway.rest_codec import HEADER_LENGTH, parse_infer, render_infer, request_timeout
from modelpool.gateway.tenants import Tenant
from modelpool.gateway.validate import client_timeout, parsed_or_deferred, timeout_seconds
from modelpool.gpu.repository import clip
from modelpool.placement.errors import (
    InvalidInput,
    ModelpoolError,
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
    return web.json_response({"error": message}, status=status, headers=headers)


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
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[DATAPLANE].server_ready() else 503)


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
    dp.spec(name, version, tenant)  # unknown (or invisible) model or version: 404, as Triton
    return web.Response(status=200 if dp.model_ready(name, version, tenant=tenant) else 400)


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
        dp.spec(name, version, tenant)  # 404 for an unknown model before any parsing
        header = request.headers.get(TIMEOUT_HEADER)
        header_s = (
            timeout_seconds(header, f"model '{name}': header {TIMEOUT_HEADER}")
            if header is not None
            else None
        )
        if isinstance(body, ModelpoolError):
            raise body
        parsed, doc = parse_infer(name, version, body, request.headers.get(HEADER_LENGTH))
        return parsed, client_timeout(header_s, request_timeout(name, doc))

    # Parsed before the data plane is called, as the deadline rides in the body; a
    # request that fails to parse still goes through ``dp.infer`` (raising there) so
    # it is counted like any other failed request.
    source, timeout_s = parsed_or_deferred(parse)
    outcome = await dp.infer(
        source, protocol="http", model=name, client_timeout_s=timeout_s, tenant=tenant
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


async def repository_index(request: web.Request) -> web.Response:
    tenant = _tenant(request, "index")
    ready_only = False
    if request.can_read_body:
        body = await _read(request, "repository index")
        if isinstance(body, ModelpoolError):
            raise body
        try:
            # Not request.json(): it decodes by the Content-Type's charset, and an
            # unknown one raises LookupError.
            doc = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError) as e:
            raise InvalidInput(
                f"repository index: body is not valid JSON: {clip(e, 200)}"
            ) from None
        ready_only = bool(isinstance(doc, dict) and doc.get("ready"))
    entries = request.app[DATAPLANE].repository_index(ready_only, tenant=tenant)
    return web.json_response(
        [
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            for e in entries
        ]
    )


async def repository_load(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    tenant = _tenant(request, "load", name)
    await request.app[DATAPLANE].load_model(name, tenant=tenant, source=_source(request))
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
    return web.json_response(message_to_json(stats))


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


def create_rest_app(dataplane: DataPlane, max_request_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes, middlewares=[errors_middleware])
    app[DATAPLANE] = dataplane
    app[MAX_BODY] = max_request_bytes
    add_routes(app)
    return app
