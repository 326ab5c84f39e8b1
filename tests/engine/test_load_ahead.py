"""Adapters of waiting requests are loaded while the batch is full (CPU, default model)."""
from helpers import run_to_completion
from punica_core import SamplingParams

LONG = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_waiting_requests_adapters_load_while_the_batch_is_full(make_engine, parity_adapters):
    e = make_engine(max_batch=1, max_adapters_on_gpu=2)
    for name in ("r4_qv", "r8_all", "r64_attn"):
        e.register_adapter(name, parity_adapters[name])
    first = e.add_request("Count to ten.", LONG, "r4_qv")
    e.step()
    e.step()
    assert first.output_ids and e.pool.lookup("r4_qv") is not None
    # the batch is full (max_batch 1): the waiting request's adapter is loaded anyway, into
    # the free slot, without evicting the one in use
    waiting = e.add_request("Name a colour.", LONG, "r8_all")
    e.step()
    assert waiting.output_ids == [] and e.pool.lookup("r8_all") is not None
    assert e.pool.lookup("r4_qv") is not None
    # a third adapter cannot get a slot: one is in use, the other is wanted by a waiting
    # request, so neither is evicted for it
    third = e.add_request("Say hi.", LONG, "r64_attn")
    e.step()
    assert e.pool.lookup("r64_attn") is None and e.pool.lookup("r8_all") is not None
    run_to_completion(e)
    assert [len(r.output_ids) for r in (first, waiting, third)] == [24, 24, 24]
    assert e.pool.evictions >= 1       # r64_attn got a slot once r4_qv's request had finished


def test_slot_loads_never_evict_what_requests_ahead_wait_for(make_engine, parity_adapters):
    """More waiting adapters than slots, with loads that take a step to land (as on a GPU): a
    later request's load must not evict the slot just loaded for a request ahead of it, else
    every step reloads the same adapters and nobody is admitted."""
    e = make_engine(max_batch=8, max_adapters_on_gpu=2)
    names = ("r4_qv", "r8_all", "r64_attn")
    for name in names:
        e.register_adapter(name, parity_adapters[name])
        e.store.get_cached(name)            # in the host cache, like a warm working set
    pool = e.pool
    landed_at: dict[int, int] = {}
    step = [0]
    load, is_ready = pool.load, pool.is_ready

    def slow_load(adapter, keep=frozenset()):
        slot = load(adapter, keep)
        if slot is not None:
            landed_at[slot] = step[0] + 1   # ready from the next step on
        return slot
    pool.load = slow_load
    pool.is_ready = lambda slot: step[0] >= landed_at.get(slot, 0) and is_ready(slot)
    short = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    reqs = [e.add_request("Hi.", short, names[i % 3]) for i in range(6)]
    for _ in range(200):
        if not e.has_work():
            break
        e.step()
        step[0] += 1
    assert all(len(r.output_ids) == 2 for r in reqs)
    # each adapter is loaded about once per run of its requests, not once per step
    assert pool.loads <= 6, pool.loads


def test_adapters_deeper_in_the_queue_are_read_into_the_host_cache_ahead(make_engine,
                                                                         parity_adapters):
    """Registered lazily (read on first use), the adapters of requests beyond the next batch
    are read from disk into the host cache while the full batch runs, in queue order, up to
    the host cache's room beyond a batch: with max_batch 1 and a cache of 4, the next
    request's adapter is read for its slot and the three after it ahead, the last one's not."""
    import time
    e = make_engine(max_batch=1, max_adapters_on_gpu=2, host_cache_adapters=4)
    folders = list(parity_adapters.values())
    names = [f"lazy{i}" for i in range(6)]
    for i, name in enumerate(names):
        e.register_adapter(name, folders[i % len(folders)], lazy=True)
    first = e.add_request("Hi.", LONG, names[0])

    def settle():
        deadline = time.monotonic() + 30
        while e.store._loading and time.monotonic() < deadline:
            time.sleep(0.01)
    while not first.output_ids:             # the batch (of one) is full from here on
        e.step()
        settle()
    reqs = [e.add_request("Hi.", LONG, n) for n in names[1:]]
    e.step()
    settle()
    cached = [e.store.is_cached(n) for n in names[1:]]
    assert cached == [True, True, True, True, False], cached
    run_to_completion(e)
    assert all(len(r.output_ids) == 24 for r in [first, *reqs])


def test_time_with_nothing_runnable_is_counted(make_engine, parity_adapters, monkeypatch):
    """A request whose adapter is read in the background (lazy) waits with nothing else to
    run: the engine counts that time (idle_waiting_s, on /metrics) apart from scheduling."""
    import time
    e = make_engine()
    e.register_adapter("lazy", parity_adapters["r8_all"], lazy=True)
    parse = e.store._parse

    def slow_parse(*a, **kw):
        time.sleep(0.3)
        return parse(*a, **kw)
    monkeypatch.setattr(e.store, "_parse", slow_parse)
    req = e.add_request("Hi.", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                        "lazy")
    run_to_completion(e)
    assert len(req.output_ids) == 2
    counters = e.metrics.counters
    assert 0.25 <= counters["idle_waiting_s"] < 5
    assert 0 < counters["schedule_s"] < counters["idle_waiting_s"]


def test_once_no_slot_can_be_had_load_ahead_tries_no_more_loads(make_engine, parity_adapters):
    """Both slots are held by running requests and more adapters wait, all in the host cache:
    each step tries one slot load (which finds no room), not one per waiting adapter; the
    waiting requests still run, in order, once slots free up."""
    e = make_engine(max_batch=2, max_adapters_on_gpu=2)
    names = list(parity_adapters)
    for name in names:
        e.register_adapter(name, parity_adapters[name])
    assert len(names) >= 4
    running = [e.add_request("Count to ten.", LONG, n) for n in names[:2]]
    e.step()
    waiting = [e.add_request("Hi.", SamplingParams(max_tokens=2, temperature=0,
                                                   ignore_eos=True), n) for n in names[2:]]
    attempts = []
    load = e.pool.load
    e.pool.load = lambda adapter, keep=frozenset(): attempts.append(adapter.name) or \
        load(adapter, keep)
    e.step()
    assert all(r.output_ids for r in running) and not any(r.output_ids for r in waiting)
    assert attempts == [names[2]], attempts      # the first waiting one only
    run_to_completion(e)
    assert all(len(r.output_ids) == 2 for r in waiting)


def test_slot_loads_are_issued_while_the_step_computes_not_while_scheduling(make_engine,
                                                                         parity_adapters):
    """A running batch and a waiting request whose adapter is in the host cache: its slot
    load is issued after the step's forward is launched (in the GPU's shadow), never inside
    schedule(), which would hold the step back; the request is admitted the step after."""
    e = make_engine(max_batch=1, max_adapters_on_gpu=2)
    for name in ("r4_qv", "r8_all"):
        e.register_adapter(name, parity_adapters[name])
    first = e.add_request("Count to ten.", LONG, "r4_qv")
    e.step()
    assert first.output_ids
    waiting = e.add_request("Name a colour.", LONG, "r8_all")
    events = []
    schedule, load, forward = e.scheduler.schedule, e.pool.load, e.runner.forward
    graphs = e.runner.graphs

    def traced_schedule():
        events.append("schedule")
        out = schedule()
        events.append("scheduled")
        return out
    e.scheduler.schedule = traced_schedule
    e.pool.load = lambda adapter, keep=frozenset(): events.append(f"load {adapter.name}") or \
        load(adapter, keep)
    e.runner.forward = lambda layout: events.append("forward") or forward(layout)
    assert graphs is None                   # CPU: every step goes through forward
    e.step()
    assert events == ["schedule", "scheduled", "forward", "load r8_all"], events
    assert waiting.output_ids == []
    run_to_completion(e)
    assert len(waiting.output_ids) == 24


def test_load_ahead_issues_a_bounded_number_of_slot_loads_per_call_where_loads_are_async(
        make_engine, parity_adapters, monkeypatch):
    """Six waiting adapters in the host cache and room for all. Where loads copy on a side
    stream (as on a GPU; here the pool is told so), one load_ahead call issues
    SLOT_LOADS_PER_CALL slot loads, in queue order, and the first step admits those while the
    rest load in its shadow. On a CPU (loads done at once) one call loads all six."""
    from punica_core.adapters.slots import SlotPool
    from punica_core.engine.scheduler import SLOT_LOADS_PER_CALL
    folders = list(parity_adapters.values())
    names = [f"a{i}" for i in range(6)]
    short = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    def engine_with_waiting():
        e = make_engine(max_batch=8, max_adapters_on_gpu=8)
        for i, name in enumerate(names):
            e.register_adapter(name, folders[i % len(folders)])
        reqs = [e.add_request("Hi.", short, n) for n in names]
        e._take_inbox()
        return e, reqs
    cpu, _ = engine_with_waiting()
    assert not cpu.pool.loads_asynchronously
    assert cpu.scheduler.load_ahead() == len(names)
    monkeypatch.setattr(SlotPool, "loads_asynchronously", property(lambda self: True))
    e, reqs = engine_with_waiting()
    assert SLOT_LOADS_PER_CALL < len(names)
    assert e.scheduler.load_ahead() == SLOT_LOADS_PER_CALL
    resident = [n for n in names if e.pool.lookup(n) is not None]
    assert resident == names[:SLOT_LOADS_PER_CALL]
    e.step()                                # admits those four, loads the other two
    assert [bool(r.output_ids) for r in reqs] == [True] * 4 + [False] * 2
    assert all(e.pool.lookup(n) is not None for n in names)
    run_to_completion(e)
    assert all(len(r.output_ids) == 2 for r in reqs)


def test_in_a_steps_shadow_loads_stop_once_the_step_is_done_when_asked(make_engine,
                                                                      parity_adapters,
                                                                      monkeypatch):
    """With STOP_LOADS_WHEN_STEP_DONE, a load_ahead call given a step_done that says the step
    has finished issues one slot load, not more (the rest wait for the next step's shadow);
    while the step still computes it goes on; without the flag step_done is ignored."""
    from punica_core.engine import scheduler as sched
    e = make_engine(max_batch=8, max_adapters_on_gpu=8)
    folders = list(parity_adapters.values())
    names = [f"a{i}" for i in range(6)]
    for i, name in enumerate(names):
        e.register_adapter(name, folders[i % len(folders)])
    short = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    reqs = [e.add_request("Hi.", short, n) for n in names]
    e._take_inbox()
    asked = []

    def done():
        asked.append(1)
        return len(asked) > 1           # still computing at the first question, then done
    assert e.scheduler.load_ahead(step_done=done) == len(names) and not asked   # flag off
    # the same with the flag on, on a fresh engine
    monkeypatch.setattr(sched, "STOP_LOADS_WHEN_STEP_DONE", True)
    e2 = make_engine(max_batch=8, max_adapters_on_gpu=8)
    for i, name in enumerate(names):
        e2.register_adapter(name, folders[i % len(folders)])
    reqs2 = [e2.add_request("Hi.", short, n) for n in names]
    e2._take_inbox()
    assert e2.scheduler.load_ahead(step_done=done) == 2     # one, still computing: a second
    assert [e2.pool.lookup(n) is not None for n in names] == [True] * 2 + [False] * 4
    run_to_completion(e2)
    run_to_completion(e)
    assert all(len(r.output_ids) == 2 for r in reqs + reqs2)
