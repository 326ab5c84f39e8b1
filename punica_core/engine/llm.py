"""LLM: the synchronous, vLLM-shaped API over one engine and its background loop."""
from __future__ import annotations

from ..adapters.store import AdapterInfo
from ..config import EngineConfig
from .engine import Engine
from .loop import EngineLoop
from .request import RequestOutput
from .sampling import SamplingParams
from .stream import RequestStream


class LLM:
    """
    >>> llm = LLM("default")
    >>> llm.load_adapter("pirate", "adapters/pirate")
    >>> outs = llm.generate(["Hi", "Hello"], SamplingParams(max_tokens=32, temperature=0),
    ...                     adapters=["pirate", None])
    >>> outs[0].text, outs[0].token_ids
    """

    def __new__(cls, *args, engines: int | None = None, cluster=None, **kwargs):
        """LLM(model, engines=N) (or cluster=ClusterConfig(...)): the same API over N engines
        on Ray, routed by Punica's scheduler (punica_core.cluster.ClusterLLM)."""
        if cls is LLM and (engines is not None or cluster is not None):
            from ..cluster.llm import ClusterLLM
            return super().__new__(ClusterLLM)
        return super().__new__(cls)

    def __init__(self, model: str = "default", config: EngineConfig | None = None,
                 engine: Engine | None = None, **overrides):
        if engine is None:
            if config is None:
                config = EngineConfig(model=model, **overrides)
            engine = Engine(config)
        self.engine = engine
        self.loop = EngineLoop(engine).start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # -- adapters -----------------------------------------------------------------------------
    def load_adapter(self, name: str, path) -> AdapterInfo:
        """Registers a PEFT adapter (folder or .zip); raises AdapterError if it can't be served."""
        return self.engine.register_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unregister_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.store.infos()

    # -- generation ---------------------------------------------------------------------------
    def submit(self, prompt, params: SamplingParams | None = None, adapter: str | None = None,
               *, messages: list[dict] | None = None, **kw) -> RequestStream:
        """Queues one request and returns its stream (iterate it for RequestOutputs)."""
        if messages is not None:
            kw["prompt_ids"] = self.engine.encode_chat(messages)
        return self.engine.add_request(prompt, params, adapter, **kw).stream

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 adapters=None) -> list[RequestOutput]:
        """prompts: a string, token ids, or a list of either; adapters: one name (or None) for
        all, or one per prompt. Returns one finished RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run([{"prompt": p} for p in prompts], params, adapters)

    def chat(self, conversations, params: SamplingParams | None = None, adapter: str | None = None,
             adapters=None):
        """One conversation (a list of messages) -> one output; a list of them -> a list."""
        single = bool(conversations) and isinstance(conversations[0], dict)
        convs = [conversations] if single else conversations
        items = [{"prompt": None, "messages": c} for c in convs]
        outs = self._run(items, params, adapters if adapters is not None else adapter)
        return outs[0] if single else outs

    def _run(self, items: list[dict], params, adapters) -> list[RequestOutput]:
        n = len(items)
        adapters = adapters if isinstance(adapters, list) else [adapters] * n
        params = params if isinstance(params, list) else [params] * n
        if len(adapters) != n or len(params) != n:
            raise ValueError("adapters and params must be one per prompt")
        streams = []
        try:
            for item, a, p in zip(items, adapters, params):
                streams.append(self.submit(item["prompt"], p, a, messages=item.get("messages"),
                                           enforce_queue_limit=False))
            return [s.result() for s in streams]
        finally:
            for s in streams:
                s.cancel()

    def close(self) -> None:
        self.loop.stop()
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
