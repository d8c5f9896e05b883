"""Delta debugging: the smallest part of a failing input that still fails.

Zeller and Hildebrandt's ddmin ("Simplifying and Isolating Failure-Inducing
Input", 2002): split the input into ``n`` chunks; if one chunk alone still
fails, keep it; else if the input without one chunk still fails, drop that
chunk; else split finer. It ends with a *1-minimal* input (removing any single
item makes the failure go away), or when the test budget runs out.

The test is asynchronous (here it replays a scenario against a server) and
may answer False for inputs that cannot be judged; ddmin treats those as
"does not fail", as the paper does with unresolved outcomes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


async def ddmin(items: Sequence[T], fails: Callable[[list[T]], Awaitable[bool]]) -> list[T]:
    """A 1-minimal failing subsequence of ``items``, which must fail as a whole."""
    current = list(items)
    granularity = 2
    while len(current) >= 2:
        chunks = _split(current, granularity)
        reduced = False
        # Subsets first (a small failing core is found fast), then complements;
        # with two chunks the two are the same tests.
        if granularity > 2:
            for chunk in chunks:
                if await fails(chunk):
                    current, granularity, reduced = chunk, 2, True
                    break
        if not reduced:
            for index in range(len(chunks)):
                rest = [item for i, chunk in enumerate(chunks) if i != index for item in chunk]
                if await fails(rest):
                    current, granularity = rest, max(granularity - 1, 2)
                    reduced = True
                    break
        if not reduced:
            if granularity >= len(current):
                break
            granularity = min(granularity * 2, len(current))
    return current


def _split(items: list[T], parts: int) -> list[list[T]]:
    """``parts`` contiguous chunks of near-equal size (order is kept: it matters here)."""
    size, extra = divmod(len(items), parts)
    chunks: list[list[T]] = []
    start = 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(items[start:end])
        start = end
    return [chunk for chunk in chunks if chunk]
