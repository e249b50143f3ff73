"""How many jobs the next claim may take: the stage's claim size, or fewer for a
while after a claim ran out of GPU memory.

A claim that ran out of memory is run again in halves (queue_worker.py); the half
that fitted becomes the claim size for the next claims too, so the worker does not
meet the same error on every claim. The memory a claim needs depends on its files
(long ones need more), so the lowering is held for a while, not for good: once the
hold has passed the full size is tried again, and a new out-of-memory lowers it
again (costing one model call per hold).
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_HOLD_S = 600.0  # how long a lowered claim size lasts after the last lowering


class ClaimSize:
    """The claim size in force: ``size(configured)``; ``lower(n)`` after an OOM."""

    def __init__(
        self, hold_s: float = DEFAULT_HOLD_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.hold_s = hold_s
        self._clock = clock
        self._cap: int | None = None  # the lowered size, while one is in force
        self._until = 0.0  # clock time the lowering ends

    @property
    def lowered_to(self) -> int | None:
        """The lowered size in force, or None when claims take the configured size."""
        return self._cap

    def lower(self, size: int) -> bool:
        """Claims take at most ``size`` jobs (at least one) for the next ``hold_s``.

        Returns True when that lowers the size in force (not when it already was as low:
        the hold is renewed either way).
        """
        size = max(1, size)
        lowered = self._cap is None or size < self._cap
        if lowered:
            self._cap = size
        self._until = self._clock() + self.hold_s
        return lowered

    def size(self, configured: int) -> tuple[int, bool]:
        """(jobs the next claim may take, whether a lowering ended just now)."""
        if self._cap is None:
            return configured, False
        if self._clock() >= self._until:
            self._cap = None
            return configured, True
        return min(configured, self._cap), False
