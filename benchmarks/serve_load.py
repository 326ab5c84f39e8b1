"""Load on the OpenAI-compatible server: N concurrent streaming clients, each with its own
adapter, against one server. Reports output throughput, time to first token and time between
tokens (p50 / p99) as JSON.

By default it starts its own server in this process (the default model, N random rank-16
adapters on all seven projections, uvicorn on a loopback port); with --url it loads a running
server instead, using the adapters that server lists (--adapters picks them by name).

    python benchmarks/serve_load.py --clients 8 --max-tokens 32 \
        --out benchmarks/results/serve_load_cpu.json
    python benchmarks/serve_load.py --url http://127.0.0.1:7860 --api-key KEY --clients 16

Time between tokens is measured between SSE chunks as they arrive. A chunk normally carries one
token; when the detokenizer holds text back (a partial character, a possible stop string) the
next chunk carries two, so `tpot` (decode time / (tokens - 1) per request) is reported beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.common  # noqa: E402,F401  (takes benchmarks/ off sys.path: see there)

PROMPTS = ["Write a short story about a lighthouse keeper.",
           "Explain how a bicycle works to a child.",
           "List some facts about the moon.",
           "Describe your favourite meal in detail.",
           "What makes a good friend?",
           "Tell me about the history of writing.",
           "How do bees make honey?",
           "Give advice to someone learning to cook."]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs: list[float]) -> dict:
    return {"p50": pct(xs, 50), "p99": pct(xs, 99),
            "mean": statistics.fmean(xs) if xs else None, "count": len(xs)}


# -- an in-process server -------------------------------------------------------------------
def start_local_server(n_adapters: int, rank: int, threads: int, max_batch: int):
    import torch
    import uvicorn
    from transformers import AutoModelForCausalLM

    from app.server import build_state
    from app.state import ServerConfig
    from punica_core import Engine, EngineConfig
    from punica_core.adapters.random_adapter import ALL_PROJECTIONS, make_peft_adapter
    from punica_core.model.default_model import default_model_dir

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir()),
                                              dtype=torch.float32).eval()
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-adapters-"))
    names = [f"client{i}" for i in range(n_adapters)]
    paths = {n: make_peft_adapter(hf, tmp / n, rank, ALL_PROJECTIONS, seed=i)
             for i, n in enumerate(names)}
    del hf
    engine = Engine(EngineConfig(max_batch=max_batch, max_adapters_on_gpu=n_adapters,
                                 max_lora_rank=max(rank, 16), kv_cache_gb=0.5))
    for n, p in paths.items():
        engine.register_adapter(n, p)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServerConfig(adapters_dir=None, port=port, max_batch=max_batch,
                       max_adapters_on_gpu=n_adapters, upload_dir=str(tmp / "uploads"))
    state = build_state(cfg, engine=engine, progress=lambda *_: None)
    try:
        from app.server import create_app
        app = create_app(state)
    except ImportError:                 # the playground is not there: the API alone
        from fastapi import FastAPI

        from app.openai_api import build_router
        app = FastAPI()
        app.include_router(build_router(state))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(10)
        state.async_engine.loop.stop()
        engine.close()
    return f"http://127.0.0.1:{port}", names, stop, {
        "model": engine.name, "device": str(engine.model.device), "adapter_rank": rank,
        "adapter_targets": ALL_PROJECTIONS, "max_batch": max_batch, "torch_threads": threads}


# -- the clients ----------------------------------------------------------------------------
async def one_client(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                     start: asyncio.Event) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    await start.wait()
    t0 = time.perf_counter()
    arrivals, usage, error = [], None, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"model": model, "error": f"{r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    arrivals.append(time.perf_counter())
    t1 = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(arrivals)
    return {"model": model, "error": error, "tokens": tokens, "start": t0, "end": t1,
            "ttft": arrivals[0] - t0 if arrivals else None,
            "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "tpot": (arrivals[-1] - arrivals[0]) / (tokens - 1)
            if len(arrivals) > 1 and tokens > 1 else None}


async def run_load(url: str, api_key: str | None, models: list[str], clients: int,
                   max_tokens: int) -> list[dict]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=limits) as http:
        start = asyncio.Event()
        tasks = [asyncio.create_task(one_client(http, models[i % len(models)],
                                                PROMPTS[i % len(PROMPTS)], max_tokens, start))
                 for i in range(clients)]
        await asyncio.sleep(0.1)
        start.set()
        return await asyncio.gather(*tasks)


def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}


def server_batching(before: dict, after: dict) -> dict:
    """Mean requests, adapters and seconds per engine step during the run (from /metrics)."""
    out = {}
    for key, name in (("requests_per_step", "punica_step_batch_requests"),
                      ("adapters_per_step", "punica_step_adapters"),
                      ("step_seconds", "punica_step_duration_seconds")):
        n = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        if n:
            out[f"mean_{key}"] = (after[f"{name}_sum"] - before.get(f"{name}_sum", 0)) / n
    out["steps"] = after.get("punica_steps_total", 0) - before.get("punica_steps_total", 0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server (default: start one in this process)")
    ap.add_argument("--api-key", default=os.environ.get("PUNICA_API_KEY"))
    ap.add_argument("--adapters", help="comma-separated adapter names to use with --url "
                                       "(default: every adapter the server lists)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16, help="rank of the local server's adapters")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (local server)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up rounds (not reported)")
    ap.add_argument("--out", default="benchmarks/results/serve_load_cpu.json")
    args = ap.parse_args()

    stop, server_info = (lambda: None), {}
    if args.url:
        url = args.url.rstrip("/")
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        listed = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"]
        names = ([a for a in args.adapters.split(",")] if args.adapters else
                 [m["id"] for m in listed if m.get("parent")])
        if not names:
            sys.exit("the server lists no adapters: load some, or pass --adapters")
        server_info = {"url": url}
    else:
        url, names, stop, server_info = start_local_server(args.clients, args.rank,
                                                           args.threads, args.clients)
    try:
        for _ in range(args.warmup):
            asyncio.run(run_load(url, args.api_key, names, args.clients, 4))
        before = scrape(url)
        t0 = time.perf_counter()
        results = asyncio.run(run_load(url, args.api_key, names, args.clients,
                                       args.max_tokens))
        wall = time.perf_counter() - t0
        batching = server_batching(before, scrape(url))
    finally:
        stop()

    ok = [r for r in results if not r.get("error")]
    tokens = sum(r["tokens"] for r in ok)
    span = (max(r["end"] for r in ok) - min(r["start"] for r in ok)) if ok else wall
    out = {
        "benchmark": "serve_load",
        "clients": args.clients, "max_tokens": args.max_tokens,
        "distinct_adapters": len({r["model"] for r in results}),
        "server": server_info,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "requests_ok": len(ok), "requests_failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r.get("error")}),
        "output_tokens": tokens, "wall_s": span,
        "throughput_tok_s": tokens / span if span else None,
        "requests_per_s": len(ok) / span if span else None,
        "ttft_s": summary([r["ttft"] for r in ok if r["ttft"] is not None]),
        "inter_token_s": summary([g for r in ok for g in r["gaps"]]),
        "tpot_s": summary([r["tpot"] for r in ok if r["tpot"] is not None]),
        "server_batching": batching,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("requests_ok", "throughput_tok_s", "ttft_s",
                                          "inter_token_s", "server_batching")}, indent=2))


if __name__ == "__main__":
    main()
