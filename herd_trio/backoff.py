"""Capped exponential backoff with jitter, for every retry loop of a server."""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs


@attrs.frozen
class Backoff:
    """Attempt n waits in [hi/2, hi], hi = min(cap, initial * factor**n).

    Half the range is random so a herd restarted at once does not redial in lockstep;
    the floor of hi/2 avoids hammering a neighbour that accepts and hangs up at once.
    `rand` is injectable so tests can ask for the exact ends of the range.
    """

    initial: float = 0.05
    factor: float = 2.0
    cap: float = 1.0  # a restarted neighbour is linked again within about a second
    stable_after: float = 5.0  # seconds of success before the failure count is forgotten
    rand: Callable[[float, float], float] = random.uniform

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures."""
        hi = min(self.cap, self.initial * self.factor ** min(failures, 64))
        return self.rand(hi / 2, hi)
