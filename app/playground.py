"""The Gradio playground: chat, side-by-side compare, live engine panels, adapter uploads.

Every chat of every browser session goes into the one shared engine loop; Gradio's queue does
not serialise them (concurrency_limit=None), so the engine batches them together. Handlers are
in playground_chat.py, panel data in panels.py, uploads in playground_uploads.py."""
from __future__ import annotations

import gradio as gr
from fastapi import FastAPI

from punica_core import PunicaError

from . import panels
from .playground_chat import (BASE, MAX_COMPARE, NONE, add_user_message, adapter_choices,
                              check_message, make_compare, make_respond)
from .playground_uploads import register_upload
from .state import ServerState

PLOT_H = 230
FMT = dict(x_axis_format=",~f", y_axis_format=",~f")     # "0", not "0.000000", when idle


def build_playground(state: ServerState) -> gr.Blocks:
    engine = state.engine

    def dropdown_updates():
        names = adapter_choices(state)
        return (gr.update(choices=names), gr.update(choices=names[1:]),
                *[gr.update(choices=[NONE] + names) for _ in range(MAX_COMPARE)])

    def upload(name: str, files):
        if not state.config.allow_upload:
            raise gr.Error("Adapter uploads are disabled on this server (--no-upload).")
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        try:
            msg = "✅ " + register_upload(engine, name, paths, state.upload_dir,
                                         state.config.max_upload_mb)
        except PunicaError as e:
            msg = f"❌ refused: {e}"
        # the file box is emptied either way, so the next upload never reuses these files
        return msg, None, panels.adapters_table(engine), *dropdown_updates()

    def unload(name: str):
        try:
            engine.unregister_adapter(name)
            msg = f"✅ unloaded **{name}**"
        except PunicaError as e:
            msg = f"❌ {e}"
        return msg, panels.adapters_table(engine), *dropdown_updates()

    adapter_colors = panels.AdapterColors(engine)

    def live():
        return (panels.status_markdown(engine),
                gr.BarPlot(panels.batch_by_adapter(engine), color_map=adapter_colors()),
                panels.batch_by_phase(engine), panels.latency_over_time(engine),
                panels.throughput_over_time(engine), panels.queue_over_time(engine),
                panels.memory_breakdown(engine), panels.slots_table(engine))

    names = adapter_choices(state)
    with gr.Blocks(title="punica playground") as demo:
        gr.Markdown(f"## punica playground · `{state.base_model_name}` · one shared decode "
                    "loop for every user and adapter")
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="chat", height=380, elem_id="chatbot")
                    msg = gr.Textbox(placeholder="Message (Enter to send)", show_label=False,
                                     elem_id="message")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        clear = gr.Button("Clear", elem_id="clear")
                with gr.Column(scale=1):
                    # custom values pass through so an adapter removed meanwhile reaches the
                    # engine, which names the cause
                    adapter = gr.Dropdown(names, value=BASE, label="adapter",
                                          allow_custom_value=True, elem_id="adapter")
                    system = gr.Textbox(label="system prompt", lines=2)
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05,
                                            label="temperature (0 = greedy)")
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
            crun = gr.Button("Run side by side (one batch)", variant="primary",
                             elem_id="compare-run")
            with gr.Row():
                couts = [gr.Textbox(label=f"answer {i + 1}", lines=10, interactive=False,
                                    elem_id=f"compare-answer-{i + 1}")
                         for i in range(MAX_COMPARE)]
        with gr.Tab("Adapters") as adapters_tab:
            table = gr.Dataframe(panels.adapters_table(engine), label="registered adapters",
                                 interactive=False, elem_id="adapters-table")
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
                                          allow_custom_value=True, elem_id="unload-name")
                    un_btn = gr.Button("Unload", elem_id="unload")
            adapter_status = gr.Markdown(elem_id="adapter-status")

        gr.Markdown("### engine, live (refreshed every second)")
        status = gr.Markdown(elem_id="engine-status")
        with gr.Row():
            by_adapter = gr.BarPlot(x="step", y="rows", color="adapter", x_bin=1,
                                    color_map=adapter_colors(),
                                    title="batch: rows per adapter (last 40 steps)",
                                    height=PLOT_H, **FMT, elem_id="batch-plot")
            by_phase = gr.BarPlot(x="step", y="rows", color="phase", x_bin=1,
                                  color_map=panels.PHASE_COLORS,
                                  title="batch: prefill tokens vs decode rows",
                                  height=PLOT_H, **FMT, elem_id="phase-plot")
            latency = gr.LinePlot(x="seconds ago", y="ms per token", color="quantile",
                                  color_map=panels.QUANTILE_COLORS,
                                  title="per-token latency p50 / p99", height=PLOT_H, **FMT,
                                  elem_id="lat-plot")
        with gr.Row():
            tput = gr.LinePlot(x="seconds ago", y="tokens/s", title="tokens/s",
                               height=PLOT_H, **FMT, elem_id="tput-plot")
            queue = gr.LinePlot(x="seconds ago", y="requests", color="state",
                                color_map=panels.QUEUE_COLORS,
                                title="queue depth and running requests", height=PLOT_H, **FMT,
                                elem_id="queue-plot")
            memory = gr.BarPlot(x="memory", y="MiB", color="part",
                                colors_in_legend=panels.MEMORY_PARTS,
                                title="memory (MiB): engine parts vs the whole",
                                height=PLOT_H, y_axis_format=",~f", elem_id="mem-plot")
            slots = gr.Dataframe(label="adapter slots", interactive=False, elem_id="slots")

        # ---- events -----------------------------------------------------------------------
        respond = make_respond(state)
        chat_inputs = [chatbot, adapter, system, temperature, top_p, max_tokens]
        # an empty message is refused by a check with no outputs: a toast, no error overlay
        ev1 = msg.submit(check_message, msg, None, show_progress="hidden",
                         api_name="check_message") \
            .success(add_user_message, [msg, chatbot], [msg, chatbot], queue=False,
                     api_name=False) \
            .success(respond, chat_inputs, chatbot, concurrency_limit=None, api_name="chat")
        ev2 = send.click(check_message, msg, None, show_progress="hidden", api_name=False) \
            .success(add_user_message, [msg, chatbot], [msg, chatbot], queue=False,
                     api_name=False) \
            .success(respond, chat_inputs, chatbot, concurrency_limit=None, api_name=False)
        stop.click(None, None, None, cancels=[ev1, ev2])
        clear.click(lambda: [], None, chatbot, queue=False, cancels=[ev1, ev2])
        crun.click(make_compare(state), [cprompt, csystem, cmax, *picks], couts,
                   concurrency_limit=None, api_name="compare")
        dropdowns = [adapter, un_name, *picks]
        up_btn.click(upload, [up_name, up_files],
                     [adapter_status, up_files, table, *dropdowns], api_name="upload")
        un_btn.click(unload, [un_name], [adapter_status, table, *dropdowns], api_name="unload")
        adapters_tab.select(lambda: panels.adapters_table(engine), None, table, queue=False,
                            api_name=False)
        for dd in dropdowns:            # an adapter uploaded elsewhere shows in every session
            dd.focus(dropdown_updates, None, dropdowns, queue=False, api_name=False)
        panel_outputs = [status, by_adapter, by_phase, latency, tput, queue, memory, slots]
        gr.Timer(1.0).tick(live, None, panel_outputs, queue=False, api_name=False)
        demo.load(live, None, panel_outputs, queue=False, api_name=False)
    return demo


def mount_playground(app: FastAPI, state: ServerState) -> FastAPI:
    demo = build_playground(state)
    demo.queue(default_concurrency_limit=None, max_size=state.config.max_waiting)
    return gr.mount_gradio_app(app, demo, path="/",
                               max_file_size=f"{state.config.max_upload_mb}mb",
                               footer_links=["api"])
