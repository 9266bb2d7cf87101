"""Bounded waits for the fault tests: poll a condition until it holds, or fail saying what hung."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class Bounded(AssertionError):
    """A wait of a fault test ran out of time: something hung."""


async def until(what: str, within_s: float, check: Callable[[], Any], *, every: float = 0.2) -> Any:
    """Poll ``check()`` (sync or async) until it returns something truthy; raise Bounded after ``within_s``."""
    end = time.monotonic() + within_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise Bounded(f"{what}: not within {within_s:.0f}s")
        await asyncio.sleep(every)
