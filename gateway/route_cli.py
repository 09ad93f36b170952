"""``modelpool route show|set|delete``: the routing table of a running gateway, through
its admin endpoints (``/v2/routes``; gateway/routing.py, docs/lifecycle.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from modelpool.gateway.routing import parse_target_spec

DEFAULT_URL = "http://127.0.0.1:8000"


def add_parser(sub: Any) -> None:
    """Add ``route`` and its subcommands to the ``modelpool`` subparsers ``sub``."""
    route = sub.add_parser("route", help="aliases and canary splits of a running gateway")
    route_sub = route.add_subparsers(dest="route_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=DEFAULT_URL, help="the gateway's REST address")
        p.add_argument(
            "--api-key",
            default=os.environ.get("MODELPOOL_KEY"),
            help="an admin key, for a gateway with --auth-config (default: $MODELPOOL_KEY)",
        )

    show = route_sub.add_parser("show", help="every route, or one, with its targets and shares")
    show.add_argument("name", nargs="?", default="")
    show.add_argument("--json", action="store_true", help="print the raw JSON")
    common(show)
    set_ = route_sub.add_parser(
        "set",
        help="set a route's targets now (until the routing file changes or SIGHUP)",
        description="e.g. modelpool route set fraud fraud:3=90 fraud:4=10",
    )
    set_.add_argument("name")
    set_.add_argument("targets", nargs="+", metavar="MODEL[:VERSION]=WEIGHT")
    common(set_)
    delete = route_sub.add_parser("delete", help="drop a route (until the file changes)")
    delete.add_argument("name")
    common(delete)


def run(args: argparse.Namespace) -> int:
    """Run ``modelpool route ...``; 0 on success, 1 when the gateway refused, 2 for bad
    arguments."""
    what = f"modelpool route {args.route_command}"
    path = "/v2/routes" + (f"/{urllib.parse.quote(args.name, safe='')}" if args.name else "")
    method, body = "GET", None
    if args.route_command == "set":
        try:
            targets = [parse_target_spec(t) for t in args.targets]
        except ValueError as e:
            print(f"{what}: {e}", file=sys.stderr)
            return 2
        method, body = "PUT", {"targets": targets}
    elif args.route_command == "delete":
        method = "DELETE"
    try:
        doc = call(args.url, method, path, body, args.api_key)
    except urllib.error.HTTPError as e:
        message = _error_message(e)
        hint = " (pass an admin key: --api-key or $MODELPOOL_KEY)" if e.code in (401, 403) else ""
        print(f"{what}: {args.url} answered {e.code}: {message}{hint}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"{what}: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    if args.route_command == "delete":
        print(f"route {args.name} deleted")
    elif getattr(args, "json", False):
        print(json.dumps(doc, indent=2))
    else:
        for route in doc if isinstance(doc, list) else [doc]:
            print(render(route))
    return 0


def call(url: str, method: str, path: str, body: Any, key: str | None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def render(route: dict[str, Any]) -> str:
    """``NAME (SOURCE)`` then a line per target with its weight and share."""
    lines = [f"{route['name']} ({route.get('source') or '?'})"]
    for t in route["targets"]:
        target = t["model"] if t.get("version") is None else f"{t['model']}:{t['version']}"
        lines.append(f"  {target:<40} weight {t['weight']:g}  {100 * t['share']:.1f}%")
    return "\n".join(lines)


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read()).get("error", e.reason))
    except (ValueError, AttributeError, OSError):
        return str(e.reason)
