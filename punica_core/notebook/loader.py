"""AdapterLoader: load a PEFT adapter into the engine from a path or from a FileUpload.

The engine's own error message (AdapterError and friends) is shown as it is, in red, and the
widget stays usable: fix the path and press Load again. `load_path()` / `load_upload()` do
the same from Python and return the AdapterInfo, or None after showing the error.
"""
from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as W

from ..errors import PunicaError

UPLOAD_TYPES = ".zip,.json,.safetensors"


class AdapterLoader(W.VBox):
    def __init__(self, llm, on_load=None, path: str = "", **kw):
        super().__init__(**kw)
        self.llm = llm
        self._on_load = [on_load] if on_load else []
        self.last_error: str | None = None
        self.name_box = W.Text(placeholder="name (default: folder or file name)",
                               description="name")
        self.path_box = W.Text(value=path, placeholder="adapters/pirate or a .zip",
                               description="path", layout=W.Layout(width="60%"))
        self.load_button = W.Button(description="Load path", icon="folder-open")
        self.upload = W.FileUpload(accept=UPLOAD_TYPES, multiple=True,
                                   description="Upload")
        self.upload_button = W.Button(description="Load upload", icon="upload")
        self.status_html = W.HTML()
        self.table_html = W.HTML()
        self.load_button.on_click(lambda _: self.load_path())
        self.upload_button.on_click(lambda _: self.load_upload())
        self.children = [
            W.HBox([self.name_box]),
            W.HBox([self.path_box, self.load_button]),
            W.HBox([self.upload, self.upload_button,
                    W.HTML("<small>a .zip of a PEFT folder, or adapter_config.json + "
                           "adapter_model.safetensors</small>")]),
            self.status_html, self.table_html]
        self.refresh()

    def on_load(self, callback) -> None:
        """callback(info) after every successful load (e.g. CompareWidget.refresh_adapters)."""
        self._on_load.append(callback)

    # -- loading ------------------------------------------------------------------------------
    def load_path(self, path: str | None = None, name: str | None = None):
        if path is not None:
            self.path_box.value = str(path)
        path = self.path_box.value.strip()
        if not path:
            return self._error("enter the path of a PEFT adapter folder or .zip")
        default = Path(path.rstrip("/")).name.removesuffix(".zip")
        return self._load(self._name(name, default), path)

    def load_upload(self, files=None, name: str | None = None):
        """files: {filename: bytes}; by default what the FileUpload holds."""
        if files is None:
            files = {f["name"]: bytes(f["content"]) for f in self.upload.value}
        if not files:
            return self._error("choose files to upload first")
        zips = [n for n in files if n.endswith(".zip")]
        default = Path(zips[0]).stem if zips else "upload"
        info = self._load(self._name(name, default), dict(files))
        if info is not None and self.upload.value:
            self.upload.value = ()
        return info

    def _name(self, given: str | None, default: str) -> str:
        if given is not None:
            self.name_box.value = given
        return self.name_box.value.strip() or default

    def _load(self, name: str, source):
        label = source if isinstance(source, str) else "upload"
        self.status_html.value = f"loading {html.escape(name)} from {html.escape(label)}..."
        try:
            info = self.llm.load_adapter(name, source)
        except (PunicaError, OSError, ValueError) as e:
            return self._error(str(e))
        self.last_error = None
        self.status_html.value = (
            f'<span style="color:#1b5e20">loaded <b>{html.escape(info.name)}</b>: rank '
            f'{info.rank}, {", ".join(info.targets)}, {info.nbytes / 2**20:.1f} MiB</span>')
        self.name_box.value = ""
        self.refresh()
        for cb in self._on_load:
            cb(info)
        return info

    def _error(self, message: str) -> None:
        self.last_error = message
        self.status_html.value = (f'<span style="color:#b00020"><b>could not load:</b> '
                                  f"{html.escape(message)}</span>")
        return None

    def refresh(self) -> None:
        infos = self.llm.list_adapters()
        if not infos:
            self.table_html.value = "<i>no adapters loaded</i>"
            return
        rows = "".join(
            f"<tr><td>{html.escape(i.name)}</td><td>{i.rank}</td>"
            f"<td>{html.escape(', '.join(i.targets))}</td><td>{i.nbytes / 2**20:.1f}</td>"
            f"<td>{html.escape(self.llm.engine.adapter_location(i.name))}</td></tr>"
            for i in infos)
        self.table_html.value = (
            "<table style='font-size:12px'><tr><th>adapter</th><th>rank</th><th>targets</th>"
            f"<th>MiB</th><th>where</th></tr>{rows}</table>")
