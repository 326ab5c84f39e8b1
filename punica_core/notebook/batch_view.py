"""A small HTML view of how the engine's recent steps were composed: one stacked bar per step,
its token rows coloured by adapter ("base" = no adapter)."""
from __future__ import annotations

import html

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948",
           "#ff9da7", "#9c755f", "#bab0ac"]
BASE_COLOR = "#9e9e9e"


def adapter_colors(names) -> dict[str, str]:
    """A stable colour per adapter key, in the order given; "base" is always grey."""
    colors, i = {}, 0
    for n in names:
        key = n or "base"
        if key in colors:
            continue
        if key == "base":
            colors[key] = BASE_COLOR
        else:
            colors[key] = PALETTE[i % len(PALETTE)]
            i += 1
    return colors


def render_batch(steps, colors: dict[str, str] | None = None, max_steps: int = 16,
                 title: str = "Engine steps (newest last)") -> str:
    """steps: StepRecords (oldest first). Returns HTML: a legend, one bar per step (width =
    token rows, prefill and decode alike), and the latest step's numbers."""
    steps = list(steps)[-max_steps:]
    if not steps:
        return f"<b>{html.escape(title)}</b><br><i>no steps yet</i>"
    colors = dict(colors or {})
    for s in steps:
        for key in s.rows_per_adapter:      # other users' adapters get the next free colours
            if key not in colors:
                used = sum(1 for k in colors if k != "base")
                colors[key] = BASE_COLOR if key == "base" else PALETTE[used % len(PALETTE)]
    widest = max(s.num_rows for s in steps) or 1
    rows = []
    for s in steps:
        segs = "".join(
            f'<div title="{html.escape(k)}: {n} rows" style="display:inline-block;height:10px;'
            f'width:{max(2, round(240 * n / widest))}px;background:{colors.get(k, "#000")}">'
            "</div>"
            for k, n in sorted(s.rows_per_adapter.items()))
        kind = f"{s.prefill_tokens} prefill + {s.decode_rows} decode" if s.prefill_tokens \
            else f"{s.decode_rows} decode"
        rows.append(f'<div style="white-space:nowrap;font-family:monospace;font-size:11px">'
                    f'{segs} <span style="color:#555">{s.num_requests} req, {kind}, '
                    f'{1000 * s.duration_s:.0f} ms</span></div>')
    legend = " ".join(
        f'<span style="display:inline-block;width:10px;height:10px;background:{c}"></span> '
        f"{html.escape(k)}" for k, c in colors.items())
    last = steps[-1]
    summary = (f"last step: {last.num_requests} requests in one batch, "
               f"{last.num_rows} token rows, {len(last.rows_per_adapter)} adapter segment(s), "
               f"{1000 * last.duration_s:.0f} ms; running {last.running}, waiting "
               f"{last.queue_depth}, KV blocks {last.kv_blocks_used}/{last.kv_blocks_total}")
    return (f"<b>{html.escape(title)}</b><div style='font-size:11px'>{legend}</div>"
            + "".join(rows) + f"<div style='font-size:11px'>{html.escape(summary)}</div>")
