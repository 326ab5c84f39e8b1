"""Jupyter widgets over an LLM: side-by-side adapter comparison, adapter loading, and the
benchmark plots. Needs ipywidgets >= 8 (and matplotlib for the plots); nothing else in
punica_core imports this package.

    >>> from punica_core import LLM
    >>> from punica_core.notebook import AdapterLoader, CompareWidget
    >>> llm = LLM("default")
    >>> compare = CompareWidget(llm)
    >>> loader = AdapterLoader(llm, on_load=compare.refresh_adapters)
    >>> display(loader, compare)                 # or drive it from Python:
    >>> result = compare.run("Name a colour.", adapters=["pirate", None])
    >>> result.columns[0].text, result.shared_steps
"""
from .batch_view import adapter_colors, render_batch
from .compare import ColumnResult, CompareResult, CompareWidget
from .loader import AdapterLoader

__all__ = ["CompareWidget", "CompareResult", "ColumnResult", "AdapterLoader", "render_batch",
           "adapter_colors"]
