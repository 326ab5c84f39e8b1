"""The OpenAI-compatible generation routes, driven by the official openai client: chat and
completions, streaming and not, n / seed / stop / usage, and four clients with four adapters
at once whose answers equal the engine's own greedy generation."""
import asyncio

import pytest

openai = pytest.importorskip("openai")

from punica_core import LLM, SamplingParams  # noqa: E402

CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def base(live_server):
    return live_server.state.base_model_name


def test_models_list_shows_base_and_adapters(client, base):
    models = {m.id: m for m in client.models.list().data}
    assert base in models
    assert {"r4_qv", "r8_all", "r16_mlp_rs", "r64_attn"} <= set(models)
    r64 = models["r64_attn"].model_dump()
    assert r64["rank"] == 64 and r64["parent"] == base
    assert sorted(r64["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert r64["size_bytes"] > 0
    assert r64["location"] in ("host", "disk") or r64["location"].startswith("cpu:slot")
    assert client.models.retrieve("r4_qv").model_dump()["rank"] == 4


def test_chat_streaming_equals_non_streaming(client):
    full = client.chat.completions.create(model="r8_all", messages=CHAT, max_tokens=12,
                                          temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 5
    assert 0 < full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model="r8_all", messages=CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert not chunks[-1].choices and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_stream_ends_with_done(live_server):
    import httpx
    with httpx.stream("POST", live_server.url + "/v1/completions", timeout=60,
                      json={"model": "r4_qv", "prompt": "Hello", "max_tokens": 3,
                            "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_completions_n_seed_stop_and_batch_prompts(client, base):
    out = client.completions.create(model=base, prompt="The capital of France is",
                                    max_tokens=8, temperature=0)
    greedy = out.choices[0].text
    assert out.object == "text_completion" and greedy

    streamed = client.completions.create(model=base, prompt="The capital of France is",
                                         max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == greedy

    # n with a seed: choices use seed, seed+1, ... so a second call repeats them exactly
    kw = dict(model="r4_qv", prompt="Once upon a time", max_tokens=6, temperature=1.0,
              top_p=0.9, seed=7, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1          # different seeds, different samples
    assert 3 <= a.usage.completion_tokens <= 18 and a.usage.prompt_tokens > 0

    # stop: cut the greedy answer before a word it contains
    word = greedy.split()[-1] if len(greedy.split()) > 1 else None
    if word:
        cut = client.completions.create(model=base, prompt="The capital of France is",
                                        max_tokens=8, temperature=0, stop=[word])
        assert cut.choices[0].finish_reason == "stop"
        assert word not in cut.choices[0].text and greedy.startswith(cut.choices[0].text)

    batch = client.completions.create(model=base, prompt=["Hi", "The capital of France is"],
                                      max_tokens=8, temperature=0)
    assert len(batch.choices) == 2 and batch.choices[1].text == greedy


def test_four_clients_four_adapters_equal_greedy_generate(live_server, make_engine,
                                                          parity_adapters):
    names = ["r4_qv", "r8_all", "r16_mlp_rs", "r64_attn"]
    convs = [[{"role": "user", "content": f"Tell me about the number {i + 2}."}]
             for i in range(4)]
    aclient = openai.AsyncOpenAI(base_url=live_server.url + "/v1", api_key="unused",
                                 max_retries=0)

    async def one(name, conv, stream):
        if not stream:
            r = await aclient.chat.completions.create(model=name, messages=conv,
                                                      max_tokens=16, temperature=0)
            return r.choices[0].message.content
        text = ""
        async for c in await aclient.chat.completions.create(
                model=name, messages=conv, max_tokens=16, temperature=0, stream=True):
            text += c.choices[0].delta.content or "" if c.choices else ""
        return text

    async def all_four():
        try:
            return await asyncio.gather(*[one(n, c, stream=i % 2 == 0)
                                          for i, (n, c) in enumerate(zip(names, convs))])
        finally:
            await aclient.close()

    got = asyncio.run(all_four())

    engine = make_engine()
    for name in names:
        engine.register_adapter(name, parity_adapters[name])
    llm = LLM(engine=engine)
    try:
        want = llm.chat(convs, SamplingParams(max_tokens=16, temperature=0), adapters=names)
    finally:
        llm.loop.stop()
    assert got == [o.text for o in want]
    assert len(set(got)) > 1        # the adapters really differ


def test_chat_n_streamed_equals_non_streamed(client):
    kw = dict(model="r16_mlp_rs", messages=CHAT, max_tokens=6, temperature=0.8, seed=3, n=2)
    full = client.chat.completions.create(**kw)
    texts = {0: "", 1: ""}
    finish = {}
    for c in client.chat.completions.create(**kw, stream=True):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    assert finish == {c.index: c.finish_reason for c in full.choices}
