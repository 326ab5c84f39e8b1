"""Plots of the committed benchmark JSON (benchmarks/results/*.json), whatever is there.

Known schemas (engine_cpu, engine_gpu, serve_load) get a purpose-made chart; anything else
gets generic charts: records (a list of dicts) as lines over their varying numeric field, and
every numeric metric that occurs more than once as bars. No numbers live here: everything
plotted is read from the files. matplotlib is imported when a plot is drawn.
"""
from __future__ import annotations

import fnmatch
import json
from collections import defaultdict
from pathlib import Path

# what the benchmark scripts are expected to commit, to say what is missing
EXPECTED = {
    "engine_cpu.json": "engine vs transformers + PEFT on CPU (benchmarks/engine_cpu.py)",
    "engine_gpu*.json": "engine on a GPU, Punica's adapter mixes (benchmarks/engine_gpu.py)",
    "kernels*.json": "SGMV shrink/expand kernels vs the torch reference (GPU)",
    "serve_load*.json": "streaming clients against the server (benchmarks/serve_load.py)",
}
# numeric fields that describe the set-up rather than measure anything
SETUP_KEYS = {"batch", "prompt_len", "new_tokens", "repeats", "cpus", "torch_threads",
              "adapter_rank", "clients", "max_tokens", "max_batch", "seed", "warmup",
              "iters", "count", "requests_ok", "requests_failed", "distinct_adapters"}
X_CANDIDATES = ("batch", "batch_size", "num_tokens", "tokens", "seq_len", "rank", "segments",
                "num_segments", "distinct_adapters", "adapters", "clients", "n", "size")


def load_results(directory="benchmarks/results") -> tuple[dict[str, dict], list[str]]:
    """Returns ({file name: data}, notes): notes name unreadable files and expected ones that
    are not there yet."""
    directory = Path(directory)
    results, notes = {}, []
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not directory.is_dir():
        notes.append(f"{directory}: no such folder; no benchmark results yet")
    for f in files:
        try:
            results[f.name] = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            notes.append(f"{f.name}: unreadable ({e}); skipped")
    for pattern, what in EXPECTED.items():
        if not any(fnmatch.fnmatch(name, pattern) for name in results):
            notes.append(f"{pattern} not committed yet: {what}")
    return results, notes


def describe(data) -> str:
    """One line of the file's top-level set-up (model, device, batch, ...)."""
    if not isinstance(data, dict):
        return f"{type(data).__name__} of {len(data)} entries"
    parts = [f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in data.items()
             if isinstance(v, (str, int, float, bool))]
    machine = data.get("machine")
    if isinstance(machine, dict):
        parts += [f"{k}={v}" for k, v in machine.items() if k in ("cpus", "torch", "gpu")]
    return ", ".join(parts)


def plot_result(name: str, data):
    """Draws one result file; returns a matplotlib Figure, or None if nothing is plottable."""
    kind = data.get("benchmark", "") if isinstance(data, dict) else ""
    kind = kind or Path(name).stem
    if kind.startswith("engine_cpu") and isinstance(data.get("shapes"), dict):
        return _engine_cpu(name, data)
    return _generic(name, data)


# -- purpose-made ---------------------------------------------------------------------------
def _engine_cpu(name: str, data: dict):
    import matplotlib.pyplot as plt

    shapes = data["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 3.6), squeeze=False)
    for ax, (shape, d) in zip(axes[0], shapes.items()):
        med = d.get("tokens_per_s_median", {})
        runs = d.get("tokens_per_s_all", {})
        scenarios = list(med)
        impls = sorted({i for s in med.values() for i in s}, key=lambda i: i != "ours")
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(scenarios))]
            ys = [med[s].get(impl, 0) for s in scenarios]
            lo = [y - min(runs.get(s, {}).get(impl, [y])) for s, y in zip(scenarios, ys)]
            hi = [max(runs.get(s, {}).get(impl, [y])) - y for s, y in zip(scenarios, ys)]
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3,
                   label="punica-playground" if impl == "ours" else impl)
        ax.set_xticks(range(len(scenarios)), [s.replace("_", " ") for s in scenarios])
        ax.set_ylabel("tokens/s (median, min-max)")
        ax.set_title(f"{shape}: rank {d.get('adapter_rank')}, "
                     f"{len(d.get('adapter_targets', []))} projections", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{name}: {data.get('model', '')}, batch {data.get('batch')}, "
                 f"{data.get('new_tokens')} new tokens", fontsize=11)
    fig.tight_layout()
    return fig


# -- generic --------------------------------------------------------------------------------
def _leaves(obj, path=()):
    """(path, number) for every numeric leaf outside lists."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (str(k),))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, float(obj)


def _record_lists(obj, path=()):
    """(path, records) for every list of at least two dicts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _record_lists(v, path + (str(k),))
    elif isinstance(obj, list):
        if len(obj) >= 2 and all(isinstance(r, dict) for r in obj):
            yield path, obj


def _metric_groups(data) -> dict[str, list[tuple[str, float]]]:
    groups = defaultdict(list)
    for path, v in _leaves(data):
        if not path or path[-1] in SETUP_KEYS or (path[0] in ("machine", "server")):
            continue
        groups[path[-1]].append(("/".join(path[:-1]) or path[-1], v))
    return {k: g for k, g in groups.items() if len(g) >= 2}


def _record_charts(records: list[dict]):
    """-> (x field, {y field: {series label: [(x, y)]}}) or None."""
    numeric = [k for k in records[0] if all(
        isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in records)]
    varying = [k for k in numeric if len({r[k] for r in records}) > 1]
    x = next((k for k in X_CANDIDATES if k in varying), varying[0] if varying else None)
    if x is None:
        return None
    ys = [k for k in varying if k != x and k not in SETUP_KEYS and k not in X_CANDIDATES][:3]
    labels = [k for k in records[0] if isinstance(records[0][k], str)] + \
        [k for k in numeric if k != x and k not in ys and k in varying]
    charts = {}
    for y in ys:
        series = defaultdict(list)
        for r in records:
            series[", ".join(f"{k}={r[k]}" for k in labels) or y].append((r[x], r[y]))
        charts[y] = {s: sorted(pts) for s, pts in series.items()}
    return (x, charts) if charts else None


def _generic(name: str, data):
    import matplotlib.pyplot as plt

    panels = []     # (title, draw(ax))
    for path, records in _record_lists(data):
        made = _record_charts(records)
        if made is None:
            continue
        x, charts = made
        for y, series in charts.items():
            def draw(ax, series=series, x=x, y=y):
                for label, pts in list(series.items())[:10]:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                ax.set_xlabel(x)
                ax.set_ylabel(y)
                if len(series) > 1:
                    ax.legend(fontsize=7)
            panels.append((f"{'/'.join(path) or 'records'}: {y}", draw))
    for metric, items in sorted(_metric_groups(data).items(),
                                key=lambda kv: (not _looks_like_speed(kv[0]), kv[0])):
        def draw(ax, items=items, metric=metric):
            ax.barh([label for label, _ in items], [v for _, v in items])
            ax.set_xlabel(metric)
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize=8)
        panels.append((metric, draw))
    panels = panels[:6]
    if not panels:
        return None
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, draw) in zip(axes.flat, panels):
        draw(ax)
        ax.set_title(title, fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(name, fontsize=11)
    fig.tight_layout()
    return fig


def _looks_like_speed(metric: str) -> bool:
    return any(s in metric for s in ("tokens_per_s", "tok_s", "throughput", "gbps", "tflops"))


def plot_all(directory="benchmarks/results", show=True) -> dict:
    """Loads every result, prints notes for missing or unplottable ones, draws the rest.
    Returns {file name: Figure or None}."""
    results, notes = load_results(directory)
    for note in notes:
        print("note:", note)
    figs = {}
    for name, data in results.items():
        print(f"== {name}: {describe(data)}")
        try:
            figs[name] = plot_result(name, data)
        except Exception as e:  # noqa: BLE001 - one odd file must not hide the others
            print(f"note: {name}: could not plot ({type(e).__name__}: {e})")
            figs[name] = None
            continue
        if figs[name] is None:
            print(f"note: {name}: no series to plot (its numbers are in the line above)")
        elif show:
            import matplotlib.pyplot as plt
            plt.show()
    return figs
