"""Group a stream into batches of growing size, never holding an item longer than a time limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from minivllm.worker.job_input import BatchSize

T = TypeVar("T")


async def timed_batches(source: AsyncIterator[T], sizes: BatchSize, weight: Callable[[T], int],
                        max_wait: float | None) -> AsyncIterator[list[T]]:
    """Yield lists of items: a list goes out when its total weight reaches ``sizes.current``
    (which then grows), when its first item has waited ``max_wait`` seconds, or at the end.

    The next item is fetched by a task that outlives a timeout, so a slow source loses nothing.
    Closing this generator cancels that task and closes ``source``.
    """
    loop = asyncio.get_running_loop()
    iterator = source.__aiter__()
    pending: list[T] = []
    pending_weight = 0
    deadline: float | None = None
    fetch: asyncio.Future | None = None
    try:
        while True:
            if fetch is None:
                fetch = asyncio.ensure_future(iterator.__anext__())
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait((fetch,), timeout=timeout)
            if done:
                finished, fetch = fetch, None
                try:
                    item = finished.result()
                except StopAsyncIteration:
                    break
                if not pending and max_wait:
                    deadline = loop.time() + max_wait
                pending.append(item)
                pending_weight += weight(item)
                if pending_weight < sizes.current:
                    continue
            if pending:  # full, or timed out
                batch, pending, pending_weight, deadline = pending, [], 0, None
                sizes.update()
                yield batch
        if pending:
            yield pending
    finally:
        if fetch is not None:
            fetch.cancel()
            await asyncio.wait((fetch,))  # let the source run its cleanup
            if not fetch.cancelled():
                fetch.exception()  # retrieved: no "never retrieved" warning
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
