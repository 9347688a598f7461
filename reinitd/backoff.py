"""Capped exponential backoff with jitter, for every retry loop on both sides of the wire."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, floor: float, ceiling: float) -> float:
    """Attempt 1 waits about `floor`, each further attempt twice as long, never over `ceiling`;
    jittered to between half and all of that, so that many clients do not retry in step."""
    delay: float = min(ceiling, floor * 2 ** (attempt - 1))
    return delay * random.uniform(0.5, 1.0)  # noqa: S311 -- jitter, not cryptography
