"""A log throttle: floods are counted in full and logged a line per interval."""

from __future__ import annotations

import time
from collections import Counter


class LogThrottle:
    """At most one log line per key every `every` seconds; `allow` returns how many were
    suppressed since the last one, or None while the key is quiet."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def allow(self, key: str) -> int | None:
        now = time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            self._suppressed[key] += 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)
