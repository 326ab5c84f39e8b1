"""Engine throughput on CPU against Hugging Face transformers + PEFT, measured in one run.

Default model (SmolLM2-135M-Instruct, fp32), 8 concurrent requests, 64-token prompts, 64 new
tokens, greedy. Cases: no adapter, one adapter for all 8, 8 distinct adapters. Two adapter
shapes: PEFT's default for Llama (rank 8 on q_proj and v_proj) and a heavy one (rank 16 on all
seven projections). Three systems run each case `--repeats` times, interleaved, so that load
on the machine falls on all alike; the median is reported:

    ours              this engine (its CPU fp32 linear: punica_core/model/linear.py)
    peft              transformers + PEFT as shipped (nn.Linear -> F.linear, MKL)
    peft_same_linear  the same transformers + PEFT model, with every torch.nn.Linear forward
                      (base layers, LM head and the LoRA A/B modules alike) routed through
                      punica_core.model.linear.linear for the duration of its generate calls:
                      the margin over PEFT that is not the linear kernel
    peft_same_base_linear  the same, but only the base layers and the LM head routed (where
                      our engine uses that kernel); the LoRA A/B modules keep F.linear, since
                      oneDNN costs ~10 us a call against F.linear's ~2 us for rank-8/16 shapes
                      (2-core EPYC), which penalises PEFT's many small LoRA calls

Every system gets one short untimed generate before the timed repeats.

    python benchmarks/engine_cpu.py --out benchmarks/results/engine_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.common  # noqa: E402,F401  (takes benchmarks/ off sys.path: see there)

from punica_core import Engine, EngineConfig, SamplingParams  # noqa: E402
from punica_core.adapters.random_adapter import ALL_PROJECTIONS, make_peft_adapter  # noqa: E402
from punica_core.model.default_model import default_model_dir  # noqa: E402
from punica_core.model.linear import formulation, linear  # noqa: E402

NN_LINEAR_FORWARD = torch.nn.Linear.forward

TEXT = ("The history of computing is a story of people who wanted to calculate faster, "
        "remember more and share what they knew. From the abacus to mechanical calculators, "
        "from punched cards to transistors, each step made machines smaller and cheaper. ")


def prompts(tokenizer, n, length):
    ids = tokenizer(TEXT * 8)["input_ids"]
    return [ids[i * 3:i * 3 + length] for i in range(n)]


def run_ours(engine, batch, adapters, new_tokens):
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, params, a) for p, a in zip(batch, adapters)]
    while engine.has_work():
        engine.step()
    dt = time.perf_counter() - t0
    assert all(len(r.output_ids) == new_tokens for r in reqs)
    return sum(len(r.output_ids) for r in reqs) / dt, [r.output_ids for r in reqs]


def run_peft(model, batch, adapters, new_tokens):
    ids = torch.tensor(batch)
    kw = {}
    if any(a is not None for a in adapters):
        kw["adapter_names"] = [a if a is not None else "__base__" for a in adapters]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, **kw)
    dt = time.perf_counter() - t0
    gen = out[:, ids.shape[1]:]
    return gen.numel() / dt, gen.tolist()


def lora_linear_ids(peft) -> frozenset:
    """id() of every lora_A / lora_B nn.Linear in a PEFT model."""
    from peft.tuners.lora.layer import LoraLayer
    return frozenset(id(m) for layer in peft.modules() if isinstance(layer, LoraLayer)
                     for d in (layer.lora_A, layer.lora_B) for m in d.values())


@contextmanager
def same_linear(counts: dict, skip: frozenset = frozenset()):
    """Routes every torch.nn.Linear forward through our CPU linear (flattened to 2-D rows, as
    our engine calls it) while active; restores nn.Linear.forward afterwards. PEFT's LoRA
    layers (peft.tuners.lora.layer.Linear) are not nn.Linear subclasses: they call their
    base_layer and lora_A/lora_B modules, which are, so those go through the patch too.
    `counts[formulation]` counts the patched calls; modules whose id() is in `skip` keep the
    original forward (counted under 'not_routed')."""
    original = torch.nn.Linear.forward

    def forward(self, x):
        if id(self) in skip:
            counts["not_routed"] = counts.get("not_routed", 0) + 1
            return original(self, x)
        x2 = x.reshape(-1, x.shape[-1])
        how = formulation(x2, self.weight)
        counts[how] = counts.get(how, 0) + 1
        return linear(x2, self.weight, self.bias, how=how).view(*x.shape[:-1], -1)

    torch.nn.Linear.forward = forward
    try:
        yield counts
    finally:
        torch.nn.Linear.forward = original


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/engine_cpu.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--shapes", default="qv-r8,all-r16",
                    help="adapter shapes to run: qv-r8 (PEFT's default), all-r16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    folder = default_model_dir()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    shapes = {"qv-r8": (8, ["q_proj", "v_proj"]), "all-r16": (16, ALL_PROJECTIONS)}
    out = {"benchmark": "engine_cpu", "model": "SmolLM2-135M-Instruct", "dtype": "float32",
           "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "repeats": args.repeats, "torch_threads": args.threads,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "torch": torch.__version__,
                       "load_average_1_5_15_min_at_start": list(os.getloadavg())},
           "shapes": {}}
    for shape in args.shapes.split(","):
        rank, targets = shapes[shape]
        print(f"== adapters: rank {rank} on {','.join(targets)}", flush=True)
        out["shapes"][shape] = run_shape(args, hf, rank, targets)
    out["machine"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v["ratios"] for k, v in out["shapes"].items()}, indent=2))


def run_shape(args, hf, rank, targets):
    from peft import PeftModel
    tmp = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    names = [f"a{i}" for i in range(args.batch)]
    paths = {n: make_peft_adapter(hf, tmp / n, rank, targets, seed=i)
             for i, n in enumerate(names)}
    peft = PeftModel.from_pretrained(hf, str(paths[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(paths[n]), adapter_name=n)
    peft.eval()

    engine = Engine(EngineConfig(max_batch=args.batch, max_adapters_on_gpu=args.batch,
                                 max_lora_rank=rank, kv_cache_gb=0.25))
    for n in names:
        engine.register_adapter(n, paths[n])
    batch = prompts(engine.tokenizer, args.batch, args.prompt_len)
    cases = {"no_adapter": [None] * args.batch, "one_adapter": [names[0]] * args.batch,
             "distinct_adapters": names}

    lora_ids = lora_linear_ids(peft)
    assert lora_ids, "no LoRA A/B modules found"

    def peft_systems(adapters, counts, counts_base):
        """(tokens/s, tokens) of peft, peft_same_linear, peft_same_base_linear."""
        r = [run_peft(peft, batch, adapters, new)]
        with same_linear(counts):
            r.append(run_peft(peft, batch, adapters, new))
        with same_linear(counts_base, skip=lora_ids):
            r.append(run_peft(peft, batch, adapters, new))
        return r

    run_ours(engine, batch, cases["distinct_adapters"], 4)     # warm-up
    new = 4                                                    # warm-up, untimed
    peft.set_adapter(names[0])
    peft_systems(cases["distinct_adapters"], {}, {})
    with peft.disable_adapter():
        peft_systems(cases["no_adapter"], {}, {})
    new = args.new_tokens
    systems = ["ours", "peft", "peft_same_linear", "peft_same_base_linear"]
    results = {c: {k: [] for k in systems} for c in cases}
    agree, agree_same, agree_base, patched, patched_base = {}, {}, {}, {}, {}
    for rep in range(args.repeats):
        for case, adapters in cases.items():
            tps, ours_tokens = run_ours(engine, batch, adapters, args.new_tokens)
            results[case]["ours"].append(tps)
            counts, counts_base = {}, {}
            if case == "no_adapter":
                with peft.disable_adapter():
                    runs = peft_systems(adapters, counts, counts_base)
            else:
                peft.set_adapter(names[0])
                runs = peft_systems(adapters, counts, counts_base)
            (tps_p, peft_tokens), (tps_s, same_tokens), (tps_b, base_tokens) = runs
            assert counts.get("not_routed", 0) == 0 and sum(counts.values()) > 0, counts
            assert sum(v for k, v in counts_base.items() if k != "not_routed") > 0, counts_base
            assert torch.nn.Linear.forward is NN_LINEAR_FORWARD, "nn.Linear not restored"
            results[case]["peft"].append(tps_p)
            results[case]["peft_same_linear"].append(tps_s)
            results[case]["peft_same_base_linear"].append(tps_b)
            if rep == 0:    # same greedy tokens? (no padding, so they should match)
                agree[case] = sum(a == b for a, b in zip(ours_tokens, peft_tokens))
                agree_same[case] = sum(a == b for a, b in zip(ours_tokens, same_tokens))
                agree_base[case] = sum(a == b for a, b in zip(ours_tokens, base_tokens))
                patched[case] = dict(sorted(counts.items()))
                patched_base[case] = dict(sorted(counts_base.items()))
            print(f"rep {rep} {case:18s} ours {tps:6.1f}  peft {tps_p:6.1f}  "
                  f"peft_same_linear {tps_s:6.1f}  peft_same_base_linear {tps_b:6.1f} tok/s",
                  flush=True)
    engine.close()
    peft.unload()
    med = {c: {k: statistics.median(v) for k, v in r.items()} for c, r in results.items()}
    ratios = {
        "distinct_vs_peft_distinct": med["distinct_adapters"]["ours"]
        / med["distinct_adapters"]["peft"],
        "distinct_vs_our_one_adapter": med["distinct_adapters"]["ours"]
        / med["one_adapter"]["ours"],
        "peft_distinct_vs_peft_one_adapter": med["distinct_adapters"]["peft"]
        / med["one_adapter"]["peft"],
        "one_adapter_vs_our_no_adapter": med["one_adapter"]["ours"] / med["no_adapter"]["ours"],
        "our_no_adapter_vs_hf_no_adapter": med["no_adapter"]["ours"] / med["no_adapter"]["peft"],
        "distinct_vs_peft_same_linear_distinct": med["distinct_adapters"]["ours"]
        / med["distinct_adapters"]["peft_same_linear"],
        "peft_same_linear_no_adapter_vs_ours_no_adapter": med["no_adapter"]["peft_same_linear"]
        / med["no_adapter"]["ours"],
        "distinct_vs_peft_same_base_linear_distinct": med["distinct_adapters"]["ours"]
        / med["distinct_adapters"]["peft_same_base_linear"],
        "peft_same_base_linear_no_adapter_vs_ours_no_adapter":
        med["no_adapter"]["peft_same_base_linear"] / med["no_adapter"]["ours"],
    }
    return {"adapter_rank": rank, "adapter_targets": targets,
            "tokens_per_s_median": med, "tokens_per_s_all": results, "ratios": ratios,
            "greedy_sequences_equal_to_peft": agree,
            "greedy_sequences_peft_same_linear_equal_to_ours": agree_same,
            "greedy_sequences_peft_same_base_linear_equal_to_ours": agree_base,
            "peft_same_linear_patched_calls_first_repeat": patched,
            "peft_same_base_linear_patched_calls_first_repeat": patched_base}


if __name__ == "__main__":
    main()
