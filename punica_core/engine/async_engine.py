"""AsyncEngine: the asyncio face of one engine, for servers. Streams are async iterators; a
consumer that stops reading (client gone, task cancelled) aborts its request."""
from __future__ import annotations

import asyncio

from .engine import Engine
from .loop import EngineLoop
from .sampling import SamplingParams
from .stream import RequestStream


class AsyncEngine:
    def __init__(self, engine: Engine, loop: EngineLoop | None = None):
        self.engine = engine
        self.loop = loop or EngineLoop(engine)
        self.loop.start()

    def submit(self, prompt, params: SamplingParams | None = None, adapter: str | None = None,
               *, messages: list[dict] | None = None, **kw) -> RequestStream:
        """Must be called from inside the event loop that will read the stream."""
        if messages is not None:
            kw["prompt_ids"] = self.engine.encode_chat(messages)
        return self.engine.add_request(prompt, params, adapter,
                                       loop=asyncio.get_running_loop(), **kw).stream

    async def generate(self, prompt, params: SamplingParams | None = None,
                       adapter: str | None = None, **kw):
        """Async iterator of RequestOutputs; leaving the loop early cancels the request."""
        stream = self.submit(prompt, params, adapter, **kw)
        async for out in stream:
            yield out
