"""The playground through gradio_client against a live server: concurrent chats share steps and
match greedy LLM output; bad inputs give clear messages and disturb nobody."""
import io
import json
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from punica_core import Engine, EngineConfig, SamplingParams

QUESTION = "Name one fruit."


@pytest.fixture(scope="module")
def client(live_server):
    from gradio_client import Client
    return Client(live_server.url + "/", verbose=False)


def chat_args(adapter, text=QUESTION, max_tokens=24):
    history = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return (history, adapter, "", 0.0, 1.0, max_tokens)


def answer(history) -> str:
    from app.playground_chat import text_of
    return text_of(history[-1]["content"])


def test_four_concurrent_chats_share_steps_and_match_greedy(live_server, client,
                                                            default_loaded, parity_adapters):
    adapters = list(parity_adapters)
    before = len(live_server.state.engine.metrics.steps)
    jobs = [client.submit(*chat_args(a), api_name="/chat") for a in adapters]
    results = [answer(j.result(timeout=120)) for j in jobs]
    steps = list(live_server.state.engine.metrics.steps)[before:]
    assert max(s.num_adapters for s in steps) >= 3, "the chats were not batched together"
    reference = Engine(EngineConfig(kv_cache_gb=0.1), loaded=default_loaded)
    for a in adapters:
        reference.register_adapter(a, parity_adapters[a])
    msgs = [{"role": "user", "content": QUESTION}]
    for a, got in zip(adapters, results):
        req = reference.add_request(None, SamplingParams(max_tokens=24, temperature=0), a,
                                    prompt_ids=reference.encode_chat(msgs))
        while reference.has_work():
            reference.step()
        assert got == req.stream.result().text, a
    reference.close()


def test_stream_yields_partial_answers(client):
    job = client.submit(*chat_args("r8_all", max_tokens=20), api_name="/chat")
    seen = [answer(h) for h in job]
    assert len(seen) >= 3 and all(seen[-1].startswith(s) for s in seen if s)


def test_compare_streams_side_by_side_in_one_batch(live_server, client):
    before = len(live_server.state.engine.metrics.steps)
    out = client.predict("Say hi.", "", 16, "r4_qv", "base model, no adapter", "(none)",
                         "r64_attn", api_name="/compare")
    assert out[0] and out[1] and out[3] and out[0] != out[1] and out[2] == ""
    steps = list(live_server.state.engine.metrics.steps)[before:]
    assert any({"r4_qv", "r64_attn", "base"} <= set(s.rows_per_adapter) for s in steps)


def wait_for(cond, timeout=15.0):
    import time
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_stop_cancels_the_request_inside_the_engine(live_server, client):
    engine = live_server.state.engine
    aborted = engine.metrics.finished_by_reason["abort"]
    job = client.submit(*chat_args("r4_qv", max_tokens=400), api_name="/chat")
    assert wait_for(lambda: engine.status()["running"] == 1)
    assert wait_for(lambda: len(job.outputs()) >= 2)     # it streams ...
    job.cancel()                                          # ... then Stop
    assert wait_for(lambda: engine.metrics.finished_by_reason["abort"] == aborted + 1)
    assert wait_for(lambda: engine.status()["running"] == 0
                    and engine.kv.allocator.num_used == 0)


def test_bad_chat_inputs_show_clear_messages(live_server, client, parity_adapters):
    from gradio_client.exceptions import AppError
    for call in (lambda: client.predict("   ", api_name="/check_message"),
                 lambda: client.predict(*chat_args(None, " "), api_name="/chat")):
        with pytest.raises(AppError, match="the message is empty"):
            call()
    too_long = "word " * 9000
    assert "context" in answer(client.predict(*chat_args(None, too_long), api_name="/chat"))
    engine = live_server.state.engine       # an adapter removed after the user picked it
    engine.register_adapter("short_lived", parity_adapters["r4_qv"])
    status, *_ = client.predict("short_lived", api_name="/unload")
    assert "unloaded" in status
    removed = answer(client.predict(*chat_args("short_lived"), api_name="/chat"))
    assert removed.startswith("⚠️") and "unknown adapter 'short_lived'" in removed
    assert engine.kv.allocator.num_used == 0


def test_a_refused_turn_does_not_poison_the_conversation(client):
    history = [{"role": "user", "content": [{"type": "text", "text": "word " * 9000}]}]
    history = client.predict(history, None, "", 0.0, 1.0, 8, api_name="/chat")
    assert answer(history).startswith("⚠️")
    history = history + [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    history = client.predict(history, None, "", 0.0, 1.0, 8, api_name="/chat")
    assert answer(history) and not answer(history).startswith("⚠️")


def test_panels_show_the_engine(live_server, client):
    from app import panels
    engine = live_server.state.engine
    client.predict(*chat_args("r8_all", max_tokens=4), api_name="/chat")
    by_adapter = panels.batch_by_adapter(engine)
    assert len(by_adapter) and set(by_adapter.columns) == {"step", "rows", "adapter"}
    phase = panels.batch_by_phase(engine)
    assert set(phase["phase"]) == {"prefill", "decode"} and phase["rows"].sum() > 0
    mem = panels.memory_breakdown(engine).set_index("part")["MiB"]
    assert mem["weights"] > 100 and mem["process"] > mem["weights"]
    assert len(panels.slots_table(engine)) == engine.pool.num_slots
    assert "queue" in panels.status_markdown(engine)
    for df in (panels.latency_over_time(engine), panels.throughput_over_time(engine),
               panels.queue_over_time(engine)):
        assert len(df)


def zip_bytes(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    return buf.getvalue()


def upload(client, tmp_path, name, files: dict):
    from gradio_client import handle_file
    paths = []
    for fname, data in files.items():
        p = tmp_path / fname
        p.write_bytes(data)
        paths.append(handle_file(str(p)))
    status, *_ = client.predict(name, paths, api_name="/upload")
    return status


def test_uploads_good_and_bad(live_server, client, parity_adapters, tmp_path):
    src = parity_adapters["r4_qv"]
    good = {n: (src / n).read_bytes() for n in ("adapter_config.json",
                                                 "adapter_model.safetensors")}
    two = upload(client, tmp_path, "two", {"a.zip": zip_bytes(good), "b.zip": zip_bytes(good)})
    assert "one .zip at a time" in two
    status = upload(client, tmp_path, "uploaded_zip", {"peft.zip": zip_bytes(good)})
    assert status.startswith("✅") and "uploaded_zip" in live_server.state.engine.store
    status = upload(client, tmp_path, "uploaded_pair", good)
    assert status.startswith("✅")
    out = answer(client.predict(*chat_args("uploaded_pair"), api_name="/chat"))
    assert out and not out.startswith("⚠️")
    # refused: not a zip, pickled weights, another base model, a bad name
    assert "not a valid .zip" in upload(client, tmp_path, "x1", {"notes.zip": b"hello"})
    assert "not an adapter" in upload(client, tmp_path, "x2", {"notes.txt": b"hello"})
    pickled = {"adapter_config.json": good["adapter_config.json"],
               "adapter_model.bin": b"\x80\x04pickle"}
    assert "pickled weights are never loaded" in upload(client, tmp_path, "x3",
                                                        {"p.zip": zip_bytes(pickled)})
    other = tmp_path / "other.safetensors"
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               torch.zeros(4, 4096),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
               torch.zeros(4096, 4)}, str(other))
    wrong = {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                "target_modules": ["q_proj"]}).encode(),
             "adapter_model.safetensors": other.read_bytes()}
    assert "another base model" in upload(client, tmp_path, "x4", wrong)
    assert "invalid adapter name" in upload(client, tmp_path, "../evil", good)
    assert not any(n.startswith("x") for n in live_server.state.engine.store.names())


def test_unload_refused_while_in_use_then_allowed(live_server, client):
    job = client.submit(*chat_args("r16_mlp_rs", max_tokens=200), api_name="/chat")
    for _ in job:       # wait until it streams
        break
    status, *_ = client.predict("r16_mlp_rs", api_name="/unload")
    assert "in use" in status
    job.cancel()


def test_oversized_upload_and_no_upload_are_refused(default_loaded, tmp_path_factory,
                                                    parity_adapters, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from live_server import start_server
    srv = start_server(default_loaded, tmp_path_factory, {}, max_upload_mb=1,
                       allow_upload=False)
    try:
        client = Client(srv.url + "/", verbose=False)
        big = {"big.zip": b"\0" * (2 << 20)}
        try:
            msg = upload(client, tmp_path, "big", big)
        except Exception as e:      # Gradio itself refuses files over max_file_size
            msg = str(e)
        assert "exceeds the maximum file size of 1048576 bytes" in msg, msg
        small = {n: (parity_adapters["r4_qv"] / n).read_bytes()
                 for n in ("adapter_config.json", "adapter_model.safetensors")}
        with pytest.raises(AppError, match="uploads are disabled"):     # --no-upload
            upload(client, tmp_path, "small", small)
        assert not srv.state.engine.store.names()
    finally:
        srv.stop()


def test_server_side_upload_limit_names_the_size(default_loaded, tmp_path):
    from app.playground_uploads import register_upload
    from punica_core import AdapterError
    engine = Engine(EngineConfig(kv_cache_gb=0.01), loaded=default_loaded)
    big = tmp_path / "big.zip"
    big.write_bytes(b"\0" * (2 << 20))
    with pytest.raises(AdapterError, match="over the 1 MB upload limit"):
        register_upload(engine, "big", [str(big)], tmp_path / "store", max_mb=1)
    assert not (tmp_path / "store").exists()
    engine.close()


def test_adapter_colors_settle_before_the_plot_rebuilds(monkeypatch):
    from types import SimpleNamespace
    from app import panels
    names = {"a", "b"}
    engine = SimpleNamespace(store=SimpleNamespace(names=lambda: set(names)))
    now = [1000.0]
    monkeypatch.setattr(panels.time, "time", lambda: now[0])
    colors = panels.AdapterColors(engine, settle_s=1.5)
    first = colors()
    assert set(first) == {"base", "a", "b"}
    names.add("c")
    assert "c" not in colors()                  # frames carry "c" before the map names it
    now[0] += 2
    assert colors()["c"] not in (first["a"], first["b"]) and colors()["a"] == first["a"]
    names.discard("a")
    assert "a" in colors()
    now[0] += 2
    assert "a" not in colors()
