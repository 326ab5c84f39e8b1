"""Adapter uploads from the playground: size limits, then validate, store and register."""
from __future__ import annotations

from pathlib import Path

from punica_core import AdapterError, Engine
from punica_core.adapters.peft import CONFIG_NAME, WEIGHTS_NAME, validate_name

from .adapter_uploads import store_and_register


def register_upload(engine: Engine, name: str, files: list[str], upload_dir: Path,
                    max_mb: int) -> str:
    """files: paths of the uploaded files (a .zip, or adapter_config.json +
    adapter_model.safetensors). Returns a success message; raises AdapterError."""
    name = validate_name((name or "").strip())
    if not files:
        raise AdapterError("choose a .zip of a PEFT folder, or adapter_config.json + "
                           "adapter_model.safetensors")
    blobs: dict[str, bytes] = {}
    for f in files:
        p = Path(f)
        size = p.stat().st_size
        if size > max_mb * 2**20:
            raise AdapterError(f"{p.name}: {size / 2**20:.1f} MB, over the {max_mb} MB "
                               "upload limit")
        blobs[p.name] = p.read_bytes()
    zips = [n for n in blobs if n.endswith(".zip")]
    if len(zips) > 1 or (zips and len(blobs) > 1):
        raise AdapterError(f"{', '.join(blobs)}: upload one .zip at a time, or the two PEFT "
                           "files without a zip")
    if not zips and not any(n.endswith((".json", ".safetensors", ".bin", ".pt")) for n in blobs):
        raise AdapterError(f"{', '.join(blobs)}: not an adapter (upload a .zip of a PEFT "
                           "folder, or adapter_config.json + adapter_model.safetensors)")
    # PEFT names files by convention; accept uploads renamed by the browser (e.g. config.json)
    if not zips:
        renamed = {}
        for n, b in blobs.items():
            if n.endswith(".json"):
                renamed[CONFIG_NAME] = b
            elif n.endswith(".safetensors"):
                renamed[WEIGHTS_NAME] = b
            else:
                renamed[n] = b
        blobs = renamed
    source = {zips[0]: blobs[zips[0]]} if zips else blobs
    info = store_and_register(engine, upload_dir, name, source)
    return (f"registered **{info.name}**: rank {info.rank}, targets {', '.join(info.targets)}, "
            f"{info.nbytes / 1024:.0f} KiB")
