"""RequestStream: a request's outputs, pushed by the engine thread, read by one consumer.

Iterate it synchronously (`for out in stream`) or asynchronously (`async for out in stream`,
when created inside an event loop). Breaking out early, or `cancel()`, aborts the request in
the engine, which frees its KV blocks in the next step.
"""
from __future__ import annotations

import asyncio
import queue

from ..errors import RequestFailedError
from .request import RequestOutput


class RequestStream:
    def __init__(self, request_id: str, abort, loop: asyncio.AbstractEventLoop | None = None):
        self.request_id = request_id
        self._abort = abort
        self._loop = loop
        # SimpleQueue: put is one C call (queue.Queue takes a Condition per put, which beside
        # the engine's other threads cost ~10 us a token on the GPU host)
        self._q: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self.finished = False
        self.last: RequestOutput | None = None

    # engine side --------------------------------------------------------------------------
    def put(self, out: RequestOutput) -> None:
        if self._loop is None:
            self._q.put(out)
            return
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, out)
        except RuntimeError:        # the consumer's event loop is gone: nobody will read
            if not out.finished:
                self._abort(self.request_id)

    # consumer side ------------------------------------------------------------------------
    def cancel(self) -> None:
        if not self.finished:
            self._abort(self.request_id)

    def _seen(self, out: RequestOutput) -> RequestOutput:
        self.last = out
        if out.finished:
            self.finished = True
        return out

    def __iter__(self):
        try:
            while not self.finished:
                yield self._seen(self._q.get())
        finally:
            self.cancel()

    async def __aiter__(self):
        try:
            while not self.finished:
                yield self._seen(await self._q.get())
        finally:
            self.cancel()

    def result(self, raise_on_error: bool = True) -> RequestOutput:
        """Blocks until the request finishes; returns its final output."""
        for _ in self:
            pass
        return self._final(raise_on_error)

    async def aresult(self, raise_on_error: bool = True) -> RequestOutput:
        async for _ in self:
            pass
        return self._final(raise_on_error)

    def _final(self, raise_on_error: bool) -> RequestOutput:
        if raise_on_error and self.last.finish_reason == "error":
            raise RequestFailedError(self.last.error or "request failed")
        return self.last
