"""Storing an uploaded adapter and registering it: shared by the playground and the API."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from punica_core import AdapterError, Engine
from punica_core.adapters.peft import CONFIG_NAME, WEIGHTS_NAME, read_adapter_files
from punica_core.adapters.store import AdapterInfo


def store_and_register(engine: Engine, upload_dir: Path, name: str,
                       files: dict[str, bytes]) -> AdapterInfo:
    """files: {filename: bytes}, a .zip or the two PEFT files. The two files are kept under
    upload_dir/<name>/ (so the adapter can be re-read after it leaves the host cache) and the
    folder is registered, which validates it; a refused adapter leaves nothing behind."""
    if name in engine.store:
        raise AdapterError(f"an adapter named {name!r} is already registered; unload it first")
    cfg_bytes, weights, _ = read_adapter_files(files, engine.store.max_adapter_bytes)
    folder = upload_dir / name
    tmp = upload_dir / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    (tmp / CONFIG_NAME).write_bytes(cfg_bytes)
    (tmp / WEIGHTS_NAME).write_bytes(weights)
    shutil.rmtree(folder, ignore_errors=True)   # a stale folder: the name is not registered
    tmp.rename(folder)
    try:
        return engine.register_adapter(name, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
