#!/usr/bin/env python
"""Score each sample adapter's behaviour against the base model on held-out prompts.

    python adapters/evaluate.py                      # our engine: every adapter + base, one batch
    python adapters/evaluate.py --backend peft       # cross-check with transformers + PEFT

Every held-out prompt (recipes.heldout_prompts(), no overlap with the training prompts) is sent
once with no adapter and once per adapter, all in ONE generate call, greedy. Each adapter's
metric (recipes.SPECS[name].metric) is computed on its own answers and on the base model's
answers to the same prompts; the JSON written to adapters/results/eval_<backend>.json holds the
scores, the margin the tests require, a few sample answers, and (engine) how the requests shared
decode steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see train.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipes  # noqa: E402

REPO = recipes.ROOT.parent


def _requests(names, prompts):
    """(prompt, adapter or None) for every prompt x (base + adapters), adapters interleaved."""
    return [(p, a) for p in prompts for a in [None, *names]]


def run_engine(names, prompts, max_tokens, llm=None) -> dict:
    """Outputs of our engine, all requests in one llm.chat call. Returns {"outputs":
    {label: [(text, finish_reason)]}, "steps": {...}, "seconds": float}."""
    sys.path.insert(0, str(REPO))
    from punica_core import LLM, SamplingParams
    reqs = _requests(names, prompts)
    own = llm is None
    if own:
        llm = LLM("default", max_batch=max(32, len(reqs)))
    try:
        for n in names:
            llm.load_adapter(n, str(recipes.ROOT / n))
        t0 = time.time()
        outs = llm.chat([[{"role": "user", "content": p}] for p, _ in reqs],
                        SamplingParams(max_tokens=max_tokens, temperature=0),
                        adapters=[a for _, a in reqs])
        seconds = time.time() - t0
        steps = step_stats(llm, t0, names)
    finally:
        if own:
            llm.close()
    result = {label: [] for label in ["base", *names]}
    for (p, a), o in zip(reqs, outs):
        result[a or "base"].append((o.text, o.finish_reason))
    return {"outputs": result, "steps": steps, "seconds": round(seconds, 2)}


def step_stats(llm, since: float, names) -> dict | None:
    """How the requests shared steps, from the engine's step records (if it keeps them)."""
    metrics = getattr(getattr(llm, "engine", None), "metrics", None)
    if metrics is None or not hasattr(metrics, "recent"):
        return None
    recs = [r for r in metrics.recent() if r.time >= since]
    labels = set(names) | {"base"}
    per_step = [set(r.rows_per_adapter) for r in recs]
    return {
        "steps": len(recs),
        "max_distinct_adapters_in_a_step": max((len(s) for s in per_step), default=0),
        "steps_with_all_adapters_and_base": sum(labels <= s for s in per_step),
        "max_rows_in_a_step": max((r.num_rows for r in recs), default=0),
    }


def run_peft(names, prompts, max_tokens) -> dict:
    """Same requests through transformers + PEFT: one mixed batch via generate(adapter_names)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    sys.path.insert(0, str(REPO))
    from punica_core.model.default_model import default_model_dir
    d = default_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, str(recipes.ROOT / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(recipes.ROOT / n), adapter_name=n)
    pm.eval()
    reqs = _requests(names, prompts)
    ids = [list(tok.apply_chat_template([{"role": "user", "content": p}],
                                        add_generation_prompt=True, return_dict=True)["input_ids"])
           for p, _ in reqs]
    width = max(map(len, ids))
    inp = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    t0 = time.time()
    with torch.no_grad():
        out = pm.generate(input_ids=inp, attention_mask=mask, do_sample=False,
                          max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id,
                          adapter_names=[a or "__base__" for _, a in reqs])
    seconds = time.time() - t0
    result = {label: [] for label in ["base", *names]}
    for (p, a), seq in zip(reqs, out[:, width:].tolist()):
        stop = tok.eos_token_id in seq
        seq = seq[:seq.index(tok.eos_token_id)] if stop else seq
        result[a or "base"].append((tok.decode(seq, skip_special_tokens=True),
                                    "stop" if stop else "length"))
    return {"outputs": result, "steps": None, "seconds": round(seconds, 2)}


def score(outputs: dict, names, prompts, samples: int = 2) -> dict:
    """Per adapter: its metric on its own answers and on the base model's answers."""
    scores = {}
    for n in names:
        spec = recipes.SPECS[n]
        mine = [spec.metric(t, f) for t, f in outputs[n]]
        base = [spec.metric(t, f) for t, f in outputs["base"]]
        s_a, s_b = sum(mine) / len(mine), sum(base) / len(base)
        scores[n] = {
            "metric": spec.metric_name, "adapter_score": round(s_a, 4),
            "base_score": round(s_b, 4), "difference": round(s_a - s_b, 4),
            "required_margin": spec.margin, "passed": s_a - s_b >= spec.margin,
            "samples": [{"prompt": p, "adapter": outputs[n][i][0], "base": outputs["base"][i][0]}
                        for i, p in enumerate(prompts[:samples])],
        }
    return scores


def readme_table(backend: str = "engine") -> str:
    """The README's table, from adapters/results/*.json only."""
    ev = json.loads((recipes.RESULTS_DIR / f"eval_{backend}.json").read_text())
    rows = ["| adapter | behaviour | rank | targets | weights | size | training time (wall / CPU) "
            "| behaviour metric | adapter | base |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for n, s in ev["scores"].items():
        t = json.loads((recipes.RESULTS_DIR / f"train_{n}.json").read_text())
        targets = "all 7" if len(t["targets"]) == 7 else ", ".join(
            x.removesuffix("_proj") for x in t["targets"])
        rank = f"{t['r']} (rsLoRA)" if t["use_rslora"] else str(t["r"])
        cpu = f" / {t['train_cpu_seconds'] / 60:.1f} min" if "train_cpu_seconds" in t else ""
        rows.append(f"| `{n}` | {t['behaviour']} | {rank} | {targets} | {t['save_dtype']} | "
                    f"{t['size_bytes'] / 1e6:.1f} MB | {t['train_seconds'] / 60:.1f} min{cpu} | "
                    f"{s['metric']} | **{s['adapter_score']:.2f}** | {s['base_score']:.2f} |")
    return "\n".join(rows)


def update_readme(backend: str = "engine") -> None:
    path = recipes.ROOT / "README.md"
    text = path.read_text()
    a, b = "<!-- table:start -->", "<!-- table:end -->"
    i, j = text.index(a) + len(a), text.index(b)
    path.write_text(text[:i] + "\n" + readme_table(backend) + "\n" + text[j:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["engine", "peft"], default="engine")
    ap.add_argument("--names", nargs="*", default=None, help="adapters (default: all)")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts to use (max 16)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default adapters/results/eval_<backend>.json)")
    ap.add_argument("--readme", action="store_true",
                    help="only rewrite the table in adapters/README.md from results/*.json")
    args = ap.parse_args(argv)
    if args.readme:
        update_readme(args.backend)
        return 0
    import torch
    torch.set_num_threads(args.threads)
    names = args.names or list(recipes.SPECS)
    prompts = recipes.heldout_prompts()[:args.prompts]
    run = run_engine if args.backend == "engine" else run_peft
    res = run(names, prompts, args.max_tokens)
    scores = score(res["outputs"], names, prompts)
    report = {"backend": args.backend, "max_tokens": args.max_tokens, "greedy": True,
              "prompts": prompts, "requests": len(prompts) * (len(names) + 1),
              "one_generate_call": True, "generate_seconds": res["seconds"],
              "torch_threads": torch.get_num_threads(), "steps": res["steps"],
              "scores": scores, "outputs": {k: [t for t, _ in v] for k, v in res["outputs"].items()}}
    out = args.out or recipes.RESULTS_DIR / f"eval_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    for n, s in scores.items():
        print(f"{n:8s} {s['metric']:40s} adapter {s['adapter_score']:.3f}  base "
              f"{s['base_score']:.3f}  {'ok' if s['passed'] else 'FAIL'}")
    if res["steps"]:
        print("steps:", res["steps"])
    print(f"-> {out}")
    return 0 if all(s["passed"] for s in scores.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
