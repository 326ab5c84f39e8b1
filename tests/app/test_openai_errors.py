"""Errors in OpenAI's shape (401, 400, 404, 413, 429), /metrics and /health, and a client that
disconnects mid-stream: its request is aborted and its KV blocks freed within a few steps."""
import time

import httpx
import pytest
from live_server import start_server

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from punica_core import SamplingParams  # noqa: E402

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def strict(default_loaded, tmp_path_factory, parity_adapters):
    """A server with an API key, a queue of one, one running request at a time, 1 MB uploads."""
    srv = start_server(
        default_loaded, tmp_path_factory, {"r4_qv": parity_adapters["r4_qv"]},
        api_key=KEY, max_waiting=1, max_batch=1, max_upload_mb=1)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(strict):
    return openai.OpenAI(base_url=strict.url + "/v1", api_key=KEY, max_retries=0)


def metrics(srv) -> dict:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(m, name, **labels):
    return m[(name, tuple(sorted(labels.items())))]


def assert_error_shape(err, status):
    assert err.status_code == status
    body = err.response.json()["error"]
    assert set(body) >= {"message", "type", "param", "code"} and body["message"]


def test_api_key_required_on_v1_only(strict, client):
    bad = openai.OpenAI(base_url=strict.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert_error_shape(e.value, 401)
    r = httpx.get(strict.url + "/v1/models", timeout=10)        # no key at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(strict.url + "/v1/load_lora_adapter", timeout=10,
                   json={"lora_name": "x", "lora_path": "r8_all"})
    assert r.status_code == 401
    assert strict.state.base_model_name in {m.id for m in client.models.list().data}
    assert httpx.get(strict.url + "/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(strict.url + "/metrics", timeout=10).status_code == 200


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-adapter", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert_error_shape(e.value, 404)
    assert e.value.response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)


@pytest.mark.parametrize("kw", [
    {"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"n": 0}, {"messages": []},
    {"messages": [{"role": "robot", "content": "hi"}]}, {"logprobs": True},
    {"stop": ["x"] * 17}, {"seed": "abc"},
])
def test_bad_parameters_are_400(client, strict, kw):
    args = {"model": "r4_qv", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}], **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert_error_shape(e.value, 400)


def test_malformed_json_is_400(strict):
    r = httpx.post(strict.url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_prompt_longer_than_context_is_413(client, strict):
    long = "hello " * (strict.state.engine.max_model_len + 100)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="r4_qv", prompt=long, max_tokens=2)
    assert_error_shape(e.value, 413)
    assert "context" in e.value.response.json()["error"]["message"]


def test_upload_over_the_limit_is_413(strict):
    r = httpx.post(strict.url + "/v1/upload_lora_adapter", params={"lora_name": "big"},
                   content=b"\0" * (2 << 20), headers=AUTH, timeout=30)
    assert r.status_code == 413 and "1 MB" in r.json()["error"]["message"]


def wait_for(cond, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_full_queue_is_429(client, strict):
    engine = strict.state.engine
    params = SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)
    first = engine.add_request("1, 2, 3,", params)
    assert wait_for(lambda: engine.status()["running"] == 1)
    second = engine.add_request("4, 5, 6,", params)        # waits: max_batch is 1
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="r4_qv", prompt="hi", max_tokens=2)
        assert_error_shape(e.value, 429)
        assert metric(metrics(strict), "punica_requests_rejected_total") >= 1
    finally:
        engine.abort(first.id)
        engine.abort(second.id)
    assert wait_for(lambda: engine.status()["kv_blocks_used"] == 0)


def test_metrics_exposes_engine_state(client, strict):
    client.completions.create(model="r4_qv", prompt="Hello there", max_tokens=4, temperature=0)
    m = metrics(strict)
    for name in ("punica_step_duration_seconds_count", "punica_step_batch_requests_count",
                 "punica_step_adapters_count", "punica_time_to_first_token_seconds_count",
                 "punica_generated_tokens_total", "punica_requests_total"):
        assert metric(m, name) > 0, name
    for name in ("punica_queue_depth", "punica_kv_blocks_used", "punica_kv_blocks_total",
                 "punica_adapter_slots_used", "punica_adapter_slots_total"):
        assert (name, ()) in m, name
    assert metric(m, "punica_step_adapters_bucket", le="1.0") >= 1
    assert metric(m, "punica_kv_blocks_total") > 0


def test_disconnect_mid_stream_frees_kv_blocks(strict):
    before = metrics(strict)
    aborted = metric(before, "punica_requests_finished_total", reason="abort")
    body = {"model": "r4_qv", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 2000,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", strict.url + "/v1/completions", json=body,
                         headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [ln for ln, _ in zip((ln for ln in lines if ln.startswith("data:")),
                                       range(3))]
            assert len(got) == 3
            during = metrics(strict)
            assert metric(during, "punica_kv_blocks_used") > 0
            steps_at_close = metric(during, "punica_steps_total")
        # leaving the block closes the connection mid-stream
    assert wait_for(lambda: metric(metrics(strict), "punica_kv_blocks_used") == 0, 10)
    after = metrics(strict)
    assert metric(after, "punica_requests_finished_total", reason="abort") == aborted + 1
    assert metric(after, "punica_running_requests") == 0
    assert metric(after, "punica_steps_total") - steps_at_close <= 10
