"""A quantity that halves every half-life unless renewed: the decayed request counts
GDSF prices copies with and admission prices loads with."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Decayed:
    """``value`` as of time ``at`` (seconds, the caller's clock)."""

    value: float = 0.0
    at: float = 0.0

    def at_time(self, now: float, half_life_s: float) -> float:
        if math.isinf(half_life_s) or now <= self.at:
            return self.value
        return self.value * 0.5 ** ((now - self.at) / half_life_s)
