"""Placement policy: pure decisions over a cluster view.

Nothing in this package does I/O or imports aiohttp, grpc, redis or torch, so the
simulator replays traces through the very code production runs.
"""
