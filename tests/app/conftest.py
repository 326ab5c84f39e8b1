"""Fixtures for the app tests: a live server over the default model and the parity adapters."""
import pytest

from live_server import start_server


@pytest.fixture(scope="module")
def live_server(default_loaded, tmp_path_factory, parity_adapters):
    """Server with adapters r4_qv, r8_all, r16_mlp_rs, r64_attn; uploads allowed."""
    srv = start_server(default_loaded, tmp_path_factory, parity_adapters,
                       adapter_dirs=(str(next(iter(parity_adapters.values())).parent),))
    yield srv
    srv.stop()
