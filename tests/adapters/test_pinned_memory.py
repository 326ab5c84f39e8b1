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
