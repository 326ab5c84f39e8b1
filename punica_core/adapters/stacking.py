"""An adapter's per-layer lora_A / lora_B tensors (views of the file's bytes) stacked into the
slot pool's layout: A [layers, r, in], B [layers, r, out] = lora_B.T * scale, in the pool's
dtype, every element written once; then the NaN / inf check that names the first bad layer.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import AdapterError
from ..model.config import ModelConfig

# dtype -> (same-size int, exponent bits): a float is NaN or inf iff its exponent bits are all set
_EXPONENT_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float16: (torch.int16, 0x7C00),
                  torch.bfloat16: (torch.int16, 0x7F80)}


def finite_layers(w: torch.Tensor) -> torch.Tensor:
    """[layers] bool: no NaN or inf in w[layer]. Reads the exponent bits, which is several
    times faster than torch.isfinite on bf16 tensors on the CPU."""
    if w.dtype not in _EXPONENT_BITS:
        return torch.isfinite(w).flatten(1).all(1)
    int_type, bits = _EXPONENT_BITS[w.dtype]
    return ((w.view(int_type).flatten(1) & bits) != bits).all(1)


def stack_projection(model_cfg: ModelConfig, proj: str, items, blob, dtype: torch.dtype,
                     pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """items: [(layer, a [r, in], b [out, r], scale)], TensorRefs into blob -> (A [layers, r_max, in],
    B [layers, r_max, out]) with B = b.t() * scale, new host tensors (pinned if asked)."""
    r_max = max(a.shape[0] for _, a, _, _ in items)
    fan_in, fan_out = model_cfg.proj_shapes[proj]
    layers = model_cfg.num_layers
    A = torch.empty(layers, r_max, fan_in, dtype=dtype, pin_memory=pin)
    B = torch.empty(layers, r_max, fan_out, dtype=dtype, pin_memory=pin)
    stack_into(A, B, items, blob)
    return A, B


def stack_into(A: torch.Tensor, B: torch.Tensor, items, blob: "Blob") -> None:
    """Writes items (see stack_projection) into A [layers, R, in] and B [layers, R, out]
    (R >= every item's rank; a device slot, or new host tensors): every element once, the
    layers and rank rows the adapter lacks zeroed, the rest copied a run of layers at a time.
    blob: the file's bytes on the items' device (Blob of byte_tensor on the host)."""
    layers, r_max = A.shape[0], A.shape[1]
    run = _file_run(items, layers)
    if run is not None:
        _stack_file_run(A, B, run, blob)
        return
    touched = [False] * layers
    for run in _layer_runs(items):
        lo, hi, r, scale = run[0][0], run[-1][0] + 1, run[0][1].shape[0], run[0][3]
        A[lo:hi, :r].copy_(_run_view(blob, run, 1))         # a converting copy
        _scaled_t(_run_view(blob, run, 2), scale, out=B[lo:hi, :r])
        if r < r_max:
            A[lo:hi, r:].zero_()
            B[lo:hi, r:].zero_()
        touched[lo:hi] = [True] * (hi - lo)
    for lo, hi in _spans([not t for t in touched]):
        A[lo:hi].zero_()
        B[lo:hi].zero_()


def _file_run(items: list, layers: int) -> list | None:
    """items in file order if they are one run there: every layer once, one rank, scale,
    shapes and dtypes, their a (and b) tensors at one byte stride in the file. PEFT's files
    are (sorted by key, layers 0, 1, 10-19, 2, 20-29, 3, 30, 31, 4-9 lie at one stride), so a
    projection is stacked with a few ops whatever the layer order. None otherwise."""
    if len(items) != layers:
        return None
    ordered = sorted(items, key=lambda it: it[1].offset)
    if sorted(it[0] for it in ordered) != list(range(layers)):
        return None
    run = ordered[:1]
    for item in ordered[1:]:
        if not _extends(run, item, consecutive=False):
            return None
        run.append(item)
    return run


def _stack_file_run(A: torch.Tensor, B: torch.Tensor, run: list, blob: "Blob") -> None:
    """A run in file order (_file_run) to A and B: its strided views gathered by layer."""
    where = [0] * len(run)                  # layer -> its place in the file's order
    for k, item in enumerate(run):
        where[item[0]] = k
    order = blob.order(where)
    r, scale = run[0][1].shape[0], run[0][3]
    a = _run_view(blob, run, 1)
    if r == A.shape[1] and a.dtype == A.dtype:
        torch.index_select(a, 0, order, out=A)
    else:
        A[:, :r].copy_(torch.index_select(a, 0, order))     # a converting copy
    # gathering the transposed view makes the transpose part of the gather (CPU, 7B gate_proj
    # B: 1.7 ms with the contiguous mul after it, against 2.8 ms for a mul reading b.mT)
    _scaled(torch.index_select(_run_view(blob, run, 2, transposed=True), 0, order), scale,
            out=B if r == B.shape[1] else B[:, :r])
    if r < A.shape[1]:
        A[:, r:].zero_()
        B[:, r:].zero_()


def byte_tensor(blob: bytes | memoryview) -> torch.Tensor:
    """The file's bytes as a uint8 tensor, without a copy (read-only: nothing writes to it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # "buffer is not writable"
        return torch.frombuffer(blob, dtype=torch.uint8)


class Blob:
    """The file's bytes (a uint8 tensor at offset 0, on the host or the device) and one typed
    view of them per dtype, made once: a run of layers is then one as_strided call. Each torch
    call hands the GIL over, and beside a busy engine loop each hand-over waits up to Python's
    switch interval; the calls, not the copying, were most of a parse there."""

    def __init__(self, data: torch.Tensor, orders: "DeviceOrders | None" = None):
        self.data = data
        self._typed: dict[torch.dtype, torch.Tensor] = {}
        self._device_orders = orders        # the slot pool's, for blobs on its device
        self._orders: dict[tuple[int, ...], torch.Tensor] = {}

    def order(self, where: list[int]) -> torch.Tensor:
        """where as an index tensor on the bytes' device, made once per adapter (its
        projections share one layer order), or once per device through orders."""
        if self._device_orders is not None:
            return self._device_orders.get(where)
        key = tuple(where)
        index = self._orders.get(key)
        if index is None:
            index = self._orders[key] = torch.tensor(where, device=self.data.device)
        return index

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        view = self._typed.get(dtype)
        if view is None:
            n = self.data.numel() // dtype.itemsize * dtype.itemsize
            view = self._typed[dtype] = self.data[:n].view(dtype)
        return view


class DeviceOrders:
    """Layer-order index tensors on one device, each made once (adapters saved alike share
    one) and staged through pinned rows allocated up front: a pinned allocation at slot-load
    time waited up to 0.5 s behind the loader threads' fresh pinned reads (the driver pins
    under one lock). A staging row is written once and never reused."""

    def __init__(self, device: torch.device, num_layers: int, rows: int = 16):
        self.device = torch.device(device)
        self._staging = torch.empty(rows, num_layers, dtype=torch.int64,
                                    pin_memory=self.device.type == "cuda")
        self._staging_np = self._staging.numpy()
        self._used = 0
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    def get(self, where: list[int]) -> torch.Tensor:
        key = tuple(where)
        index = self._index.get(key)
        if index is None:
            if len(where) == self._staging.shape[1] and self._used < len(self._staging):
                self._staging_np[self._used] = where       # numpy: no torch call
                src = self._staging[self._used]
                self._used += 1
            else:       # more orders than rows (or another layer count): rare
                src = torch.tensor(where, pin_memory=self.device.type == "cuda")
            index = self._index[key] = src.to(self.device, non_blocking=True)
        return index


@dataclass(frozen=True)
class TensorRef:
    """Where one of the file's tensors lies in its bytes: plain numbers, no torch object, so a
    parse makes one view per run of layers instead of two per tensor (each torch call hands the
    GIL over once more: beside a busy engine loop that, not the copying, was most of a parse)."""
    offset: int                     # byte offset in the file
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def view(self, blob: torch.Tensor) -> torch.Tensor:
        """The tensor as a view of blob (an aligned copy if its bytes are not aligned to its
        element size: rare, safetensors' writers pad the header)."""
        raw = blob[self.offset:self.offset + self.numel * self.itemsize]
        if self.offset % self.itemsize:
            raw = raw.clone()
        return raw.view(self.dtype).view(self.shape)


def tensor_refs(header: dict, data_start: int) -> dict[str, TensorRef]:
    """The file's tensors as TensorRefs; data_start = 8 + header length. `header` was checked
    by _check_header (offsets inside the file, sizes matching shape and dtype)."""
    return {key: TensorRef(data_start + meta["data_offsets"][0], _TORCH_DTYPES[meta["dtype"]],
                           tuple(meta["shape"]))
            for key, meta in header.items() if key != "__metadata__"}


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F64": torch.float64}


def _layer_runs(items: list) -> list[list]:
    """items (by layer; a and b as TensorRefs) in runs of consecutive layers with one rank,
    dtype and scale, whose a (and b) tensors lie at one byte stride in the file: each run is
    copied by one strided op instead of one per layer (fewer, bigger ops: 7B r16 on 16 cores,
    35 -> 16 ms). PEFT's files (sorted by key) hold layers 0-1, 2-3, 4-9, 10-19, 20-29, ...
    so; any other order only makes more runs."""
    runs = [[items[0]]]
    for item in items[1:]:
        if _extends(runs[-1], item):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _extends(run: list, item, consecutive: bool = True) -> bool:
    """item continues run: the same rank, dtype and scale, its a and b tensors at the run's
    byte stride in the file after the run's last; and (consecutive) the next layer."""
    layer, a, b, scale = item
    last_layer, last_a, last_b, last_scale = run[-1]
    if ((consecutive and layer != last_layer + 1) or scale != last_scale
            or a.shape != last_a.shape or b.shape != last_b.shape or a.dtype != last_a.dtype
            or b.dtype != last_b.dtype):
        return False
    step = (a.offset - last_a.offset, b.offset - last_b.offset)
    if len(run) > 1:
        return step == (run[1][1].offset - run[0][1].offset, run[1][2].offset - run[0][2].offset)
    return step[0] > 0 and step[1] > 0 and step[0] % a.itemsize == 0 \
        and step[1] % b.itemsize == 0


def _run_view(blob: "Blob", run: list, which: int, transposed: bool = False) -> torch.Tensor:
    """[layers of run, *shape]: the run's a (which=1) or b (2) tensors as one strided view of
    blob (one torch call), with the last two dims swapped if transposed. It addresses only
    their bytes, which _check_header placed inside the file."""
    first = run[0][which]
    if first.offset % first.itemsize:       # unaligned: aligned copies, stacked
        view = torch.stack([t[which].view(blob.data) for t in run])
        return view.mT if transposed else view
    step = (run[1][which].offset - first.offset) // first.itemsize if len(run) > 1 \
        else first.numel
    shape, inner = list(first.shape), [1]
    for d in reversed(first.shape[1:]):
        inner.insert(0, inner[0] * d)
    if transposed:      # the last two dims swapped in the same call (.mT would be another)
        shape[-2:], inner[-2:] = shape[:-3:-1], inner[:-3:-1]
    return blob.typed(first.dtype).as_strided((len(run), *shape), (step, *inner),
                                              first.offset // first.itemsize)


def _scaled_t(b: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out = b.mT * scale (b: [..., out, r]); see _scaled. One op reading b transposed:
    faster than copy_ (a blocked transpose for 2-D) then mul_."""
    _scaled(b.mT, scale, out)


def _scaled(bt: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out = bt * scale, computed in float32 (or wider) and rounded once to out's dtype."""
    if bt.dtype not in (out.dtype, torch.float32):
        bt = bt.float()     # a bf16 * s product would be rounded to bf16 before the cast
    torch.mul(bt, scale, out=out)


def _spans(flags: list[bool]) -> Iterator[tuple[int, int]]:
    """[lo, hi) of each run of True in flags."""
    lo = None
    for i, f in enumerate(flags + [False]):
        if f and lo is None:
            lo = i
        elif not f and lo is not None:
            yield lo, i
            lo = None


def check_finite(A: torch.Tensor, B: torch.Tensor, where: str, proj: str) -> None:
    """check_all_finite for one projection."""
    check_all_finite({proj: (A, B)}, where)


def check_all_finite(weights: dict[str, tuple[torch.Tensor, torch.Tensor]], where: str) -> None:
    """Refuses NaN / inf in any projection's A or B, naming the first bad layer. A NaN or inf
    term makes a sum NaN or inf; finite terms do so only by overflow. So finite sums pass at
    once (10x faster than the per-layer check; one sum per tensor and a single test of them
    all), and any other sum falls back to the exact check of each projection."""
    # sums in the weights' dtype (bf16 has fp32's range; an fp16 sum that overflows only
    # sends that adapter to the exact check): on the CPU a float32 sum of bf16 is 10x slower
    sums = [w.sum() for pair in weights.values() for w in pair]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return
    for proj, (A, B) in weights.items():
        _check_layers(A, B, where, proj)


def _check_layers(A: torch.Tensor, B: torch.Tensor, where: str, proj: str) -> None:
    finite = finite_layers(A) & finite_layers(B)
    if not finite.all():
        layer = int((~finite).nonzero()[0])
        raise AdapterError(f"{where}: layer {layer} {proj}: weights contain NaN or inf")
