"""Continuous batching behaviour on the default model (CPU, fp32)."""
import asyncio

import pytest

from helpers import run_to_completion
from punica_core import (AsyncEngine, InvalidRequestError, PromptTooLongError, QueueFullError,
                         SamplingParams, UnknownAdapterError)

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def alone(engine, prompt, adapter=None, params=GREEDY):
    req = engine.add_request(prompt, params, adapter)
    run_to_completion(engine)
    return req.output_ids


@pytest.fixture
def engine_with_adapters(make_engine, parity_adapters):
    engine = make_engine()
    for name, path in parity_adapters.items():
        engine.register_adapter(name, path)
    return engine


def test_request_joining_mid_generation_gets_same_tokens(engine_with_adapters):
    e = engine_with_adapters
    expected = alone(e, "Tell me about the moon.", "r8_all")
    first = e.add_request("Write a long story about a dragon.", SamplingParams(
        max_tokens=40, temperature=0, ignore_eos=True), "r64_attn")
    for _ in range(6):
        e.step()
    assert len(first.output_ids) >= 4          # the first request is decoding already
    late = e.add_request("Tell me about the moon.", GREEDY, "r8_all")
    run_to_completion(e)
    assert late.output_ids == expected
    shared = [s for s in e.metrics.recent() if set(s.rows_per_adapter) == {"r64_attn", "r8_all"}]
    assert shared, "the late request never shared a step with the running one"


def test_chunked_prefill_equals_one_shot(make_engine):
    prompt = "Summarise the history of the Roman empire in detail. " * 6
    whole = alone(make_engine(max_tokens_per_step=512), prompt)
    chunked_engine = make_engine(max_tokens_per_step=16)
    assert alone(chunked_engine, prompt) == whole
    assert max(s.num_rows for s in chunked_engine.metrics.recent()) <= 16


def test_preemption_recomputes_without_changing_tokens(make_engine):
    prompts = [f"Count slowly from {i} to fifty:" for i in range(4)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    roomy = make_engine()
    expected = []
    for p in prompts:
        expected.append(alone(roomy, p, params=params))
    tight = make_engine(num_kv_blocks=14, block_size=8)   # too few blocks for all four
    reqs = [tight.add_request(p, params) for p in prompts]
    run_to_completion(tight)
    assert tight.scheduler.preemptions > 0
    assert [r.output_ids for r in reqs] == expected
    assert tight.kv.allocator.num_used == 0


def test_abort_frees_blocks_next_step(make_engine):
    e = make_engine()
    req = e.add_request("Hello there", SamplingParams(max_tokens=200, temperature=0))
    for _ in range(3):
        e.step()
    assert e.kv.allocator.num_used > 0
    e.abort(req.id)
    outs = e.step()
    assert e.kv.allocator.num_used == 0
    assert any(o.finish_reason == "abort" for o in outs)
    assert not e.has_work()


def test_queue_full_is_refused_at_once(make_engine):
    e = make_engine(max_waiting=2)
    e.add_request("a", GREEDY)
    e.add_request("b", GREEDY)
    with pytest.raises(QueueFullError, match="busy"):
        e.add_request("c", GREEDY)


def test_bad_requests_name_the_cause(make_engine):
    e = make_engine(max_model_len=64)
    with pytest.raises(PromptTooLongError, match="context is 64 tokens"):
        e.add_request("word " * 100, GREEDY)
    with pytest.raises(UnknownAdapterError, match="nope"):
        e.add_request("hi", GREEDY, "nope")
    with pytest.raises(InvalidRequestError, match="empty"):
        e.add_request([], GREEDY)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_max_tokens_stop_strings_and_eos(make_engine):
    e = make_engine()
    r1 = e.add_request("Count: 1, 2, 3,", SamplingParams(max_tokens=5, temperature=0,
                                                          ignore_eos=True))
    r2 = e.add_request("Count: 1, 2, 3,", SamplingParams(max_tokens=30, temperature=0,
                                                          stop=[" 6"], ignore_eos=True))
    chat = e.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    r3 = e.add_request(None, SamplingParams(max_tokens=60, temperature=0), prompt_ids=chat)
    run_to_completion(e)
    assert len(r1.output_ids) == 5 and r1.finish_reason == "length"
    final2 = r2.stream.result()
    assert r2.finish_reason == "stop" and " 6" not in final2.text and "5" in final2.text
    assert r3.finish_reason == "stop" and r3.output_ids[-1] in e.eos_ids
    assert "Paris" in r3.stream.result().text


def test_seeded_sampling_is_reproducible_and_topk1_is_greedy(make_engine):
    e = make_engine()
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a = e.add_request("Once upon a time", seeded)
    b = e.add_request("Once upon a time", seeded)
    c = e.add_request("Once upon a time", SamplingParams(max_tokens=12, temperature=0.8,
                                                         top_k=1, ignore_eos=True))
    run_to_completion(e)
    assert a.output_ids == b.output_ids
    assert c.output_ids == alone(e, "Once upon a time", params=SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True))


def test_stream_deltas_add_up_to_the_text(make_engine):
    e = make_engine()
    chat = e.encode_chat([{"role": "user", "content": "Write a sentence about cats."}])
    req = e.add_request(None, SamplingParams(max_tokens=20, temperature=0), prompt_ids=chat)
    run_to_completion(e)
    outs = []
    while not req.stream._q.empty():
        outs.append(req.stream._q.get())
    assert len(outs) >= 2 and outs[-1].finished
    assert "".join(o.delta for o in outs) == outs[-1].text
    assert [t for o in outs for t in o.new_token_ids] == req.output_ids


def test_async_engine_streams_and_cancels(make_engine):
    e = make_engine()
    engine = AsyncEngine(e)

    async def main():
        got = []
        async for out in engine.generate("Tell me a long story.", SamplingParams(
                max_tokens=200, temperature=0, ignore_eos=True)):
            got.append(out)
            if len(got) == 3:
                break           # the client goes away
        full = [o async for o in engine.generate("Hi!", SamplingParams(max_tokens=4,
                                                                       temperature=0))]
        return got, full

    try:
        got, full = asyncio.run(main())
        assert len(got) == 3 and full[-1].finished
        for _ in range(100):
            if e.kv.allocator.num_used == 0 and not e.has_work():
                break
            asyncio.run(asyncio.sleep(0.02))
        assert e.kv.allocator.num_used == 0
        assert e.metrics.finished_by_reason["abort"] == 1
    finally:
        engine.loop.stop()


def test_resumed_request_continues_the_same_greedy_tokens(make_engine):
    """What cluster migration relies on: prompt + generated tokens re-prefilled elsewhere."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    e = make_engine()
    full = e.add_request("The three laws of robotics are", params)
    run_to_completion(e)
    other = make_engine()
    resumed = other.add_request("The three laws of robotics are", params,
                                resume_output_ids=full.output_ids[:10])
    run_to_completion(other)
    assert resumed.output_ids == full.output_ids
    outs = []
    while not resumed.stream._q.empty():
        outs.append(resumed.stream._q.get())
    assert [t for o in outs for t in o.new_token_ids] == full.output_ids[10:]
    assert outs[-1].text == full.stream.result().text

