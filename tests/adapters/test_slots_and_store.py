"""Slot pool: LRU eviction, slots in use never evicted; store: host cache reload off-thread."""
import pytest

from helpers import run_to_completion
from punica_core import AdapterInUseError, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_more_adapters_than_slots_evicts_lru_and_stays_correct(make_engine, parity_adapters):
    names = list(parity_adapters)
    e = make_engine(max_adapters_on_gpu=2)
    for n in names:
        e.register_adapter(n, parity_adapters[n])
    expected = {}
    for n in names:                             # one at a time: 2 slots suffice
        r = e.add_request("The sky is", GREEDY, n)
        run_to_completion(e)
        expected[n] = r.output_ids
    assert e.pool.evictions >= 2
    reqs = [e.add_request("The sky is", GREEDY, n) for n in names]   # 4 adapters, 2 slots
    run_to_completion(e)
    assert {r.adapter: r.output_ids for r in reqs} == expected
    assert all(r == 0 for r in e.pool._refs)


def test_slot_in_use_is_never_evicted(make_engine, parity_adapters):
    e = make_engine(max_adapters_on_gpu=1)
    e.register_adapter("a", parity_adapters["r4_qv"])
    e.register_adapter("b", parity_adapters["r8_all"])
    ra = e.add_request("Hello", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), "a")
    rb = e.add_request("Hello", GREEDY, "b")
    e.step()
    e.step()
    assert e.pool.snapshot()["resident"] == ["a"] and rb.status.value == "waiting"
    with pytest.raises(AdapterInUseError):
        e.pool.evict("a")
    with pytest.raises(AdapterInUseError, match="in use"):
        e.unregister_adapter("a")
    run_to_completion(e)
    assert len(ra.output_ids) == 20 and len(rb.output_ids) == 6


def test_host_cache_eviction_reloads_in_background(make_engine, parity_adapters):
    e = make_engine(max_adapters_on_gpu=1, host_cache_adapters=1)
    e.register_adapter("a", parity_adapters["r4_qv"])
    e.register_adapter("b", parity_adapters["r8_all"])    # pushes "a" out of the host cache
    assert not e.store.is_cached("a") and e.adapter_location("a") == "disk"
    r = e.add_request("Hi", GREEDY, "a")
    run_to_completion(e)
    assert len(r.output_ids) == 6 and e.store.is_cached("a")


def test_background_reads_use_the_configured_workers(make_engine, parity_adapters):
    """EngineConfig.adapter_loader_workers sizes the loader: with one worker, two adapters
    dropped from the host cache are both read back, one after the other; 0 is refused."""
    from punica_core.config import EngineConfig
    e = make_engine(max_adapters_on_gpu=1, host_cache_adapters=1, adapter_loader_workers=1)
    assert e.store._pool._max_workers == 1
    e.register_adapter("a", parity_adapters["r4_qv"])
    e.register_adapter("b", parity_adapters["r8_all"])
    e.register_adapter("c", parity_adapters["r16_mlp_rs"])   # "a" and "b": on disk only
    assert not e.store.is_cached("a") and not e.store.is_cached("b")
    reqs = [e.add_request("Hi", GREEDY, n) for n in ("a", "b")]
    run_to_completion(e)
    assert all(len(r.output_ids) == 6 for r in reqs)
    with pytest.raises(ValueError, match="adapter_loader_workers must be >= 1"):
        EngineConfig(adapter_loader_workers=0)


def test_unloaded_meanwhile_fails_only_that_request(make_engine, parity_adapters, tmp_path):
    import shutil
    src = tmp_path / "a"
    shutil.copytree(parity_adapters["r4_qv"], src)
    e = make_engine(max_adapters_on_gpu=1, host_cache_adapters=1)
    e.register_adapter("a", src)
    e.register_adapter("b", parity_adapters["r8_all"])    # "a" now only on disk
    (src / "adapter_model.safetensors").write_bytes(b"garbage")
    bad = e.add_request("Hi", GREEDY, "a")
    good = e.add_request("Hi", GREEDY, None)
    run_to_completion(e)
    assert bad.finish_reason == "error" and "safetensors" in bad.error
    assert good.finish_reason == "length"


def test_block_allocator_exact_accounting():
    from punica_core.model.kv_cache import BlockAllocator, OutOfBlocks
    a = BlockAllocator(10)
    x = a.allocate(4)
    y = a.allocate(6)
    assert a.num_free == 0 and a.num_used == 10 and not set(x) & set(y)
    with pytest.raises(OutOfBlocks):
        a.allocate(1)
    a.free(x)
    with pytest.raises(ValueError, match="freed twice"):
        a.free(x)
    assert a.num_free == 4 and a.num_used == 6


def test_loading_a_resident_adapter_again_keeps_its_one_slot(make_engine, parity_adapters):
    e = make_engine(max_adapters_on_gpu=2)
    e.register_adapter("a", parity_adapters["r4_qv"])
    adapter = e.store.get_cached("a")
    slot = e.pool.load(adapter)
    assert e.pool.load(adapter) == slot and e.pool.loads == 1
    assert e.pool.snapshot()["resident"] == ["a"]
    e.pool.evict("a")
    assert e.pool.lookup("a") is None and e.pool.snapshot()["resident"] == []


@pytest.mark.cuda
def test_slot_load_and_eviction_never_wait_on_the_gpu(tmp_path):
    """Issuing a load (and the eviction it makes room by) queues work without one host sync:
    `ranks[slot] = r` on a CUDA tensor copied a pageable scalar, which first waited for every
    copy queued before it (the whole load, ~1.8 ms for a 7B adapter, on the engine's thread)."""
    import torch
    from punica_core.adapters.peft import parse_adapter
    from punica_core.adapters.random_adapter import ALL_PROJECTIONS, write_random_adapter
    from punica_core.adapters.slots import SlotPool
    from punica_core.model.config import NAMED_SHAPES
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    cfg = NAMED_SHAPES["tiny"]
    pool = SlotPool(cfg, 1, 16, torch.bfloat16, "cuda")
    adapters = [parse_adapter(n, write_random_adapter(cfg, tmp_path / n, r, ALL_PROJECTIONS,
                                                      seed=i), cfg, 16, dtype=torch.bfloat16,
                              pin_memory=True) for i, (n, r) in enumerate([("a", 8), ("b", 16)])]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        slot_a = pool.load(adapters[0])
        slot_b = pool.load(adapters[1])         # evicts a (one slot)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert slot_a == slot_b == 0 and pool.evictions == 1
    torch.cuda.synchronize()
    assert pool.is_ready(slot_b)
    w = pool.weights["q_proj"]
    assert w.ranks.tolist() == [16] and w.ranks_list == [16]
    assert torch.equal(w.a[0, :, :16].cpu(), adapters[1].weights["q_proj"][0])
