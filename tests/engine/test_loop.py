"""EngineLoop: graphs are captured on the loop's thread before its first step, and a failed
capture leaves the loop serving."""
import threading

from punica_core import Engine, EngineConfig, SamplingParams
from punica_core.engine.loop import EngineLoop


def test_loop_captures_graphs_before_its_first_step_and_survives_a_failed_capture(monkeypatch):
    engine = Engine(EngineConfig(model="random:tiny", device="cpu", kv_cache_gb=0.01))
    events = []

    def failing_capture():
        events.append(("capture", threading.current_thread().name))
        raise RuntimeError("CUDA out of memory (simulated)")
    step = engine.step

    def recording_step():
        events.append(("step", threading.current_thread().name))
        return step()
    monkeypatch.setattr(engine.runner, "capture_graphs", failing_capture)
    monkeypatch.setattr(engine, "step", recording_step)
    loop = EngineLoop(engine)
    req = engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True,
                                                       temperature=0))
    loop.start()
    try:
        for _ in range(3000):
            if req.finish_reason is not None:
                break
            threading.Event().wait(0.01)
    finally:
        loop.stop()
    assert req.finish_reason == "length" and len(req.output_ids) == 3
    assert events[0] == ("capture", "punica-engine")
    assert events[1] == ("step", "punica-engine")
    assert events.count(("capture", "punica-engine")) == 1
