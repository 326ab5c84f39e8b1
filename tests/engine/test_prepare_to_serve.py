"""Engine.prepare_to_serve: what a serving loop does before its first step (CPU)."""
import logging

from punica_core.engine.loop import EngineLoop


def _trace(e, monkeypatch, reserve_raises=False):
    calls = []

    def reserve():
        calls.append("reserve")
        if reserve_raises:
            raise RuntimeError("no pinned memory left")
        return 0
    monkeypatch.setattr(e.store, "reserve_pinned_blocks", reserve)
    capture = e.capture_graphs
    monkeypatch.setattr(e, "capture_graphs", lambda: calls.append("capture") or capture())
    return calls


def test_pins_the_host_cache_before_capturing_graphs_unless_configured_off(make_engine,
                                                                           monkeypatch):
    on = make_engine()
    assert on.config.reserve_pinned_host_cache      # the default
    calls = _trace(on, monkeypatch)
    on.prepare_to_serve()
    assert calls == ["reserve", "capture"]
    off = make_engine(reserve_pinned_host_cache=False)
    calls = _trace(off, monkeypatch)
    off.prepare_to_serve()
    assert calls == ["capture"]


def test_a_failed_reservation_is_logged_and_serving_goes_on(make_engine, monkeypatch, caplog):
    e = make_engine()
    calls = _trace(e, monkeypatch, reserve_raises=True)
    with caplog.at_level(logging.ERROR, logger="punica"):
        e.prepare_to_serve()
    assert calls == ["reserve", "capture"]
    assert "pinning the host cache's blocks up front failed" in caplog.text
    assert "no pinned memory left" in caplog.text


def test_the_engine_loop_prepares_before_its_first_step(make_engine, monkeypatch):
    e = make_engine()
    calls = _trace(e, monkeypatch)
    step = e.step
    monkeypatch.setattr(e, "step", lambda: calls.append("step") or step())
    from punica_core import SamplingParams
    loop = EngineLoop(e).start()
    try:
        req = e.add_request("Hi.", SamplingParams(max_tokens=2, temperature=0,
                                                  ignore_eos=True))
        import time
        deadline = time.monotonic() + 60
        while req.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.stop()
    assert req.finish_reason == "length"
    assert calls[:2] == ["reserve", "capture"] and "step" in calls[2:]
