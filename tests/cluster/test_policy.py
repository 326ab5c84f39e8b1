"""Routing policies over engine snapshots (pure; no Ray)."""
from punica_core.cluster.policy import (Consolidate, EngineView, LeastLoaded, RoundRobin,
                                        plan_drain)


def views(*running, max_batch=4, free=100, adapters=None):
    adapters = adapters or {}
    return [EngineView(i, r, max_batch, free, frozenset(adapters.get(i, ())))
            for i, r in enumerate(running)]


def test_consolidate_packs_busiest_with_room():
    p = Consolidate()
    assert p.choose(views(0, 0, 0), 1) == 0             # tie: lowest id
    assert p.choose(views(1, 3, 2), 1) == 1             # busiest
    assert p.choose(views(1, 4, 2), 1) == 2             # engine 1 is full (max batch)
    assert p.choose(views(4, 4, 4), 1) is None          # nobody: the request waits


def test_consolidate_needs_free_kv_and_accepting():
    vs = [EngineView(0, 3, 4, 1), EngineView(1, 1, 4, 50), EngineView(2, 2, 4, 50,
                                                                        accepting=False)]
    assert Consolidate().choose(vs, 2) == 1


def test_adapter_breaks_ties_before_engine_id():
    vs = views(2, 2, 1, adapters={1: {"pirate"}})
    assert Consolidate().choose(vs, 1, "pirate") == 1
    assert Consolidate().choose(vs, 1, "other") == 0
    assert LeastLoaded().choose(views(1, 1, adapters={1: {"a"}}), 1, "a") == 1


def test_baselines():
    assert LeastLoaded().choose(views(3, 1, 2), 1) == 1
    rr = RoundRobin()
    assert [rr.choose(views(0, 0, 0), 1) for _ in range(4)] == [0, 1, 2, 0]
    assert rr.choose(views(0, 4, 0), 1) == 2            # skips the full one


def test_plan_drain_moves_a_light_engine_onto_busier_ones():
    vs = views(3, 1, 0, max_batch=4)
    needs = {0: [2, 2, 2], 1: [2]}
    assert plan_drain(vs, needs, below=0.25) == 1       # its one request fits on engine 0
    assert plan_drain(views(4, 1, max_batch=4), {0: [1] * 4, 1: [1]}, 0.25) is None
    assert plan_drain(views(2, 2, max_batch=8), {0: [1, 1], 1: [1, 1]}, 0.25) == 1
