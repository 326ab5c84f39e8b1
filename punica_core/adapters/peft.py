"""Reads PEFT LoRA adapters (a folder, a .zip, or uploaded files), validates them against the
base model, and folds the scaling into B. What cannot be served is refused with an
AdapterError naming the file and the cause. Pickled weights are never unpickled.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterError
from ..model.config import PROJECTIONS, ModelConfig
from .plan_memo import PlanMemo
from .stacking import (Blob, TensorRef, byte_tensor, check_all_finite, stack_projection,
                       tensor_refs)
from .weights_reader import Alloc, ReadBuffers, lease_buffers, read_weights_file

__all__ = ["LoraAdapter", "RawWeights", "AdapterPlan", "ReadBuffers", "parse_adapter",
           "inspect_adapter", "read_raw_adapter", "read_adapter_files", "read_weights_file",
           "validate_name"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_CONFIG_BYTES = 1 << 20
MAX_ZIP_MEMBERS = 64
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (adapter name optional)
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\."
                    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\."
                    r"lora_(A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$")
_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclass
class RawWeights:
    """An adapter's weights file as read, for stacking on the device at slot load
    (`read_raw_adapter`): the copy, the transpose, the scaling and the NaN / inf check run
    there instead of on the host."""
    blob: torch.Tensor              # uint8 [file bytes] (pinned on CUDA hosts)
    items: dict[str, list[tuple[int, TensorRef, TensorRef, float]]]  # AdapterPlan.items
    where: str                      # the weights file, for error messages


@dataclass
class LoraAdapter:
    """A validated adapter on the host, scaling folded into B.

    weights[proj] = (a [layers, r, in], b [layers, r, out]) in the dtype asked for (the store
    asks for the slot pool's); layers the adapter does not touch are zero. Or, with `raw`
    set, weights is empty and the file's bytes are stacked into the slot on the device.
    """
    name: str
    source: str
    rank: int
    alpha: float
    use_rslora: bool
    targets: tuple[str, ...]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    nbytes: int = 0                 # bytes of real (unpadded) weights, as stored in the file
    base_model: str | None = None
    raw: RawWeights | None = field(default=None, repr=False)

    def rank_of(self, proj: str) -> int:
        if self.raw is not None:
            return max((a.shape[0] for _, a, _, _ in self.raw.items.get(proj, ())), default=0)
        return self.weights[proj][0].shape[1] if proj in self.weights else 0


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise AdapterError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' "
                           "or '-', starting with a letter or digit")
    return name


# ---- reading the two files from a folder, a zip, or memory ---------------------------------

def _read_folder(folder: Path, max_bytes: int,
                 alloc: Alloc | None = None) -> tuple[bytes, memoryview]:
    _check_folder(folder, max_bytes)
    return ((folder / CONFIG_NAME).read_bytes(),
            read_weights_file(folder / WEIGHTS_NAME, max_bytes, alloc))


def _check_folder(folder: Path, max_bytes: int) -> None:
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    if not w_path.is_file():
        pickled = [n for n in PICKLED_NAMES if (folder / n).exists()]
        if pickled:
            raise AdapterError(f"{folder / pickled[0]}: pickled weights are never loaded; "
                               f"save the adapter with safetensors ({WEIGHTS_NAME})")
        raise AdapterError(f"{folder}: no {WEIGHTS_NAME}")
    for p in (cfg_path, w_path):
        if p.is_symlink():
            raise AdapterError(f"{p}: symbolic links are not followed")
    if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{cfg_path}: config larger than {MAX_CONFIG_BYTES} bytes")
    if w_path.stat().st_size > max_bytes:
        raise AdapterError(f"{w_path}: {w_path.stat().st_size} bytes, over the "
                           f"{max_bytes}-byte limit")


def _read_folder_header(folder: Path, max_bytes: int) -> tuple[bytes, bytes, int]:
    """(config, the weights file's first bytes up to the end of its header, its size)."""
    _check_folder(folder, max_bytes)
    w_path = folder / WEIGHTS_NAME
    size = w_path.stat().st_size
    with open(w_path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            n = struct.unpack("<Q", head)[0]
            if n <= min(size - 8, 16 << 20):
                head += f.read(n)
    return (folder / CONFIG_NAME).read_bytes(), head, size


def _read_zip(data: bytes | Path, label: str, max_bytes: int) -> tuple[bytes, bytes]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (zipfile.BadZipFile, OSError) as e:
        raise AdapterError(f"{label}: not a valid .zip archive ({e})") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > MAX_ZIP_MEMBERS:
            raise AdapterError(f"{label}: {len(infos)} files in the archive, more than "
                               f"{MAX_ZIP_MEMBERS}")
        by_base: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            if name.startswith("/") or ".." in Path(name).parts or "\\" in name:
                raise AdapterError(f"{label}: unsafe path {name!r} in archive")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise AdapterError(f"{label}: symbolic link {name!r} in archive")
            base = Path(name).name
            if base.endswith(".zip"):
                raise AdapterError(f"{label}: nested archive {name!r} is not accepted")
            if base in (CONFIG_NAME, WEIGHTS_NAME) + PICKLED_NAMES:
                if len(Path(name).parts) > 2:
                    raise AdapterError(f"{label}: {name!r} is nested too deep; put the adapter "
                                       "files at the top of the archive or in one folder")
                if base in by_base:
                    raise AdapterError(f"{label}: two copies of {base} in archive")
                by_base[base] = info
        if CONFIG_NAME not in by_base:
            raise AdapterError(f"{label}: no {CONFIG_NAME} in archive (not a PEFT adapter)")
        if WEIGHTS_NAME not in by_base:
            if any(n in by_base for n in PICKLED_NAMES):
                raise AdapterError(f"{label}: pickled weights are never loaded; save the "
                                   f"adapter with safetensors ({WEIGHTS_NAME})")
            raise AdapterError(f"{label}: no {WEIGHTS_NAME} in archive")
        limits = {CONFIG_NAME: MAX_CONFIG_BYTES, WEIGHTS_NAME: max_bytes}
        out = {}
        for base, limit in limits.items():
            info = by_base[base]
            if info.file_size > limit:
                raise AdapterError(f"{label}: {base} is {info.file_size} bytes, over the "
                                   f"{limit}-byte limit")
            with zf.open(info) as f:
                blob = f.read(limit + 1)     # never trust the declared size alone
            if len(blob) > limit:
                raise AdapterError(f"{label}: {base} expands past the {limit}-byte limit")
            out[base] = blob
        return out[CONFIG_NAME], out[WEIGHTS_NAME]


def read_adapter_files(source, max_bytes: int,
                       alloc: Alloc | None = None) -> tuple[bytes, bytes | memoryview, str]:
    """source: a folder, a .zip path, or a dict {filename: bytes} of uploaded files. A
    folder's weights are read into a buffer from alloc (see read_weights_file)."""
    if isinstance(source, dict):
        label = "upload"
        if any(n.endswith(".zip") for n in source):
            zname = next(n for n in source if n.endswith(".zip"))
            return (*_read_zip(source[zname], zname, max_bytes), zname)
        names = {Path(n).name: n for n in source}
        if WEIGHTS_NAME not in names and any(n in names for n in PICKLED_NAMES):
            raise AdapterError(f"{label}: pickled weights are never loaded; upload "
                               f"{WEIGHTS_NAME}")
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in names]
        if missing:
            raise AdapterError(f"{label}: missing {', '.join(missing)} (upload a .zip of a "
                               f"PEFT folder, or {CONFIG_NAME} + {WEIGHTS_NAME})")
        cfg, w = source[names[CONFIG_NAME]], source[names[WEIGHTS_NAME]]
        if len(w) > max_bytes:
            raise AdapterError(f"{label}: weights are {len(w)} bytes, over the "
                               f"{max_bytes}-byte limit")
        if len(cfg) > MAX_CONFIG_BYTES:
            raise AdapterError(f"{label}: config larger than {MAX_CONFIG_BYTES} bytes")
        return cfg, w, label
    path = Path(source).expanduser()
    if path.is_dir():
        return (*_read_folder(path, max_bytes, alloc), str(path))
    if path.is_file():
        if path.suffix == ".zip" or zipfile.is_zipfile(path):
            if path.stat().st_size > max_bytes + MAX_CONFIG_BYTES:
                raise AdapterError(f"{path}: archive of {path.stat().st_size} bytes, over the "
                                   "size limit")
            return (*_read_zip(path, str(path), max_bytes), str(path))
        if path.name in PICKLED_NAMES:
            raise AdapterError(f"{path}: pickled weights are never loaded")
        raise AdapterError(f"{path}: not a PEFT adapter (expected a folder or a .zip)")
    raise AdapterError(f"{path}: no such adapter folder or file")


# ---- validation -----------------------------------------------------------------------------

def _parse_config(raw: bytes, label: str) -> dict:
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{label}/{CONFIG_NAME}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{label}/{CONFIG_NAME}: expected a JSON object")
    return cfg


def _check_config(cfg: dict, label: str) -> None:
    where = f"{label}/{CONFIG_NAME}"
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise AdapterError(f"{where}: peft_type {ptype} is not LoRA")
    if cfg.get("use_dora"):
        raise AdapterError(f"{where}: DoRA adapters (use_dora=true) are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save {cfg['modules_to_save']} is not supported "
                           "(the adapter replaces whole modules, which cannot be batched)")
    if cfg.get("bias", "none") not in ("none", None) or cfg.get("lora_bias"):
        raise AdapterError(f"{where}: LoRA bias terms are not supported (bias must be 'none')")
    types = {"use_dora": bool, "use_rslora": bool, "rank_pattern": dict, "alpha_pattern": dict,
             "modules_to_save": list, "layers_to_transform": (list, int)}
    for key, kind in types.items():
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):
            raise AdapterError(f"{where}: {key} has the wrong type ({type(cfg[key]).__name__})")
    for key in ("rank_pattern", "alpha_pattern"):
        for k, v in (cfg.get(key) or {}).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise AdapterError(f"{where}: {key}[{k!r}] must be a positive number")
    targets = cfg.get("target_modules") or []
    if not (isinstance(targets, str) or (isinstance(targets, list)
                                         and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{where}: target_modules must be a list of module names")
    names = [targets] if isinstance(targets, str) else list(targets)
    for t in names:
        base = str(t).split(".")[-1]
        if base in ("embed_tokens", "lm_head", "wte", "embeddings"):
            raise AdapterError(f"{where}: LoRA on {base} (embeddings / lm_head) is not supported")
        if isinstance(targets, list) and base not in PROJECTIONS and base != "all-linear":
            raise AdapterError(f"{where}: unknown target module {t!r}; supported: "
                               f"{', '.join(PROJECTIONS)}")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key, 8)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                or v <= 0:
            raise AdapterError(f"{where}: {key} must be a positive number, got {v!r}")


def _check_header(blob: bytes | memoryview, label: str, max_tensor_elems: int,
                  file_len: int | None = None) -> dict:
    """Reads the safetensors header ourselves first, so lying or huge headers fail cleanly.
    blob: the file, or only its first bytes (at least the header) with file_len its size."""
    where = f"{label}/{WEIGHTS_NAME}"
    total = len(blob) if file_len is None else file_len
    if total < 8 or len(blob) < 8:
        raise AdapterError(f"{where}: truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(total - 8, 16 << 20) or 8 + n > len(blob):
        raise AdapterError(f"{where}: header length {n} exceeds the file")
    try:
        header = json.loads(bytes(blob[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{where}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{where}: corrupt safetensors header")
    data_len = total - 8 - n
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(meta, dict) or meta.get("dtype") not in _ST_DTYPES:
            raise AdapterError(f"{where}: tensor {key!r} has unsupported dtype "
                               f"{meta.get('dtype') if isinstance(meta, dict) else meta!r}")
        shape, offs = meta.get("shape"), meta.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
                and isinstance(offs, list) and len(offs) == 2
                and all(isinstance(o, int) for o in offs)):
            raise AdapterError(f"{where}: tensor {key!r} has a malformed entry")
        elems = math.prod(shape)
        if elems > max_tensor_elems:
            raise AdapterError(f"{where}: tensor {key!r} declares shape {shape}, too large")
        if not 0 <= offs[0] <= offs[1] <= data_len or \
                offs[1] - offs[0] != elems * _ST_DTYPES[meta["dtype"]]:
            raise AdapterError(f"{where}: tensor {key!r} data does not match its header "
                               "(truncated or corrupt file)")
    return header


def _pattern_value(patterns: dict, module: str, default):
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


# what reading or parsing an adapter may raise that we did not foresee
_UNFORESEEN = (ValueError, TypeError, KeyError, IndexError, OverflowError, OSError, RuntimeError)


@contextmanager
def _as_adapter_error(name: str) -> Iterator[None]:
    """A safety net: whatever we did not foresee still ends as the adapter's own error."""
    try:
        yield
    except AdapterError:
        raise
    except _UNFORESEEN as e:
        raise AdapterError(f"adapter {name!r}: malformed ({type(e).__name__}: {e})") from None


def parse_adapter(name: str, source, model_cfg: ModelConfig, max_rank: int,
                  max_bytes: int = 512 << 20, dtype: torch.dtype = torch.float32,
                  pin_memory: bool = False, buffers: ReadBuffers | None = None) -> LoraAdapter:
    """Reads and validates an adapter; raises AdapterError naming the cause. The stacked
    weights are made in `dtype` (the scaling is folded in float32 first), in pinned memory if
    asked, so that a slot load is one plain copy. buffers: where a folder's weights file is
    read into (a fresh buffer without)."""
    with _as_adapter_error(name):
        return _parse_adapter(name, source, model_cfg, max_rank, max_bytes, dtype, pin_memory,
                              buffers)


@dataclass
class AdapterPlan:
    """What an adapter's config and safetensors header say, checked against the base model:
    everything but the weight values. per_proj[proj] = [(layer, key of A, key of B, rank,
    scale)], sorted by layer."""
    name: str
    label: str
    cfg: dict
    header: dict
    per_proj: dict[str, list[tuple[int, str, str, int, float]]]
    file_bytes: int
    alpha: float
    use_rslora: bool
    base_model: str | None
    data_start: int                 # where the tensor data begins: 8 + the header's length
    # per_proj with TensorRefs for the keys: [(layer, a, b, scale)], what stacking takes
    items: dict[str, list[tuple[int, TensorRef, TensorRef, float]]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(r for items in self.per_proj.values() for _, _, _, r, _ in items)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(p for p in PROJECTIONS if p in self.per_proj)


# checked plans by structure (see _plan): a fleet of fine-tunes made by one recipe shares one.
# A 7B plan holds ~0.4 MB of Python objects (header, per-layer refs): 64 stay at most
_PLANS = PlanMemo(size=64)


def _plan(name: str, raw_cfg: bytes, head: bytes, label: str, model_cfg: ModelConfig,
          max_rank: int, file_len: int | None = None) -> AdapterPlan:
    """The adapter's config and header checked against the base model. Adapters of one
    structure (the same header bytes, file size and scaling settings) share one header check:
    it is pure Python over every tensor (~1.4 ms for a 7B adapter on a 2-core CPU), which loader
    threads ran holding the GIL while the engine thread waited for it at each torch call of a
    slot load (a cold 1000-adapter run: ~24 ms per slot load, against ~3 ms)."""
    validate_name(name)
    cfg = _parse_config(raw_cfg, label)
    _check_config(cfg, label)
    key = _PLANS.key(head, file_len, cfg, model_cfg, max_rank)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _check_plan(name, cfg, head, label, model_cfg, max_rank, file_len)
        _PLANS.put(key, plan)
    return dataclasses.replace(plan, name=name, label=label, cfg=cfg,
                               base_model=cfg.get("base_model_name_or_path"))


def _check_plan(name: str, cfg: dict, head: bytes, label: str, model_cfg: ModelConfig,
                max_rank: int, file_len: int | None) -> AdapterPlan:
    where = f"{label}/{WEIGHTS_NAME}"
    biggest = max(i * o for i, o in model_cfg.proj_shapes.values())
    header = _check_header(head, label, max_tensor_elems=biggest, file_len=file_len)
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        raise AdapterError(f"{where}: no tensors")
    for k in keys:
        if "lora_embedding" in k or "embed_tokens" in k or "lm_head" in k:
            raise AdapterError(f"{where}: {k!r}: LoRA on embeddings / lm_head is not supported")
        if "magnitude" in k:
            raise AdapterError(f"{where}: {k!r}: DoRA weights are not supported")
        if not KEY_RE.match(k):
            raise AdapterError(f"{where}: unexpected tensor {k!r} (only lora_A / lora_B of "
                               f"{', '.join(PROJECTIONS)} can be served)")
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for k in keys:
        layer, proj, ab = KEY_RE.match(k).groups()
        layer = int(layer)
        if layer >= model_cfg.num_layers:
            raise AdapterError(f"{where}: {k!r}: layer {layer} but the base model has "
                               f"{model_cfg.num_layers} layers (adapter made for another model?)")
        pairs.setdefault((layer, proj), {})[ab] = k
    alpha = float(cfg.get("lora_alpha", 8))
    default_r = int(cfg.get("r", 8))
    rslora = bool(cfg.get("use_rslora", False))
    per_proj: dict[str, list[tuple[int, str, str, int, float]]] = {}
    for (layer, proj), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: layer {layer} {proj} has lora_{list(ab)[0]} without "
                               "its partner")
        a, b = header[ab["A"]]["shape"], header[ab["B"]]["shape"]
        fan_in, fan_out = model_cfg.proj_shapes[proj]
        r = a[0] if len(a) == 2 else -1
        if len(a) != 2 or len(b) != 2 or a[1] != fan_in or b != [fan_out, r]:
            raise AdapterError(
                f"{where}: layer {layer} {proj}: lora_A {list(a)} / lora_B "
                f"{list(b)} do not fit the base model, which needs [r, {fan_in}] / "
                f"[{fan_out}, r] (adapter made for another base model?)")
        if r < 1 or r > max_rank:
            raise AdapterError(f"{where}: layer {layer} {proj}: rank {r} is over the server's "
                               f"max rank {max_rank}")
        kind = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        module = f"model.layers.{layer}.{kind}.{proj}"
        mod_alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha))
        mod_r = int(_pattern_value(cfg.get("rank_pattern"), module, default_r))
        if mod_r != r:
            raise AdapterError(f"{where}: layer {layer} {proj}: weights have rank {r} but the "
                               f"config says r={mod_r}")
        scale = mod_alpha / (math.sqrt(r) if rslora else r)
        per_proj.setdefault(proj, []).append((layer, ab["A"], ab["B"], r, scale))
    data_start = 8 + struct.unpack("<Q", head[:8])[0]
    refs = tensor_refs(header, data_start)     # offsets: no torch call per tensor
    items = {proj: [(layer, refs[ka], refs[kb], scale) for layer, ka, kb, _, scale in run]
             for proj, run in per_proj.items()}
    return AdapterPlan(name, label, cfg, header, per_proj,
                       len(head) if file_len is None else file_len, alpha, rslora,
                       cfg.get("base_model_name_or_path"), data_start, items)


def inspect_adapter(name: str, source, model_cfg: ModelConfig, max_rank: int,
                    max_bytes: int = 512 << 20) -> AdapterPlan:
    """Checks an adapter folder without reading its weights: the config, the safetensors
    header (names, shapes, dtypes, offsets against the file size) and the fit to the base
    model. The weight values (NaN / inf) are checked when it is parsed."""
    with _as_adapter_error(name):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise AdapterError(f"{folder}: lazy registration needs an adapter folder")
        raw_cfg, head, size = _read_folder_header(folder, max_bytes)
        return _plan(name, raw_cfg, head, str(folder), model_cfg, max_rank, file_len=size)


def read_raw_adapter(name: str, folder, model_cfg: ModelConfig, max_rank: int,
                     max_bytes: int = 512 << 20, pin_memory: bool = False) -> LoraAdapter:
    """An adapter folder read for stacking on the device: the config and header checked as by
    parse_adapter, the weights file read into one (pinned, if asked) buffer that the adapter
    keeps. The weight values are checked when a slot load stacks them (SlotPool)."""
    with _as_adapter_error(name):
        folder = Path(folder).expanduser()
        kept = []

        def alloc(size: int) -> torch.Tensor:      # the buffer the adapter keeps
            kept.append(torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory))
            return kept[-1]
        raw_cfg, view = _read_folder(folder, max_bytes, alloc)
        plan = _plan(name, raw_cfg, view, str(folder), model_cfg, max_rank)
        raw = RawWeights(kept[0], plan.items, f"{folder}/{WEIGHTS_NAME}")
        return LoraAdapter(name=name, source=str(folder), rank=plan.rank, alpha=plan.alpha,
                           use_rslora=plan.use_rslora, targets=plan.targets, weights={},
                           nbytes=len(view), base_model=plan.base_model, raw=raw)


def _parse_adapter(name, source, model_cfg, max_rank, max_bytes, dtype, pin,
                   buffers=None) -> LoraAdapter:
    with lease_buffers(buffers) as alloc:
        raw_cfg, blob, label = read_adapter_files(source, max_bytes, alloc)
        plan = _plan(name, raw_cfg, blob, label, model_cfg, max_rank)
        where = f"{label}/{WEIGHTS_NAME}"
        nbytes = len(blob)
        blob = Blob(byte_tensor(blob))
        weights = {}
        for proj, items in plan.items.items():
            weights[proj] = stack_projection(model_cfg, proj, items, blob, dtype, pin)
        check_all_finite(weights, where)
        del blob                    # views of the read buffer, which the lease takes back
    targets = tuple(p for p in PROJECTIONS if p in weights)
    return LoraAdapter(name=name, source=label, rank=max(A.shape[1] for A, _ in weights.values()),
                       alpha=plan.alpha, use_rslora=plan.use_rslora, targets=targets,
                       weights=weights, nbytes=nbytes, base_model=plan.base_model)
