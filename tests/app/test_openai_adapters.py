"""Adapter management over HTTP: load by path (only under --adapter-dir), use, unload, upload a
.zip, and the refusals (outside path, missing path, invalid adapter, in use)."""
import io
import json
import os
import shutil
import time
import zipfile

import httpx
import pytest

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Say something about cats."}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)


def post(client, route, body):
    return client.post(route, body=body, cast_to=object)


def answer(client, model, n=8):
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=n, temperature=0)
    return r.choices[0].message.content


def model_ids(client):
    return {m.id for m in client.models.list().data}


def test_load_use_unload_by_path(client, parity_adapters):
    info = post(client, "/load_lora_adapter", {"lora_name": "again",
                                               "lora_path": str(parity_adapters["r4_qv"])})
    assert info["id"] == "again" and info["rank"] == 4
    assert "again" in model_ids(client)
    assert answer(client, "again") == answer(client, "r4_qv")
    assert post(client, "/unload_lora_adapter", {"lora_name": "again"})["id"] == "again"
    assert "again" not in model_ids(client)
    with pytest.raises(openai.NotFoundError):
        answer(client, "again")
    with pytest.raises(openai.NotFoundError):
        post(client, "/unload_lora_adapter", {"lora_name": "again"})

    # a relative path is looked up inside the allowed folders
    post(client, "/load_lora_adapter", {"lora_name": "rel", "lora_path": "r8_all"})
    assert client.models.retrieve("rel").model_dump()["rank"] == 8
    post(client, "/unload_lora_adapter", {"lora_name": "rel"})


def test_paths_outside_adapter_dirs_are_refused(client, parity_adapters, tmp_path):
    root = parity_adapters["r4_qv"].parent
    outside = tmp_path / "outside"
    shutil.copytree(parity_adapters["r4_qv"], outside)
    link = root / "sneaky_link"
    if not link.exists():
        os.symlink(outside, link)
    for path in [str(outside), "/etc", "../" + outside.parent.name + "/outside",
                 str(root / ".." / outside.parent.name), str(link), "sneaky_link"]:
        with pytest.raises(openai.PermissionDeniedError) as e:
            post(client, "/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert "outside" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        post(client, "/load_lora_adapter", {"lora_name": "x", "lora_path": str(root / "nope")})
    assert "does not exist" in e.value.message
    assert "x" not in model_ids(client)


def test_invalid_adapter_answers_400_with_the_reason(client, parity_adapters):
    bad = parity_adapters["r4_qv"].parent / "bad_dora"
    if not bad.exists():
        shutil.copytree(parity_adapters["r4_qv"], bad)
        cfg = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(openai.BadRequestError) as e:
        post(client, "/load_lora_adapter", {"lora_name": "dora", "lora_path": str(bad)})
    assert "DoRA" in e.value.message and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:       # the name is taken
        post(client, "/load_lora_adapter", {"lora_name": "r4_qv", "lora_path": "r8_all"})
    assert "already registered" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        post(client, "/load_lora_adapter", {"lora_name": "../evil", "lora_path": "r8_all"})
    assert "invalid adapter name" in e.value.message


def zip_folder(folder, prefix="adapter/") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in folder.iterdir():
            if p.is_file():
                zf.write(p, prefix + p.name)
    return buf.getvalue()


def test_upload_zip_use_unload(live_server, client, parity_adapters):
    url = live_server.url + "/v1/upload_lora_adapter"
    data = zip_folder(parity_adapters["r16_mlp_rs"])
    r = httpx.post(url, data={"lora_name": "uploaded"}, timeout=30,
                   files={"file": ("mine.zip", data, "application/zip")})
    assert r.status_code == 200, r.text
    assert r.json()["rank"] == 16
    folder = live_server.state.upload_dir / "uploaded"
    assert (folder / "adapter_model.safetensors").is_file()
    assert answer(client, "uploaded") == answer(client, "r16_mlp_rs")
    post(client, "/unload_lora_adapter", {"lora_name": "uploaded"})
    assert not folder.exists()

    # the raw .zip as the body works too
    r = httpx.post(url, params={"lora_name": "raw_up"}, content=data, timeout=30,
                   headers={"content-type": "application/zip"})
    assert r.status_code == 200, r.text
    post(client, "/unload_lora_adapter", {"lora_name": "raw_up"})

    r = httpx.post(url, data={"lora_name": "junk"}, timeout=30,
                   files={"file": ("junk.zip", b"not a zip at all", "application/zip")})
    assert r.status_code == 400 and "not a valid .zip" in r.json()["error"]["message"]
    assert not (live_server.state.upload_dir / "junk").exists()


def test_unload_in_use_is_refused_and_load_does_not_stall_streams(client, parity_adapters):
    post(client, "/load_lora_adapter", {"lora_name": "busy", "lora_path": "r64_attn"})
    stream = client.completions.create(model="busy", prompt="1, 2, 3, 4, 5,", max_tokens=400,
                                       temperature=0, stream=True)
    it = iter(stream)
    next(it)
    with pytest.raises(openai.ConflictError):
        post(client, "/unload_lora_adapter", {"lora_name": "busy"})
    # loading another adapter while the stream runs: both go on
    post(client, "/load_lora_adapter", {"lora_name": "side", "lora_path": "r8_all"})
    for _ in range(3):
        assert next(it).choices
    stream.close()                          # client disconnects: the request is aborted
    for _ in range(100):
        try:
            post(client, "/unload_lora_adapter", {"lora_name": "busy"})
            break
        except openai.ConflictError:
            time.sleep(0.05)
    else:
        raise AssertionError("the aborted request kept the adapter in use")
    post(client, "/unload_lora_adapter", {"lora_name": "side"})
