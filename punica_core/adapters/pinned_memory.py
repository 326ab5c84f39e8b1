"""How the host cache gets its pinned memory on CUDA hosts.

torch's pinned allocations come from cudaHostAlloc by default, which holds a driver-wide lock
while it pins: 62 ms for an 80 MB Llama-2-7B adapter on the H200 host, and the loader threads'
allocations queue behind each other (four at once: 109-144 ms each). torch's caching host
allocator can use malloc + cudaHostRegister instead, with the pages touched by several
threads: 15.6 ms for the same 80 MB, four at once 26-31 ms each (benchmarks/diag/
pinned_alloc.py -> benchmarks/results/diag/pinned_alloc_h200{,_registered}.json).
The store switches that on once per process, unless PYTORCH_CUDA_ALLOC_CONF already says how.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger("punica")

REGISTER_HOST_MEMORY = True     # False: torch's default (cudaHostAlloc); benchmarks compare
REGISTER_THREADS = 8            # threads that touch a new block's pages before registering it
SETTING = "pinned_use_cuda_host_register"
_done = threading.Lock()
_state: dict[str, bool] = {}


def use_registered_host_memory() -> bool:
    """Asks torch's caching host allocator for registered malloc memory (process-wide, once).
    True if that is in effect (set now or by the user's PYTORCH_CUDA_ALLOC_CONF)."""
    with _done:
        if "on" in _state:
            return _state["on"]
        _state["on"] = on = _switch_on()
        return on


def _switch_on() -> bool:
    user = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get(
        "PYTORCH_ALLOC_CONF", "")
    if SETTING in user:
        return f"{SETTING}:true" in user.replace(" ", "").lower()
    if not REGISTER_HOST_MEMORY or not torch.cuda.is_available():
        return False
    settings = f"{SETTING}:True,pinned_num_register_threads:{REGISTER_THREADS}"
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) \
        or getattr(torch._C, "_cuda_cudaCachingAllocator_set_allocator_settings", None)
    if setter is None:
        log.warning("this torch cannot switch its pinned memory to cudaHostRegister; the host "
                    "cache's pinned allocations use cudaHostAlloc (slower cold adapter loads)")
        return False
    try:
        setter(settings)
    except RuntimeError as e:       # an older torch without these keys
        log.warning("pinned memory stays on cudaHostAlloc: %s", e)
        return False
    return True


def block_plan(sizes: list[int], max_blocks: int) -> dict[int, int]:
    """{block bytes: count} to pin ahead for background reads of files of these sizes. torch's
    caching host allocator serves a request from a free block of its power-of-two size class
    (CachingHostAllocator rounds every size up so), so one block per file read at once, by
    class, at most max_blocks in all (the host cache's room plus the loader threads), the
    classes most files need first."""
    by_class: dict[int, int] = {}
    for size in sizes:
        if size > 0:
            cls = 1 << (size - 1).bit_length()
            by_class[cls] = by_class.get(cls, 0) + 1
    plan, left = {}, max_blocks
    for cls, n in sorted(by_class.items(), key=lambda kv: (-kv[1], kv[0])):
        if left <= 0:
            break
        plan[cls] = min(n, left)
        left -= plan[cls]
    return plan


def reserve_blocks(plan: dict[int, int]) -> int:
    """Pins plan's blocks now and frees them into torch's cache, so that reads later reuse
    them instead of pinning fresh memory while the engine runs (a fresh pin holds the driver
    lock the engine thread's launches need: benchmarks/diag/slot_load_contention.py). Bytes
    pinned."""
    kept = [torch.empty(cls, dtype=torch.uint8, pin_memory=True)
            for cls, n in plan.items() for _ in range(n)]
    total = sum(t.numel() for t in kept)
    del kept        # to torch's free lists, still pinned
    return total
