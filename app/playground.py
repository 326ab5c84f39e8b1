"""The Gradio playground: chat, side-by-side compare, live engine panels, adapter uploads.

Every chat of every browser session goes into the one shared engine loop; Gradio's queue does
not serialise them (concurrency_limit=None), so the engine batches them together.
"""
from __future__ import annotations

import asyncio

import gradio as gr
from fastapi import FastAPI

from punica_core import PunicaError, SamplingParams

from . import panels
from .state import ServerState
from .uploads import register_upload

BASE = "base model, no adapter"
NONE = "(none)"
MAX_COMPARE = 4


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
    msgs = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    return msgs + [{"role": m["role"], "content": text_of(m["content"])} for m in history
                   if m.get("role") in ("user", "assistant")]


def adapter_choices(state: ServerState) -> list[str]:
    return [BASE] + sorted(state.engine.store.names())


def adapter_arg(choice: str | None) -> str | None:
    return None if choice in (None, "", BASE, NONE) else choice


def build_playground(state: ServerState) -> gr.Blocks:
    engine = state.engine

    # ---- chat ------------------------------------------------------------------------------
    def add_user_message(message: str, history: list):
        if not message or not message.strip():
            raise gr.Error("Type a message first: the message is empty.")
        return "", history + [{"role": "user", "content": message}]

    async def respond(history: list, adapter: str, system: str, temperature: float,
                      top_p: float, max_tokens: int):
        """Streams the assistant's answer into the history. Errors become a visible note."""
        history = list(history or [])
        try:
            params = SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature),
                                    top_p=float(top_p))
            stream = state.async_engine.submit(None, params, adapter_arg(adapter),
                                               messages=to_messages(history, system))
        except PunicaError as e:
            history.append({"role": "assistant", "content": f"⚠️ {e}"})
            yield history
            return
        history.append({"role": "assistant", "content": ""})
        async for out in stream:            # leaving early (stop, tab closed) aborts it
            history[-1] = {"role": "assistant", "content": out.text}
            if out.finish_reason == "error":
                history[-1]["content"] = f"{out.text}\n\n⚠️ {out.error}"
            yield history

    # ---- compare ---------------------------------------------------------------------------
    async def compare(prompt: str, system: str, max_tokens: int, *picks):
        chosen = [(i, p) for i, p in enumerate(picks) if p and p != NONE]
        texts = [""] * MAX_COMPARE
        if not prompt or not prompt.strip():
            raise gr.Error("Type a prompt first: the prompt is empty.")
        if len(chosen) < 2:
            raise gr.Error("Pick at least two adapters (or the base model) to compare.")
        params = SamplingParams(max_tokens=int(max_tokens), temperature=0)
        msgs = to_messages([{"role": "user", "content": prompt}], system)
        streams = {}
        try:
            for i, pick in chosen:          # all submitted before any is read: one batch
                streams[i] = state.async_engine.submit(None, params, adapter_arg(pick),
                                                       messages=msgs)
        except PunicaError as e:
            for s in streams.values():
                s.cancel()
            raise gr.Error(str(e))
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
                texts[i] = out.text if out.finish_reason != "error" else f"⚠️ {out.error}"
                yield tuple(texts)
        finally:
            for t in tasks:
                t.cancel()

    # ---- adapters ----------------------------------------------------------------------------
    def upload(name: str, files):
        if not state.config.allow_upload:
            raise gr.Error("Uploads are disabled on this server (--no-upload).")
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        try:
            msg = "✅ " + register_upload(engine, name, paths, state.upload_dir,
                                         state.config.max_upload_mb)
        except PunicaError as e:
            msg = f"❌ refused: {e}"
        # the file box is emptied either way, so the next upload never reuses these files
        return msg, None, panels.adapters_table(engine), *refresh_dropdowns()

    def unload(name: str):
        try:
            engine.unregister_adapter(name)
            msg = f"✅ unloaded **{name}**"
        except PunicaError as e:
            msg = f"❌ {e}"
        return msg, panels.adapters_table(engine), *refresh_dropdowns()

    def refresh_dropdowns():
        names = adapter_choices(state)
        return (gr.update(choices=names), gr.update(choices=names[1:]),
                *[gr.update(choices=[NONE] + names) for _ in range(MAX_COMPARE)])

    def live():
        return (panels.status_markdown(engine), panels.batch_composition(engine),
                panels.latency_over_time(engine), panels.memory_breakdown(engine))

    # ---- layout ------------------------------------------------------------------------------
    names = adapter_choices(state)
    with gr.Blocks(title="punica playground") as demo:
        gr.Markdown(f"## punica playground · `{state.base_model_name}` · one shared decode "
                    "loop for every user and adapter")
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="chat", height=420, elem_id="chatbot")
                    msg = gr.Textbox(placeholder="Message (Enter to send)", show_label=False,
                                     elem_id="message")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        stop = gr.Button("Stop", elem_id="stop")
                        clear = gr.Button("Clear", elem_id="clear")
                with gr.Column(scale=1):
                    # custom values allowed so that an adapter removed meanwhile reaches the
                    # engine, which names the cause
                    adapter = gr.Dropdown(names, value=BASE, label="adapter",
                                          allow_custom_value=True, elem_id="adapter")
                    system = gr.Textbox(label="system prompt", lines=2)
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature")
                    top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top-p")
                    max_tokens = gr.Slider(1, 1024, value=256, step=1, label="max tokens")
        with gr.Tab("Compare"):
            cprompt = gr.Textbox(label="prompt", lines=2, elem_id="compare-prompt")
            with gr.Row():
                csystem = gr.Textbox(label="system prompt")
                cmax = gr.Slider(1, 512, value=128, step=1, label="max tokens (greedy)")
            with gr.Row():
                picks = [gr.Dropdown([NONE] + names, label=f"column {i + 1}",
                                     allow_custom_value=True,
                                     value=(names[i] if i < min(2, len(names)) else NONE))
                         for i in range(MAX_COMPARE)]
            crun = gr.Button("Run side by side (one batch)", variant="primary")
            with gr.Row():
                couts = [gr.Textbox(label=f"answer {i + 1}", lines=10, interactive=False)
                         for i in range(MAX_COMPARE)]
        with gr.Tab("Adapters"):
            table = gr.Dataframe(panels.adapters_table(engine), label="registered adapters",
                                 interactive=False)
            with gr.Row():
                with gr.Column():
                    up_name = gr.Textbox(label="name for the uploaded adapter",
                                         elem_id="upload-name")
                    up_files = gr.File(label="a .zip of a PEFT folder, or adapter_config.json "
                                       "+ adapter_model.safetensors", file_count="multiple",
                                       type="filepath", interactive=state.config.allow_upload,
                                       elem_id="upload-files")
                    up_btn = gr.Button("Validate and register", interactive=
                                       state.config.allow_upload, elem_id="upload")
                with gr.Column():
                    un_name = gr.Dropdown(names[1:], label="unload adapter",
                                          allow_custom_value=True)
                    un_btn = gr.Button("Unload")
            adapter_status = gr.Markdown(elem_id="adapter-status")
        gr.Markdown("### engine, live")
        status = gr.Markdown(elem_id="engine-status")
        with gr.Row():
            batch_plot = gr.BarPlot(x="adapter", y="rows", color="kind",
                                    title="batch composition (rows per adapter, last step)",
                                    height=240, elem_id="batch-plot")
            lat_plot = gr.LinePlot(x="seconds ago", y="ms per token", color="quantile",
                                   title="per-token latency", height=240, elem_id="lat-plot")
            mem_plot = gr.BarPlot(x="part", y="MiB", title="memory", height=240,
                                  elem_id="mem-plot")

        # ---- events -----------------------------------------------------------------------
        chat_inputs = [chatbot, adapter, system, temperature, top_p, max_tokens]
        ev1 = msg.submit(add_user_message, [msg, chatbot], [msg, chatbot], queue=False) \
            .then(respond, chat_inputs, chatbot, concurrency_limit=None, api_name="chat")
        ev2 = send.click(add_user_message, [msg, chatbot], [msg, chatbot], queue=False) \
            .then(respond, chat_inputs, chatbot, concurrency_limit=None, api_name=False)
        stop.click(None, None, None, cancels=[ev1, ev2])
        clear.click(lambda: [], None, chatbot, queue=False)
        crun.click(compare, [cprompt, csystem, cmax, *picks], couts, concurrency_limit=None,
                   api_name="compare")
        dd_outputs = [adapter, un_name, *picks]
        up_btn.click(upload, [up_name, up_files],
                     [adapter_status, up_files, table, *dd_outputs], api_name="upload")
        un_btn.click(unload, [un_name], [adapter_status, table, *dd_outputs], api_name="unload")
        adapter.focus(lambda: gr.update(choices=adapter_choices(state)), None, adapter,
                      queue=False)
        timer = gr.Timer(1.0)
        timer.tick(live, None, [status, batch_plot, lat_plot, mem_plot], queue=False,
                   api_name=False)
        demo.load(live, None, [status, batch_plot, lat_plot, mem_plot], queue=False)
    return demo


def mount_playground(app: FastAPI, state: ServerState) -> FastAPI:
    demo = build_playground(state)
    demo.queue(default_concurrency_limit=None, max_size=state.config.max_waiting)
    return gr.mount_gradio_app(app, demo, path="/",
                               max_file_size=f"{state.config.max_upload_mb}mb",
                               footer_links=["api"])
