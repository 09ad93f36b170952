"""Peers that ``python -m loadtests compare`` measures modelpool against.

Each peer serves the same Triton-layout repository of TorchScript models under the
same memory budget, and is driven by the same open-loop generator. Peers are optional
extras (``pip install -e '.[peers]'``), never dependencies of the product, so nothing
here imports a peer's framework at import time: ``installed`` asks without importing.

Modules, one job each:

- ``signatures``: what every system is sent, read once from the repository
- ``budget``: a byte budget as a peer's own knob (models per replica)
- ``v2json``: KServe v2 JSON bodies, numpy only
- ``http_adapter``: the runner's adapter for v2 JSON over HTTP, with per-model headers
- ``ray_app`` / ``ray_server``: the Ray Serve deployment and the process that runs it
- ``processes``: start a server process, wait for its ready line, stop it and reap
  everything it spawned
- ``systems``: how each system under test is started and asked for its cold starts
- ``table`` / ``plot``: the comparison as JSON, Markdown and PNG
"""

from __future__ import annotations

import importlib.util

#: Peer name -> the module whose presence means it is installed.
PEER_MODULES: dict[str, str] = {"ray": "ray.serve"}


def installed(peer: str) -> bool:
    module = PEER_MODULES[peer]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False
