"""CompareWidget: one prompt answered by two to six adapters (or the base model) side by side.

All columns' requests are submitted before any stream is read, so the engine serves them in
the same steps (one batch, one adapter segment per column). Each column's stream is read by
its own worker thread, which sets widget values per token (never `with out:` from a thread).
`run()` does the whole thing from Python and returns a CompareResult, so the widget is
testable without a browser; the Run button calls the same `run()` on a worker thread.
"""
from __future__ import annotations

import html
import threading
import time
from dataclasses import asdict, dataclass, field

import ipywidgets as W

from ..engine.sampling import SamplingParams
from ..errors import PunicaError
from .batch_view import adapter_colors, render_batch

BASE_LABEL = "base model"
MIN_COLUMNS, MAX_COLUMNS = 2, 6
DEFAULT_SYSTEM = "You are a helpful assistant."
_REFRESH_S = 0.05           # at most ~20 widget updates a second per column


@dataclass
class ColumnResult:
    adapter: str | None                 # None: the base model
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None    # "stop", "length", "abort", "error"
    error: str | None = None
    request_id: str | None = None
    ttft_s: float | None = None         # submit -> first token
    seconds: float = 0.0                # submit -> last token
    decode_seconds: float = 0.0         # first token -> last token

    @property
    def key(self) -> str:
        """The name the engine's step records use ("base" for no adapter)."""
        return self.adapter or "base"

    @property
    def label(self) -> str:
        return self.adapter or BASE_LABEL

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def ms_per_token(self) -> float | None:
        """Time per output token after the first (the decode rate)."""
        n = self.num_tokens - 1
        return 1000 * self.decode_seconds / n if n > 0 else None

    def stats(self) -> str:
        if self.error:
            return f"error: {self.error}"
        parts = [f"{self.num_tokens} tokens", f"{self.tokens_per_s:.1f} tok/s"]
        if self.ms_per_token is not None:
            parts.append(f"{self.ms_per_token:.0f} ms/token")
        if self.ttft_s is not None:
            parts.append(f"first token {1000 * self.ttft_s:.0f} ms")
        if self.finish_reason:
            parts.append(self.finish_reason)
        return " · ".join(parts)


@dataclass
class CompareResult:
    prompt_ids: list[int]
    params: SamplingParams | None
    columns: list[ColumnResult]
    steps: list = field(default_factory=list)   # StepRecords recorded during the run
    error: str | None = None                    # set when nothing could be submitted

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.columns]

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.error is None for c in self.columns)

    @property
    def shared_steps(self) -> int:
        """Engine steps in which every column's adapter (base included) had token rows."""
        keys = {c.key for c in self.columns}
        return sum(1 for s in self.steps if keys and keys <= set(s.rows_per_adapter))

    def steps_table(self) -> list[dict]:
        """One dict per step, rows per adapter flattened into columns (for pandas)."""
        keys = sorted({k for s in self.steps for k in s.rows_per_adapter})
        table = []
        for i, s in enumerate(self.steps):
            row = {"step": i, "ms": 1000 * s.duration_s, "requests": s.num_requests,
                   "rows": s.num_rows, "prefill_tokens": s.prefill_tokens,
                   "decode_rows": s.decode_rows}
            row.update({f"rows:{k}": s.rows_per_adapter.get(k, 0) for k in keys})
            table.append(row)
        return table

    def summary(self) -> list[dict]:
        return [{"adapter": c.label, "tokens": c.num_tokens, "tok/s": round(c.tokens_per_s, 1),
                 "ms/token": None if c.ms_per_token is None else round(c.ms_per_token, 1),
                 "ttft_ms": None if c.ttft_s is None else round(1000 * c.ttft_s),
                 "finish": c.finish_reason, "error": c.error} for c in self.columns]

    def to_dict(self) -> dict:
        return {"columns": [asdict(c) for c in self.columns], "shared_steps": self.shared_steps,
                "steps": self.steps_table(), "error": self.error}


class _Column:
    """One answer column: an adapter picker, the streamed text, and its speed."""

    def __init__(self, options, value):
        self.picker = W.Dropdown(options=options, value=value, layout=W.Layout(width="95%"))
        self.text = W.HTML(layout=W.Layout(min_height="8em", padding="4px"))
        self.stats = W.HTML()
        self.box = W.VBox([self.picker, self.text, self.stats],
                          layout=W.Layout(flex="1 1 0", min_width="160px", margin="0 4px"))
        self.show(ColumnResult(value), color="#ddd")

    def show(self, res: ColumnResult, color: str | None = None) -> None:
        if color:
            self.text.layout.border_left = f"4px solid {color}"
        body = html.escape(res.text)
        if res.error:
            body += f'<div style="color:#b00020"><b>error:</b> {html.escape(res.error)}</div>'
        self.text.value = f'<div style="white-space:pre-wrap;font-size:13px">{body}</div>'
        self.stats.value = f'<span style="font-size:11px;color:#555">{html.escape(res.stats())}' \
                           "</span>"


class CompareWidget(W.VBox):
    """A prompt box, a system prompt, sampling controls, 2-6 adapter columns, Run/Stop, and a
    live view of the engine's batch. `run(...)` drives it from Python."""

    def __init__(self, llm, adapters: list[str | None] | None = None, prompt: str = "",
                 system_prompt: str = DEFAULT_SYSTEM, max_tokens: int = 64,
                 temperature: float = 0.0, **kw):
        super().__init__(**kw)
        self.llm = llm
        self.last_result: CompareResult | None = None
        self._busy = threading.Lock()
        self._streams: list = []
        self._thread: threading.Thread | None = None

        self.prompt_box = W.Textarea(value=prompt, placeholder="Ask something...",
                                     description="Prompt", layout=W.Layout(width="98%"))
        self.system_box = W.Textarea(value=system_prompt, description="System",
                                     layout=W.Layout(width="98%", height="3em"))
        self.max_tokens_box = W.IntSlider(value=max_tokens, min=1, max=1024,
                                          description="max tokens")
        self.temperature_box = W.FloatSlider(value=temperature, min=0.0, max=2.0, step=0.05,
                                             description="temperature")
        self.top_p_box = W.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05,
                                       description="top p")
        self.seed_box = W.IntText(value=0, description="seed", layout=W.Layout(width="160px"))
        self.columns_count = W.BoundedIntText(value=MIN_COLUMNS, min=MIN_COLUMNS,
                                              max=MAX_COLUMNS, description="columns",
                                              layout=W.Layout(width="160px"))
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = W.Button(description="Stop", icon="stop", disabled=True)
        self.refresh_button = W.Button(description="Refresh adapters", icon="refresh")
        self.status_html = W.HTML()
        self.columns_box = W.HBox(layout=W.Layout(width="100%"))
        self.batch_html = W.HTML(render_batch([]))
        self._columns: list[_Column] = []

        if adapters is None:        # the base model and the first loaded adapters
            names = [i.name for i in llm.list_adapters()]
            adapters = [None] + names[:MIN_COLUMNS]
        self.set_adapters(adapters)
        self.columns_count.observe(lambda ch: self._set_count(ch["new"]), names="value")
        self.run_button.on_click(lambda _: self._run_in_background())
        self.stop_button.on_click(lambda _: self.stop())
        self.refresh_button.on_click(lambda _: self.refresh_adapters())

        self.children = [
            self.prompt_box, self.system_box,
            W.HBox([self.max_tokens_box, self.temperature_box, self.top_p_box, self.seed_box]),
            W.HBox([self.columns_count, self.run_button, self.stop_button, self.refresh_button]),
            self.status_html, self.columns_box, self.batch_html]

    # -- columns ------------------------------------------------------------------------------
    def _options(self) -> list[tuple[str, str | None]]:
        return [(BASE_LABEL, None)] + [(i.name, i.name) for i in self.llm.list_adapters()]

    @property
    def adapters(self) -> list[str | None]:
        """The adapter picked in each column (None: the base model)."""
        return [c.picker.value for c in self._columns]

    def set_adapters(self, adapters: list[str | None]) -> None:
        """Sets the columns (2 to 6) and what each one runs; raises on an unknown adapter."""
        adapters = [a or None for a in adapters]
        if not MIN_COLUMNS <= len(adapters) <= MAX_COLUMNS:
            raise ValueError(f"compare {MIN_COLUMNS} to {MAX_COLUMNS} columns, "
                             f"got {len(adapters)}")
        options = self._options()
        unknown = [a for a in adapters if a not in {v for _, v in options}]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}: load them first (loaded: "
                             f"{[v for _, v in options if v]})")
        self._columns = [_Column(options, a) for a in adapters]
        self.columns_box.children = [c.box for c in self._columns]
        if self.columns_count.value != len(adapters):
            self.columns_count.value = len(adapters)

    def _set_count(self, n: int) -> None:
        n = max(MIN_COLUMNS, min(MAX_COLUMNS, int(n)))
        current = self.adapters
        if n != len(current) and not self._busy.locked():
            self.set_adapters((current + [None] * n)[:n])

    def refresh_adapters(self, *_) -> None:
        """Re-reads the engine's adapters into the pickers (keeps choices still loaded)."""
        options = self._options()
        valid = {v for _, v in options}
        for col in self._columns:
            keep = col.picker.value if col.picker.value in valid else None
            col.picker.options = options
            col.picker.value = keep

    # -- running ------------------------------------------------------------------------------
    def sampling_params(self) -> SamplingParams:
        greedy = self.temperature_box.value == 0
        return SamplingParams(max_tokens=self.max_tokens_box.value,
                              temperature=self.temperature_box.value, top_p=self.top_p_box.value,
                              seed=None if greedy else self.seed_box.value)

    def messages(self) -> list[dict]:
        msgs = []
        if self.system_box.value.strip():
            msgs.append({"role": "system", "content": self.system_box.value})
        return msgs + [{"role": "user", "content": self.prompt_box.value}]

    def run(self, prompt: str | None = None, adapters: list[str | None] | None = None,
            system_prompt: str | None = None, max_tokens: int | None = None,
            temperature: float | None = None) -> CompareResult:
        """Runs the comparison and blocks until every column finished. Arguments given here
        are written into the widget's controls first, so the UI shows what ran."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("a comparison is already running")
        try:
            self._set_running(True)
            result = self._run(prompt, adapters, system_prompt, max_tokens, temperature)
        finally:
            self._streams = []
            self._set_running(False)
            self._busy.release()
        self.last_result = result
        return result

    def _run(self, prompt, adapters, system_prompt, max_tokens, temperature) -> CompareResult:
        try:
            if prompt is not None:
                self.prompt_box.value = prompt
            if system_prompt is not None:
                self.system_box.value = system_prompt
            if max_tokens is not None:
                self.max_tokens_box.value = max_tokens
            if temperature is not None:
                self.temperature_box.value = temperature
            if adapters is not None:
                self.set_adapters(adapters)
            if not self.prompt_box.value.strip():
                raise ValueError("type a prompt first")
            params = self.sampling_params()
            # encode once, then submit every column back to back: they join the same steps
            prompt_ids = self.llm.engine.encode_chat(self.messages())
        except (PunicaError, ValueError) as e:
            return self._failed(str(e))

        columns = [ColumnResult(a) for a in self.adapters]
        colors = adapter_colors(c.key for c in columns)
        t_wall, t0 = time.time(), time.perf_counter()
        streams = []
        try:
            for c in columns:
                streams.append(self.llm.submit(None, params, c.adapter, prompt_ids=prompt_ids))
        except PunicaError as e:
            for s in streams:
                s.cancel()
            return self._failed(str(e))
        self._streams = streams
        self._status(f"running {len(columns)} requests in one batch...")
        readers = []
        for col, res, stream in zip(self._columns, columns, streams):
            res.request_id = stream.request_id
            col.show(res, color=colors[res.key])
            t = threading.Thread(target=self._read, args=(col, res, stream, t0),
                                 name=f"compare-{res.key}", daemon=True)
            t.start()
            readers.append(t)

        metrics = self.llm.engine.metrics
        while alive := [t for t in readers if t.is_alive()]:
            self.batch_html.value = render_batch(metrics.recent(16), colors)   # live view
            alive[0].join(timeout=0.2)
        steps = [s for s in metrics.recent() if s.time >= t_wall]
        self.batch_html.value = render_batch(steps, colors, title="Engine steps of this run")
        result = CompareResult(prompt_ids, params, columns, steps)
        if result.ok:
            wall = max(c.seconds for c in columns) or float("inf")
            total = sum(c.num_tokens for c in columns)
            self._status(f"done: {len(columns)} columns, {total} tokens in {wall:.1f} s "
                         f"({total / wall:.1f} tok/s together), {len(steps)} engine steps, "
                         f"{result.shared_steps} of them with every column in the batch")
        else:
            errs = "; ".join(f"{c.label}: {c.error}" for c in columns if c.error)
            self._status(f"finished with errors: {errs}", error=True)
        return result

    def _read(self, col: _Column, res: ColumnResult, stream, t0: float) -> None:
        """Worker thread: one column's stream -> its widgets, per token (throttled)."""
        first = None
        shown = 0.0
        try:
            for out in stream:
                now = time.perf_counter()
                if out.new_token_ids:
                    if first is None:
                        first = now
                        res.ttft_s = now - t0
                    res.seconds, res.decode_seconds = now - t0, now - first
                res.text, res.token_ids = out.text, list(out.token_ids)
                if out.finished:
                    res.finish_reason, res.error = out.finish_reason, out.error
                elif now - shown >= _REFRESH_S:
                    col.show(res)
                    shown = now
        except Exception as e:  # noqa: BLE001 - shown in the column, the others go on
            res.error = f"{type(e).__name__}: {e}"
        col.show(res)

    def _failed(self, why: str) -> CompareResult:
        self._status(why, error=True)
        return CompareResult([], None, [ColumnResult(a) for a in self.adapters], error=why)

    def stop(self) -> None:
        """Cancels the running comparison's requests (they finish with reason "abort")."""
        for s in list(self._streams):
            s.cancel()

    def _run_in_background(self) -> None:
        if self._busy.locked():
            return
        self._thread = threading.Thread(target=self._button_run, name="compare-run",
                                        daemon=True)
        self._thread.start()

    def _button_run(self) -> None:
        try:
            self.run()
        except Exception as e:  # noqa: BLE001 - a worker thread: show it, keep the widget
            self._status(f"{type(e).__name__}: {e}", error=True)

    def wait(self, timeout: float | None = None) -> CompareResult | None:
        """Waits for a run started by the Run button; returns its result."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.last_result

    def _set_running(self, running: bool) -> None:
        self.run_button.disabled = running
        self.stop_button.disabled = not running
        self.columns_count.disabled = running
        for c in self._columns:
            c.picker.disabled = running

    def _status(self, text: str, error: bool = False) -> None:
        color = "#b00020" if error else "#1b5e20"
        self.status_html.value = f'<span style="color:{color}">{html.escape(text)}</span>'
