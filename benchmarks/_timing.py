"""The benchmarks' one timer (they run as scripts, so this module sits beside them)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` (after one untimed call if
    ``warmup``); ``fn`` must wait for its own result."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
