"""The host cache's pinned memory: malloc + cudaHostRegister through torch's caching host
allocator (pinned_memory.py), unless the user's PYTORCH_CUDA_ALLOC_CONF says otherwise."""
import pytest
import torch

from punica_core.adapters import pinned_memory


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(pinned_memory, "_state", {})


def test_users_setting_wins_and_nothing_is_switched(fresh_state, monkeypatch):
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append,
                        raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "pinned_use_cuda_host_register:False")
    assert pinned_memory.use_registered_host_memory() is False
    monkeypatch.setattr(pinned_memory, "_state", {})
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF",
                       "expandable_segments:True,pinned_use_cuda_host_register:True")
    assert pinned_memory.use_registered_host_memory() is True
    assert calls == []      # the user's own setting: torch already follows it


def test_switched_once_when_the_user_says_nothing(fresh_state, monkeypatch):
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append,
                        raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert pinned_memory.use_registered_host_memory() is True
    assert pinned_memory.use_registered_host_memory() is True
    assert calls == ["pinned_use_cuda_host_register:True,pinned_num_register_threads:8"]


def test_no_cuda_no_switch(fresh_state, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert pinned_memory.use_registered_host_memory() is False


@pytest.mark.cuda
def test_registered_pinned_memory_copies_both_ways():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert pinned_memory.use_registered_host_memory()
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if get is not None:
        assert "pinned_use_cuda_host_register:True" in get()
    host = torch.empty(3 << 20, dtype=torch.uint8, pin_memory=True)   # a fresh block
    assert host.is_pinned()
    src = torch.randint(0, 256, host.shape, dtype=torch.uint8)
    host.copy_(src)
    dev = host.to("cuda", non_blocking=True)
    back = torch.empty_like(host).pin_memory()
    back.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, src)


def test_block_plan_one_block_per_read_by_power_of_two_class_within_the_cap():
    mb = 1 << 20
    sizes = [80 * mb] * 5 + [125 * mb] * 2 + [3 * mb, 0]     # 0: nothing to pin
    assert pinned_memory.block_plan(sizes, max_blocks=100) == \
        {128 * mb: 7, 4 * mb: 1}            # 80 and 125 MB share the 128 MB class
    # at most max_blocks in all, the class most files need first
    assert pinned_memory.block_plan(sizes, max_blocks=4) == {128 * mb: 4}
    assert pinned_memory.block_plan([mb, 2 * mb, 2 * mb], 2) == {2 * mb: 2}
    assert pinned_memory.block_plan([mb + 1], 1) == {2 * mb: 1}
    assert pinned_memory.block_plan([], 8) == {}


def test_reserve_pins_the_registered_folders_blocks_only_with_pinned_raw_reads(
        monkeypatch, parity_adapters, default_loaded):
    from punica_core.adapters.store import AdapterStore
    cfg = default_loaded.model.cfg
    pinned = []
    monkeypatch.setattr("punica_core.adapters.store.reserve_blocks",
                        lambda plan: pinned.append(plan) or sum(c * n for c, n in plan.items()))
    names = list(parity_adapters)
    off = AdapterStore(cfg, 64)                                  # CPU: nothing pinned
    assert off.reserve_pinned_blocks() == 0 and pinned == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    store = AdapterStore(cfg, 64, host_cache_size=2, loader_workers=1, device_stacking=True)
    for n in names:
        store.register(n, parity_adapters[n], lazy=True)
    store.register("upload", {"adapter_config.json":
                              (parity_adapters[names[0]] / "adapter_config.json").read_bytes(),
                              "adapter_model.safetensors":
                              (parity_adapters[names[0]] / "adapter_model.safetensors")
                              .read_bytes()})   # kept in memory, never re-read: no block
    assert store.reserve_pinned_blocks() == 0 and pinned == []     # reads not pinned
    store.pin_memory = True         # as on a CUDA host (set after the parses, which pin)
    got = store.reserve_pinned_blocks()
    sizes = [(parity_adapters[n] / "adapter_model.safetensors").stat().st_size for n in names]
    assert pinned == [pinned_memory.block_plan(sizes, 2 + 1)]
    assert got == sum(c * n for c, n in pinned[0].items()) and sum(pinned[0].values()) == 3
    store.close()
    off.close()
