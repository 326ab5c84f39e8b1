"""The notebook widgets driven from Python (no browser): CompareWidget and AdapterLoader."""
import datetime
import json
import re
import time

import pytest

pytest.importorskip("ipywidgets")

from punica_core import LLM, Engine, EngineConfig, SamplingParams  # noqa: E402
from punica_core.notebook import AdapterLoader, CompareWidget  # noqa: E402

PROMPT = "Name three colours."


@pytest.fixture(scope="module")
def llm(default_loaded, parity_adapters):
    engine = Engine(EngineConfig(kv_cache_gb=0.25, max_adapters_on_gpu=4), loaded=default_loaded)
    llm = LLM(engine=engine)
    for name in ("r4_qv", "r8_all"):
        llm.load_adapter(name, parity_adapters[name])
    yield llm
    llm.close()


def test_columns_match_generate_and_share_steps(llm):
    w = CompareWidget(llm)
    adapters = ["r4_qv", "r8_all", None]
    res = w.run(PROMPT, adapters=adapters, max_tokens=12, temperature=0)
    assert res.ok, res.error or [c.error for c in res.columns]
    assert [c.adapter for c in res.columns] == adapters

    # the same prompt through LLM.generate, greedily: the same text in every column
    want = llm.generate([res.prompt_ids] * 3, SamplingParams(max_tokens=12, temperature=0),
                        adapters=adapters)
    for col, out in zip(res.columns, want):
        assert col.token_ids == out.token_ids
        assert col.text == out.text and col.text
    # the columns were one batch: every decode step carried all three adapters' rows
    assert res.shared_steps >= min(c.num_tokens for c in res.columns) - 1 >= 1
    shared = [s for s in res.steps if {"r4_qv", "r8_all", "base"} <= set(s.rows_per_adapter)]
    assert all(s.num_requests >= 3 for s in shared)
    # and the widget shows what ran: text, speed, and the batch view
    for col, res_col in zip(w._columns, res.columns):
        assert col.picker.value == res_col.adapter
        assert res_col.text.split()[0] in col.text.value
        assert "tok/s" in col.stats.value and "ms/token" in col.stats.value
        assert res_col.tokens_per_s > 0 and res_col.ms_per_token > 0
    assert "base" in w.batch_html.value and "r4_qv" in w.batch_html.value
    assert "done" in w.status_html.value
    assert w.run_button.disabled is False and w.stop_button.disabled is True
    assert {r["rows:r8_all"] for r in res.steps_table()} >= {1}


def test_run_button_and_column_count(llm):
    w = CompareWidget(llm, prompt=PROMPT, max_tokens=4)
    assert w.adapters[0] is None and len(w.adapters) == 3      # base + both loaded adapters
    w.columns_count.value = 5
    assert len(w.adapters) == 5 and len(w.columns_box.children) == 5
    w.columns_count.value = 2
    assert len(w.adapters) == 2
    w._columns[1].picker.value = "r8_all"
    w.run_button.click()
    res = w.wait(timeout=120)
    assert res is not None and res.ok
    assert [c.adapter for c in res.columns] == [None, "r8_all"]
    assert all(1 <= c.num_tokens <= 4 for c in res.columns)
    with pytest.raises(ValueError):
        w.set_adapters([None])
    with pytest.raises(ValueError):
        w.set_adapters([None] * 7)


def test_bad_inputs_show_errors_and_widget_stays_usable(llm):
    w = CompareWidget(llm, max_tokens=3)
    res = w.run("")
    assert res.error and "prompt" in w.status_html.value
    res = w.run(PROMPT, adapters=["nope", None])
    assert res.error and "unknown adapter" in w.status_html.value
    res = w.run(PROMPT, adapters=[None, "r4_qv"])
    assert res.ok and all(c.num_tokens for c in res.columns)


def test_loader_bad_path_shows_error_then_loads(llm, parity_adapters, tmp_path):
    compare = CompareWidget(llm, adapters=[None, None])
    loader = AdapterLoader(llm, on_load=compare.refresh_adapters)
    assert loader.load_path(str(tmp_path / "missing")) is None
    assert "no such adapter" in loader.last_error
    assert "could not load" in loader.status_html.value and "missing" in loader.status_html.value
    # a folder that is not an adapter: the engine's message, plainly
    (tmp_path / "empty").mkdir()
    assert loader.load_path(str(tmp_path / "empty")) is None
    assert "adapter_config.json" in loader.status_html.value
    # still usable: the same widget loads a good adapter, and the compare pickers see it
    info = loader.load_path(str(parity_adapters["r16_mlp_rs"]),
                             name="loaded_here")
    assert info is not None and info.name == "loaded_here" and loader.last_error is None
    assert "loaded_here" in loader.table_html.value
    assert "loaded_here" in [v for _, v in compare._columns[0].picker.options]
    # loading the same name twice is refused with the engine's reason
    assert loader.load_path(str(parity_adapters["r16_mlp_rs"]), name="loaded_here") is None
    assert "already registered" in loader.last_error
    llm.unload_adapter("loaded_here")


def test_loader_upload(llm, parity_adapters):
    loader = AdapterLoader(llm)
    folder = parity_adapters["r4_qv"]
    cfg = (folder / "adapter_config.json").read_bytes()
    weights = (folder / "adapter_model.safetensors").read_bytes()
    now = datetime.datetime.now()

    def upload(files):
        loader.upload.value = tuple({"name": n, "type": "", "size": len(b),
                                     "content": memoryview(b), "last_modified": now}
                                    for n, b in files.items())

    upload({"adapter_config.json": cfg})
    assert loader.load_upload(name="up") is None and "missing" in loader.last_error
    upload({"adapter_config.json": json.dumps({"peft_type": "LORA"}).encode(),
            "adapter_model.safetensors": b"not safetensors"})
    assert loader.load_upload(name="up") is None and loader.last_error
    upload({"adapter_config.json": cfg, "adapter_model.safetensors": weights})
    info = loader.load_upload(name="up")
    assert info is not None and info.rank == 4 and loader.upload.value == ()
    assert "up" in {i.name for i in llm.list_adapters()}
    llm.unload_adapter("up")


def test_stop_cancels_every_column(llm):
    w = CompareWidget(llm, adapters=["r4_qv", None], prompt=PROMPT, max_tokens=400)
    w.temperature_box.value = 0.0
    w.run_button.click()
    for _ in range(600):                    # wait until tokens flow, then press Stop
        if all(re.search(r">[1-9]\d* tokens", c.stats.value) for c in w._columns):
            break
        w.wait(timeout=0.05)
    w.stop_button.click()
    res = w.wait(timeout=120)
    assert res is not None
    assert all(c.finish_reason in ("abort", "stop") for c in res.columns)
    assert any(c.finish_reason == "abort" for c in res.columns)
    assert w.run_button.disabled is False
    for _ in range(100):                    # the aborted requests leave the engine
        if not llm.engine.scheduler.running:
            break
        time.sleep(0.05)
    assert not llm.engine.scheduler.running
