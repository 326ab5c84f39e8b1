"""Soak: minutes of mixed traffic against the CPU server, reporting requests served, errors by
kind, anything lost, and process memory over time. Not in CI.

    python benchmarks/soak.py --minutes 10 --out benchmarks/results/soak_cpu.json

Traffic, from several concurrent clients: streaming chats with every sample adapter and the
base model, streams dropped mid-way, bad requests (unknown model, prompt over the context,
bad parameters), adapter uploads (a valid .zip, then unloaded; a non-zip) and unloads.
"Lost" is any request that ended without a completed stream or an explicit error status.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx  # noqa: E402

from punica_core.engine.metrics import process_memory_bytes  # noqa: E402


def start_server(port: int):
    import uvicorn

    from app.server import build_state, create_app
    from app.state import ServerConfig
    cfg = ServerConfig(adapters_dir=str(ROOT / "adapters"), port=port, max_waiting=32,
                       max_batch=16, max_upload_mb=16)
    state = build_state(cfg, progress=lambda *_: None)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    return server, state


def adapter_zip(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            z.write(ROOT / "adapters" / name / f, f)
    return buf.getvalue()


async def client_loop(url, deadline, rng, models, outcomes, lost, upload_blob):
    async with httpx.AsyncClient(timeout=120) as c:
        n = 0
        while time.time() < deadline:
            n += 1
            kind = rng.choices(["chat", "drop", "bad_model", "too_long", "bad_param",
                                "upload", "bad_upload"], weights=[60, 15, 5, 5, 5, 5, 5])[0]
            try:
                if kind in ("chat", "drop"):
                    body = {"model": rng.choice(models), "stream": True, "temperature": 0,
                            "max_tokens": rng.randint(4, 32),
                            "messages": [{"role": "user", "content": f"Say something #{n}."}]}
                    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            outcomes[f"{kind}:{r.status_code}"] += 1
                            continue
                        lines = 0
                        async for line in r.aiter_lines():
                            lines += 1
                            if kind == "drop" and lines >= rng.randint(1, 6):
                                break
                            if line == "data: [DONE]":
                                break
                        done = kind == "drop" or line == "data: [DONE]"
                        outcomes[f"{kind}:{'ok' if done else 'cut'}"] += 1
                        if not done:
                            lost.append(kind)
                elif kind == "upload":
                    name = f"soak{n}_{rng.randrange(10**6)}"
                    r = await c.post(url + "/v1/upload_lora_adapter", params={"lora_name": name},
                                     files={"file": ("a.zip", upload_blob)})
                    outcomes[f"upload:{r.status_code}"] += 1
                    if r.status_code == 200:
                        r = await c.post(url + "/v1/unload_lora_adapter",
                                         json={"lora_name": name})
                        outcomes[f"unload:{r.status_code}"] += 1
                else:
                    if kind == "bad_model":
                        body = {"model": "nope", "prompt": "hi", "max_tokens": 2}
                    elif kind == "too_long":
                        body = {"model": models[0], "prompt": "word " * 9000, "max_tokens": 2}
                    elif kind == "bad_param":
                        body = {"model": models[0], "prompt": "hi", "max_tokens": -3}
                    else:
                        r = await c.post(url + "/v1/upload_lora_adapter",
                                         params={"lora_name": f"bad{n}"},
                                         files={"file": ("a.zip", b"not a zip")})
                        outcomes[f"{kind}:{r.status_code}"] += 1
                        continue
                    r = await c.post(url + "/v1/completions", json=body)
                    outcomes[f"{kind}:{r.status_code}"] += 1
            except Exception as e:  # noqa: BLE001 - counted as lost
                lost.append(f"{kind}: {type(e).__name__}: {e}")


async def run(url, minutes, clients, models, upload_blob, memory):
    deadline = time.time() + minutes * 60
    outcomes, lost = Counter(), []

    async def sample_memory():
        t0 = time.time()
        while time.time() < deadline:
            memory.append((round(time.time() - t0, 1), process_memory_bytes() / 2**20))
            await asyncio.sleep(5)
    await asyncio.gather(sample_memory(), *[
        client_loop(url, deadline, random.Random(i), models, outcomes, lost, upload_blob)
        for i in range(clients)])
    return outcomes, lost


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--port", type=int, default=7871)
    ap.add_argument("--out", default="benchmarks/results/soak_cpu.json")
    args = ap.parse_args()
    server, state = start_server(args.port)
    models = [state.base_model_name] + sorted(state.engine.store.names())
    memory: list = []
    outcomes, lost = asyncio.run(run(f"http://127.0.0.1:{args.port}", args.minutes,
                                     args.clients, models, adapter_zip("pirate"), memory))
    end = time.time() + 30
    while time.time() < end and (state.engine.has_work() or state.engine.kv.allocator.num_used):
        time.sleep(0.2)
    st = state.engine.status()
    first = [m for t, m in memory if t <= 60]
    last = [m for t, m in memory if t >= memory[-1][0] - 60]
    out = {"benchmark": "soak_cpu", "minutes": args.minutes, "clients": args.clients,
           "models": models, "requests_by_outcome": dict(sorted(outcomes.items())),
           "requests_total": sum(outcomes.values()), "lost": len(lost),
           "lost_examples": lost[:10],
           "after": {"kv_blocks_used": st["kv_blocks_used"], "running": st["running"],
                     "waiting": st["waiting"], "slots_in_use": st["slots"]["in_use"],
                     "adapters_registered": len(state.engine.store.names())},
           "memory_mib": memory,
           "memory_first_minute_mean_mib": sum(first) / len(first),
           "memory_last_minute_mean_mib": sum(last) / len(last)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        t, m = zip(*memory)
        plt.figure(figsize=(7, 3))
        plt.plot(t, m)
        plt.xlabel("seconds")
        plt.ylabel("process memory, MiB")
        plt.title(f"soak: {out['requests_total']} requests, {out['lost']} lost")
        plt.tight_layout()
        plt.savefig(str(Path(args.out).with_suffix(".png")))
    except ImportError:
        pass
    print(json.dumps({k: v for k, v in out.items() if k != "memory_mib"}, indent=2))
    server.should_exit = True


if __name__ == "__main__":
    main()
