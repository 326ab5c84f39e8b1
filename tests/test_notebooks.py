"""The notebooks run from top to bottom in a headless kernel, and are committed clean."""
import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _text_outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _execute(path: Path):
    nb = nbformat.read(path, as_version=4)
    env_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path         # the kernel inherits it
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(ROOT)}})
        client.execute()
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    return nb


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"compare_adapters.ipynb", "gpu_benchmarks.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{path.name}: clear the outputs before committing"


def test_compare_adapters_notebook_runs():
    nb = _execute(ROOT / "notebooks" / "compare_adapters.ipynb")
    text = _text_outputs(nb)
    assert "every column is the same as LLM.generate: True" in text
    assert "error shown:" in text and "no such adapter" in text
    assert "engine steps carried every column" in text
    shipped = [p for p in (ROOT / "adapters").glob("*") if (p / "adapter_config.json").is_file()]
    if shipped:
        assert any(f"loaded {p.name}" in text or f"skipped {p.name}" in text for p in shipped)
    else:
        assert "no adapters found in adapters/" in text


def test_gpu_benchmarks_notebook_runs():
    nb = _execute(ROOT / "notebooks" / "gpu_benchmarks.ipynb")
    text = _text_outputs(nb)
    committed = []
    for p in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        try:
            json.loads(p.read_text())
            committed.append(p.name)
        except ValueError:
            assert f"{p.name}: unreadable" in text
    for name in committed:
        assert f"== {name}:" in text            # every readable file is described and drawn
    images = sum("image/png" in out.get("data", {})
                 for cell in nb.cells for out in cell.get("outputs", []))
    assert images >= (1 if committed else 0)


def test_benchmark_plots_read_whatever_is_there(tmp_path, capsys):
    """No hard-coded files: unknown shapes get generic charts, broken and missing ones notes."""
    import matplotlib
    matplotlib.use("Agg")
    from punica_core.notebook.bench import load_results, plot_all

    records = [{"kernel": k, "backend": b, "batch": n, "us": n * (2 if b == "torch" else 1)}
               for k in ("shrink", "expand") for b in ("cuda", "torch") for n in (1, 8, 32)]
    (tmp_path / "kernels_h100.json").write_text(json.dumps({"device": "H100",
                                                            "results": records}))
    (tmp_path / "engine_gpu_x.json").write_text(json.dumps(
        {"benchmark": "engine_gpu", "ours": {m: {"tokens_per_s": i + 1.0}
                                             for i, m in enumerate(("none", "distinct"))}}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "scalars.json").write_text(json.dumps({"wall_s": 1.5}))
    results, notes = load_results(tmp_path)
    assert set(results) == {"kernels_h100.json", "engine_gpu_x.json", "scalars.json"}
    assert any("broken.json" in n for n in notes)
    assert any(n.startswith("engine_cpu.json not committed") for n in notes)
    figs = plot_all(tmp_path, show=False)
    assert figs["kernels_h100.json"] is not None and figs["engine_gpu_x.json"] is not None
    assert figs["scalars.json"] is None
    kernel_axes = figs["kernels_h100.json"].axes
    assert kernel_axes[0].get_xlabel() == "batch" and len(kernel_axes[0].lines) == 4
    assert "note: broken.json" in capsys.readouterr().out
    assert load_results(tmp_path / "nope")[1][0].endswith("no benchmark results yet")
