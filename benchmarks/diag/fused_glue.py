"""Diagnostic: one decoder layer's elementwise glue in torch ops vs the fused Triton kernels.

    python benchmarks/diag/fused_glue.py --out /tmp/fused_glue.json

Glue = everything in a layer but the 4 GEMMs and attention: input RMSNorm, RoPE on q/k, the
K/V cache write, residual add + post RMSNorm, SiLU * up, residual add. Llama-2-7B shapes,
bf16, T rows (decode batch). Timed with CUDA events, eager and replayed as one CUDA graph of
`--layers` layers (the decode runner's setting, where launch gaps rather than host time count);
also counts the kernels each variant launches per layer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from punica_core.engine.cuda_graphs import capture_graph  # noqa: E402
from punica_core.model import fused_triton as ft  # noqa: E402
from punica_core.model.config import NAMED_SHAPES  # noqa: E402
from punica_core.model.llama import rms_norm  # noqa: E402
from punica_core.model.rope import RotaryTable, apply_rotary  # noqa: E402


def make(cfg, T, dtype, slots=4096):
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)
    H, I = cfg.hidden_size, cfg.intermediate_size
    rope = RotaryTable(cfg, 4096, "cuda")
    cos, sin = rope.lookup(torch.randint(0, 4096, (T,), device="cuda", generator=g))
    return dict(x=rnd(T, H), o=rnd(T, H, scale=1e-3), d=rnd(T, H, scale=1e-3),
                qkv=rnd(T, cfg.q_size + 2 * cfg.kv_size), gu=rnd(T, 2 * I),
                w_in=rnd(H).abs() + 0.5, w_post=rnd(H).abs() + 0.5, cos=cos, sin=sin,
                kc=rnd(slots, cfg.num_kv_heads, cfg.head_dim), vc=rnd(slots, cfg.num_kv_heads,
                                                                      cfg.head_dim),
                slots=torch.randperm(slots, device="cuda", generator=g)[:T])


def torch_glue(cfg, t):
    """LlamaModel.forward's layer today, minus GEMMs and attention."""
    T, eps, D = t["x"].shape[0], cfg.rms_norm_eps, cfg.head_dim
    x = t["x"]
    rms_norm(x, t["w_in"], eps)                                      # input norm
    q, k, v = t["qkv"].split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    apply_rotary(q.view(T, cfg.num_heads, D), t["cos"], t["sin"])
    k = apply_rotary(k.view(T, cfg.num_kv_heads, D), t["cos"], t["sin"])
    t["kc"].index_copy_(0, t["slots"], k)
    t["vc"].index_copy_(0, t["slots"], v.view(T, cfg.num_kv_heads, D))
    x = x + t["o"]
    rms_norm(x, t["w_post"], eps)
    gate, up = t["gu"].chunk(2, dim=-1)
    F.silu(gate) * up
    return x + t["d"]


def fused_glue(cfg, t):
    """The same with the fused kernels; the input norm is the previous layer's add_rms_norm."""
    eps = cfg.rms_norm_eps
    ft.rotary_qk_and_cache(t["qkv"], t["cos"], t["sin"], t["kc"], t["vc"], t["slots"],
                           cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    ft.add_rms_norm(t["x"], t["o"], t["w_post"], eps, inplace=True)
    ft.silu_mul(t["gu"])
    return ft.add_rms_norm(t["x"], t["d"], t["w_in"], eps, inplace=True)[1]


def time_us(fn, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def kernels_per_call(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32, help="layers captured per graph")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default="/tmp/fused_glue.json")
    args = ap.parse_args()
    cfg = NAMED_SHAPES[args.shape]
    t = make(cfg, args.rows, torch.bfloat16)
    out = {"device": torch.cuda.get_device_name(), "shape": args.shape, "rows": args.rows,
           "dtype": "bfloat16", "layers_per_graph": args.layers}
    for name, glue in (("torch", torch_glue), ("fused", fused_glue)):
        def layer():
            return glue(cfg, t)
        res = {"eager_us_per_layer": time_us(layer, args.iters)}
        try:
            res["kernels_per_layer"] = kernels_per_call(layer)
        except Exception as e:          # noqa: BLE001 - the profiler is optional here
            res["kernels_per_layer"] = f"unavailable: {e}"
        graph, _ = capture_graph(lambda: [layer() for _ in range(args.layers)])
        res["graph_us_per_layer"] = time_us(graph.replay, max(10, args.iters // 10)) / args.layers
        res["graph_ms_per_step"] = res["graph_us_per_layer"] * cfg.num_layers / 1e3
        out[name] = res
        print(name, json.dumps(res), flush=True)
        del graph
    out["graph_saving_ms_per_step"] = out["torch"]["graph_ms_per_step"] - \
        out["fused"]["graph_ms_per_step"]
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
