"""EngineLoop: graphs are captured on the loop's thread before its first step, and a failed
capture leaves the loop serving; adapters unregistered from other threads leave the slot pool
to the stepping thread, and a name registered again never serves the old weights."""
import threading

from helpers import run_to_completion
from punica_core import Engine, EngineConfig, SamplingParams
from punica_core.engine.loop import EngineLoop


def wait_finished(*reqs, timeout_s: float = 30.0) -> None:
    """Until every request has finished (the loop's thread serves them)."""
    done = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if all(r.finish_reason is not None for r in reqs):
            return
        done.wait(0.01)


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
        wait_finished(req)
    finally:
        loop.stop()
    assert req.finish_reason == "length" and len(req.output_ids) == 3
    assert events[0] == ("capture", "punica-engine")
    assert events[1] == ("step", "punica-engine")
    assert events.count(("capture", "punica-engine")) == 1


def test_adapters_unregistered_from_another_thread_while_the_loop_serves(make_engine,
                                                                         parity_adapters,
                                                                         caplog):
    """Unregistering (and registering again) an adapter from another thread while the loop
    steps other requests and loads slots: the slot pool changes only between steps, no step
    raises, every stream finishes, and the adapter's last registration serves."""
    e = make_engine(max_adapters_on_gpu=2, max_batch=4)
    names = ("r4_qv", "r8_all", "r64_attn")
    for name in names:
        e.register_adapter(name, parity_adapters[name])
    loop = EngineLoop(e).start()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    reqs = []
    try:
        for i in range(12):
            # requests for the two other adapters keep the two slots loading and evicting
            reqs += [e.add_request(f"Say {i}.", params, names[1 + i % 2])]
            r = e.add_request("Hi.", params, "r4_qv")
            wait_finished(r)
            reqs.append(r)
            e.unregister_adapter("r4_qv")           # on this thread, beside the loop
            e.register_adapter("r4_qv", parity_adapters["r4_qv"])
        wait_finished(*reqs)
    finally:
        loop.stop()
    assert [q.finish_reason for q in reqs] == ["length"] * len(reqs), \
        [q.error for q in reqs if q.error]
    assert "engine step raised" not in caplog.text
    assert e.pool.snapshot()["in_use"] == {}


def test_unregister_leaves_the_slot_pool_to_the_stepping_thread(make_engine, parity_adapters,
                                                                monkeypatch):
    """unregister_adapter from another thread while a step runs: the name is gone at once,
    the slot pool is not touched until the loop's next step, which frees the slot."""
    e = make_engine()
    e.register_adapter("done", parity_adapters["r8_all"])
    first = e.add_request("Hi.", SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
                          "done")
    run_to_completion(e)
    assert first.finish_reason == "length" and e.pool.lookup("done") is not None
    in_step, release = threading.Event(), threading.Event()
    run = e.runner.run

    def slow_run(batch, **kw):
        in_step.set()
        release.wait(10)
        return run(batch, **kw)
    monkeypatch.setattr(e.runner, "run", slow_run)
    loop = EngineLoop(e).start()
    try:
        req = e.add_request("Hi.", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                            None)
        assert in_step.wait(10)
        e.unregister_adapter("done")        # returns while the step runs
        assert "done" not in e.store
        assert e.pool.lookup("done") is not None    # the running step's pool, untouched
        release.set()
        wait_finished(req)
        for _ in range(1000):
            if e.pool.lookup("done") is None:
                break
            threading.Event().wait(0.01)
    finally:
        release.set()
        loop.stop()
    assert req.finish_reason == "length" and e.pool.lookup("done") is None


def test_a_name_registered_again_serves_the_new_weights(make_engine, parity_adapters):
    """Unregister "a", register other weights as "a", ask for "a" before any step ran: the
    next step frees the old slot before it admits the request, so the new weights serve."""
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want_engine = make_engine()
    want_engine.register_adapter("a", parity_adapters["r8_all"])
    want = want_engine.add_request("The sky is", greedy, "a")
    run_to_completion(want_engine)
    e = make_engine()
    e.register_adapter("a", parity_adapters["r4_qv"])
    old = e.add_request("The sky is", greedy, "a")
    run_to_completion(e)
    assert old.output_ids != want.output_ids        # the two adapters differ here
    e.unregister_adapter("a")
    e.register_adapter("a", parity_adapters["r8_all"])
    got = e.add_request("The sky is", greedy, "a")
    run_to_completion(e)
    assert got.output_ids == want.output_ids
