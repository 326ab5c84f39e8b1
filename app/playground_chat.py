"""The playground's chat and compare handlers: async generators over the engine's streams.

Every handler submits into the one shared engine loop and iterates its RequestStream; when
Gradio cancels the event (Stop, Clear, tab closed) the generator is closed, which aborts the
request inside the engine and frees its KV blocks in the next step."""
from __future__ import annotations

import asyncio

import gradio as gr

from punica_core import PunicaError, SamplingParams

from .state import ServerState

BASE = "base model, no adapter"
NONE = "(none)"
MAX_COMPARE = 4
WARN = "⚠️ "
EMPTY = "Type a message first: the message is empty."


def text_of(content) -> str:
    """Gradio 6 history content is a string or a list of blocks; read it through one place."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    if isinstance(content, dict):
        return content.get("text", "")
    return str(content or "")


def to_messages(history: list[dict], system: str) -> list[dict]:
    """Chat-template messages from a Chatbot history. A turn the engine refused (a user message
    answered by a warning note) is left out, so the conversation can go on after it."""
    msgs = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in history:
        role, text = m.get("role"), text_of(m.get("content"))
        if role == "assistant" and text.startswith(WARN):
            if msgs and msgs[-1]["role"] == "user":
                msgs.pop()
        elif role in ("user", "assistant"):
            msgs.append({"role": role, "content": text})
    return msgs


def adapter_choices(state: ServerState) -> list[str]:
    return [BASE] + sorted(state.engine.store.names())


def adapter_arg(choice: str | None) -> str | None:
    return None if choice in (None, "", BASE, NONE) else choice


def check_message(message: str) -> None:
    if not message or not message.strip():
        raise gr.Error(EMPTY, duration=6)


def add_user_message(message: str, history: list):
    return "", list(history or []) + [{"role": "user", "content": message}]


def make_respond(state: ServerState):
    async def respond(history: list, adapter: str, system: str, temperature: float,
                      top_p: float, max_tokens: int):
        """Streams the assistant's answer into the history (temperature 0 is greedy).
        A refused request becomes a visible warning note in this session only."""
        history = list(history or [])
        if not history or history[-1].get("role") != "user" \
                or not text_of(history[-1].get("content")).strip():
            raise gr.Error(EMPTY, duration=6)
        try:
            params = SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature),
                                    top_p=float(top_p))
            stream = state.async_engine.submit(None, params, adapter_arg(adapter),
                                               messages=to_messages(history, system))
        except PunicaError as e:
            yield history + [{"role": "assistant", "content": f"{WARN}{e}"}]
            return
        history.append({"role": "assistant", "content": ""})
        async for out in stream:            # leaving early (stop, tab closed) aborts it
            text = out.text
            if out.finish_reason == "error":
                text = f"{WARN}{out.error}" if not text else f"{text}\n\n{WARN}{out.error}"
            history[-1] = {"role": "assistant", "content": text}
            yield history
    return respond


def make_compare(state: ServerState):
    async def compare(prompt: str, system: str, max_tokens: int, *picks):
        """Streams 2-4 greedy answers side by side: all submitted before any is read, so the
        engine runs them in the same steps."""
        chosen = [(i, p) for i, p in enumerate(picks) if p and p != NONE]
        if not prompt or not prompt.strip():
            raise gr.Error("Type a prompt first: the prompt is empty.")
        if len(chosen) < 2:
            raise gr.Error("Pick at least two adapters (or the base model) to compare.")
        params = SamplingParams(max_tokens=int(max_tokens), temperature=0)
        msgs = to_messages([{"role": "user", "content": prompt}], system)
        streams = {}
        try:
            for i, pick in chosen:
                streams[i] = state.async_engine.submit(None, params, adapter_arg(pick),
                                                       messages=msgs)
        except PunicaError as e:
            for s in streams.values():
                s.cancel()
            raise gr.Error(str(e))
        texts = [""] * MAX_COMPARE
        updates: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            async for out in stream:
                await updates.put((i, out))
            await updates.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in streams.items()]
        try:
            done = 0
            while done < len(tasks):
                i, out = await updates.get()
                if out is None:
                    done += 1
                    continue
                texts[i] = out.text if out.finish_reason != "error" else f"{WARN}{out.error}"
                yield tuple(texts)
        finally:
            for t in tasks:             # closing the pumps closes their streams: aborted
                t.cancel()
    return compare
