"""Byte sizes as people write them: ``4GiB``, ``512MB``, ``1.5GB``, ``10K``, ``1024``.

Decimal prefixes (K, M, G, T) are powers of 1000 and binary ones (Ki, Mi, Gi, Ti) powers
of 1024, as in Kubernetes quantities and on disk labels; the trailing ``B`` is optional
and letters are case-insensitive, because nobody means bits when sizing a GPU.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_MULTIPLIERS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}

_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*$")

_EXAMPLES = "e.g. 4GiB, 512MB, 512MiB, 1.5GB, 10K or 1024"


def parse_size(text: str) -> int:
    """Parse a size into bytes.

    Raises:
        ValueError: the text is not a non-negative number with a known unit, or it does
            not come to a whole number of bytes (``0.5B``).
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a number and a unit, {_EXAMPLES}")
    unit = match["unit"].lower()
    if unit not in _MULTIPLIERS:
        raise ValueError(
            f"invalid size {text!r}: unknown unit {match['unit']!r} "
            f"(known: K, M, G, T, Ki, Mi, Gi, Ti, each with an optional B)"
        )
    try:
        number = Decimal(match["number"])
    except InvalidOperation as exc:  # the regex should make this unreachable
        raise ValueError(f"invalid size {text!r}: {exc}") from None
    # Decimal, not float, so 1.1GB is exactly 1_100_000_000 and not one byte short.
    total = number * _MULTIPLIERS[unit]
    if total != total.to_integral_value():
        raise ValueError(f"invalid size {text!r}: {total} is not a whole number of bytes")
    return int(total)


def format_size(n_bytes: int | float) -> str:
    """Render bytes with a binary unit, for tables (``1.50GiB``); exact below 1 KiB."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)}B" if unit == "B" else f"{value:.2f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
