import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the whole session (starting one takes seconds)."""
    ray = pytest.importorskip("ray")
    from punica_core.cluster import ensure_ray
    started = ensure_ray(num_cpus=4, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
