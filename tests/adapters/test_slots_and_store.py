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
