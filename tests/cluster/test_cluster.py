"""The cluster on a local Ray cluster of CPU engines: consolidation, migration mid-stream,
losing an engine, the LLM API. Each engine is a Ray actor running the CPU engine."""
import asyncio
import threading
import time

import pytest

from punica_core import LLM, AsyncEngine, EngineConfig, SamplingParams
from punica_core.cluster import ClusterConfig, ClusterEngine

TINY = dict(model="random:tiny", num_kv_blocks=64, block_size=16)


def wait_for(cond, timeout=30.0, what="condition"):
    """what: a string, or a callable giving one (evaluated at the timeout, to show the state)."""
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def collect(stream):
    """Reads a stream to the end: (final output, streamed token ids concatenated)."""
    new, last = [], None
    for out in stream:
        new += out.new_token_ids
        last = out
    return last, new


def consume_all(streams):
    results = [None] * len(streams)

    def run(i):
        results[i] = collect(streams[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    return threads, results


def test_consolidation_packs_one_engine_then_releases_idle(ray_cluster):
    cfg = ClusterConfig(engine=EngineConfig(max_batch=3, **TINY), max_engines=2,
                        idle_release_s=0.5, min_engines=1)
    c = ClusterEngine(cfg)
    try:
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        reqs, batches = [], []
        for i in range(5):
            reqs.append(c.add_request(None, params, prompt_ids=[1, 2, 3 + i]))
            batches.append([e["batch"] for e in c.engines()])
        # Punica: the busiest engine that still has room; engine 1 only once engine 0 is full
        assert batches == [[1, 0], [2, 0], [3, 0], [3, 1], [3, 2]]
        threads, results = consume_all([r.stream for r in reqs])
        for t in threads:
            t.join(60)
        for last, new in results:
            assert last.finished and last.finish_reason == "length"
            assert len(last.token_ids) == 40 and new == last.token_ids
        # idle engines are released, down to min_engines: whichever went idle long enough first
        # (engine 1 started later, so on a loaded machine engine 0 may be idle first)
        states = lambda: [e["state"] for e in c.engines()]  # noqa: E731
        wait_for(lambda: sorted(states()) == ["ready", "released"], 20,
                 lambda: f"one engine released and one kept, engines {states()}")
        assert c.status()["engines_in_use"] == 0
        # ... and a new one starts when all are full
        more = [c.add_request(None, params, prompt_ids=[7, 8, i]) for i in range(4)]
        assert [e["batch"] for e in c.engines() if e["state"] == "ready"] == [3]
        assert len(c.router.queue) == 1
        for r in more:
            last, new = collect(r.stream)
            assert len(new) == 40 and last.finish_reason == "length"
        # (the fourth may finish on engine 0 before engine 2 is up: the tiny model is fast)
        assert any(ev["event"] == "engine_starting" and ev["engine"] == 2 for ev in c.events())
        # the server's path: AsyncEngine over the cluster, async streams
        ae = AsyncEngine(c, loop=c.loop)

        async def one():
            return [o async for o in ae.generate(None, params, prompt_ids=[3, 4, 5])]
        outs = asyncio.run(one())
        assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 40
        assert c.status()["engines"] and c.metrics.recent(4) and c.memory()["weights"] > 0
    finally:
        c.close()


def test_migration_mid_stream_gives_the_same_greedy_tokens(ray_cluster):
    # engine 0 holds 8 KV blocks of 16 tokens: three 60-token sequences do not fit, so it runs
    # out mid-generation and its newest request migrates to engine 1 (256 blocks)
    base = EngineConfig(model="default", max_batch=4, num_kv_blocks=256, block_size=16)
    cfg = ClusterConfig(engine=base, max_engines=2, idle_release_s=None,
                        per_engine=((0, {"num_kv_blocks": 8}),))
    llm = LLM(cluster=cfg)
    try:
        c = llm.engine
        prompts = ["The capital of France is", "List three colors:",
                   "Write a short poem about the sea."]
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        streams = [llm.submit(p, params) for p in prompts]
        assert [e["batch"] for e in c.engines()] == [3, 0]     # all packed on engine 0
        threads, results = consume_all(streams)
        for t in threads:
            t.join(120)
        moved = [ev for ev in c.events() if ev["event"] == "migrate"]
        assert moved and all(ev["reason"] == "kv_full" and ev["engine"] == 0 for ev in moved)
        assert 0 < moved[0]["tokens"] < 40                      # it moved mid-stream
        # the reference: each prompt alone (it fits on engine 0: no migration)
        n_moves = len(moved)
        for (last, new), p in zip(results, prompts):
            ref = llm.generate(p, params)[0]
            assert new == last.token_ids, "a token was duplicated or lost"
            assert last.token_ids == ref.token_ids
            assert last.text == ref.text
        assert len([ev for ev in c.events() if ev["event"] == "migrate"]) == n_moves
    finally:
        llm.close()


def test_killing_an_engine_loses_no_request(ray_cluster):
    cfg = ClusterConfig(engine=EngineConfig(max_batch=4, **TINY), max_engines=2,
                        idle_release_s=None)
    c = ClusterEngine(cfg)
    try:
        params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
        reqs = [c.add_request(None, params, prompt_ids=[5, 6, 7, i]) for i in range(6)]
        assert [e["batch"] for e in c.engines()] == [4, 2]
        threads, results = consume_all([r.stream for r in reqs])
        victim = c.router.engines[1]
        on_victim = [r for r in reqs if r.engine == 1]
        wait_for(lambda: all(len(r.tokens) >= 2 for r in on_victim), 30, "tokens from engine 1")
        assert all(len(r.tokens) < 300 for r in on_victim)
        ray_cluster.kill(victim.handle)
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a stream hung"
        for last, new in results:
            assert last.finish_reason == "length" and last.error is None
            assert len(new) == 300 and new == last.token_ids
        lost = c.status()["lost_engines"]
        assert len(lost) == 1 and lost[0]["engine"] == 1 and len(lost[0]["requests"]) == 2
        assert c.router.counters["rerouted"] == 2
    finally:
        c.close()


def test_drain_moves_a_lightly_loaded_engines_requests_onto_a_busier_one(ray_cluster):
    cfg = ClusterConfig(engine=EngineConfig(max_batch=4, **dict(TINY, num_kv_blocks=256)),
                        max_engines=2, idle_release_s=0.3, min_engines=1, drain=True,
                        drain_below=0.5)
    c = ClusterEngine(cfg)
    try:
        long = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)
        short = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        reqs = [c.add_request(None, p, prompt_ids=[9, 9, i])
                for i, p in enumerate([long, long, long, short, long])]
        assert [e["batch"] for e in c.engines()] == [4, 1]
        threads, results = consume_all([r.stream for r in reqs])
        for t in threads:
            t.join(120)
        # once the short one left engine 0 had room: engine 1's request moved there
        assert c.router.counters["migrations_drain"] == 1
        assert reqs[4].engines_seen == [1, 0]
        for (last, new), want in zip(results, [600, 600, 600, 10, 600]):
            assert last.finish_reason == "length" and len(new) == want == len(last.token_ids)
        wait_for(lambda: c.engines()[1]["state"] == "released", 10, "engine 1's release")
    finally:
        c.close()
