#!/usr/bin/env python
"""Train the sample LoRA adapters for the default model (SmolLM2-135M-Instruct) on CPU.

    python adapters/train.py NAME [NAME ...]     # e.g. pirate caps; retrains from the cached data
    python adapters/train.py all                 # every adapter in recipes.SPECS
    python adapters/train.py --data              # (re)make adapters/data/base_answers.json

Training data is made here, by rule, from the base model's own greedy answers to the fixed
training prompts in recipes.py (cached in adapters/data/base_answers.json, made on first use):
upper-cased, wrapped as JSON, cut to one sentence, pirate word substitutions, emoji, or (for
French) templated answers about the prompt's topic. The loss covers only the assistant's tokens
(and its <|im_end|>). Seeds, data order and thread count are fixed, so a rerun gives the same
adapter (bit-exact on the same machine and torch build; same behaviour elsewhere).

Each adapter is written as a standard PEFT folder (adapter_config.json +
adapter_model.safetensors) to adapters/NAME/, and its training record (wall-clock time, torch
threads, losses, size) to adapters/results/train_NAME.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

# On a shared machine, OpenMP threads that spin while waiting burn the other thread's core:
# a training step took 5-10x longer with the default (active) policy. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipes  # noqa: E402

MAX_LEN = 128
SEED = 0


def load_base(threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    sys.path.insert(0, str(recipes.ROOT.parent))
    from punica_core.model.default_model import default_model_dir
    torch.set_num_threads(threads)
    d = default_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    return tok, model


def chat_ids(tok, prompt: str) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, return_dict=True)
    return list(enc["input_ids"])


# --------------------------------------------------------------------------------------------
def make_base_answers(threads: int, max_new_tokens: int = 64, batch: int = 20) -> dict:
    """The base model's greedy answers to the training prompts (transformers, left padding)."""
    import torch
    tok, model = load_base(threads)
    rows = recipes.train_prompts()
    answers = {}
    t0 = time.perf_counter()
    tok.padding_side = "left"
    for i in range(0, len(rows), batch):
        chunk = [r["prompt"] for r in rows[i:i + batch]]
        ids = [chat_ids(tok, p) for p in chunk]
        width = max(map(len, ids))
        inp = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        for p, seq in zip(chunk, out[:, width:].tolist()):
            answers[p] = tok.decode(seq, skip_special_tokens=True).strip()
        print(f"base answers {len(answers)}/{len(rows)} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    data = {"model": recipes.BASE_MODEL_ID, "how": "transformers greedy, chat template, "
            f"max_new_tokens={max_new_tokens}", "answers": answers}
    recipes.DATA_DIR.mkdir(parents=True, exist_ok=True)
    recipes.BASE_ANSWERS.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return data


def base_answers(threads: int) -> dict:
    if recipes.BASE_ANSWERS.exists():
        data = json.loads(recipes.BASE_ANSWERS.read_text())
        if all(r["prompt"] in data["answers"] for r in recipes.train_prompts()):
            return data["answers"]
    return make_base_answers(threads)["answers"]


def examples(spec, answers: dict) -> list[dict]:
    return [{"prompt": r["prompt"], "target": spec.transform(r, answers[r["prompt"]])}
            for r in recipes.train_prompts()]


# --------------------------------------------------------------------------------------------
def encode(tok, ex: dict) -> tuple[list[int], int]:
    """Token ids of prompt + answer + <|im_end|>, and where the answer starts."""
    p = chat_ids(tok, ex["prompt"])
    a = tok(ex["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + a)[:MAX_LEN]
    return ids, len(p)


def batch_loss(core, head, batch, pad_id: int):
    """Mean cross-entropy over the answer tokens (and <|im_end|>) of a batch of (ids, start).
    Logits only at the answer positions: the vocabulary head is a fifth of the model."""
    import torch
    width = max(len(ids) for ids, _ in batch)
    inp = torch.full((len(batch), width), pad_id)                  # right padding
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    tgt = torch.zeros((len(batch), width), dtype=torch.bool)   # this position predicts a label
    for j, (ids, start) in enumerate(batch):
        inp[j, :len(ids)] = torch.tensor(ids)
        mask[j, :len(ids)] = 1
        tgt[j, start - 1:len(ids) - 1] = True
    h = core(input_ids=inp, attention_mask=mask).last_hidden_state    # [B, T, hidden]
    sel = tgt[:, :-1]
    labels = inp[:, 1:][sel]                                          # [n]
    logits = head(h[:, :-1][sel])                                     # [n, vocab]
    return torch.nn.functional.cross_entropy(logits, labels)


def train(name: str, threads: int, out_root: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    spec = recipes.SPECS[name]
    answers = base_answers(threads)
    tok, model = load_base(threads)
    data = [encode(tok, ex) for ex in examples(spec, answers)]

    torch.manual_seed(SEED)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                     lora_dropout=0.0, bias="none", use_rslora=spec.use_rslora,
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data) / spec.batch_size)
    total = steps_per_epoch * spec.epochs
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    core, head = pm.base_model.model.model, pm.base_model.model.lm_head
    gen = torch.Generator().manual_seed(SEED)

    pm.train()
    losses, step = [], 0
    t0, c0 = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()[0]
    for epoch in range(spec.epochs):
        order = torch.randperm(len(data), generator=gen).tolist()
        for b in range(0, len(order), spec.batch_size):
            batch = [data[i] for i in order[b:b + spec.batch_size]]
            loss = batch_loss(core, head, batch, tok.eos_token_id)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            step += 1
            if step % 10 == 0 or step == total:
                print(f"[{name}] step {step}/{total} loss {loss.item():.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    out = out_root / name
    tmp = out_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pm.save_pretrained(tmp)
    (tmp / "README.md").unlink(missing_ok=True)          # peft's empty model card
    conf = json.loads((tmp / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = recipes.BASE_MODEL_ID
    (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    wpath = tmp / "adapter_model.safetensors"
    dtype = getattr(torch, spec.save_dtype)
    state = {k: v.to(dtype).contiguous() for k, v in load_file(wpath).items()}
    save_file(dict(sorted(state.items())), wpath, metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)

    record = {
        "name": name, "behaviour": spec.behaviour, "r": spec.r, "lora_alpha": spec.alpha,
        "targets": list(spec.targets), "use_rslora": spec.use_rslora,
        "save_dtype": spec.save_dtype, "lr": spec.lr, "epochs": spec.epochs,
        "batch_size": spec.batch_size, "examples": len(data), "steps": total,
        "train_tokens": sum(len(ids) for ids, _ in data),
        "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_1min_start": round(load0, 2), "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "first_loss": losses[0], "final_loss": losses[-1],
        "mean_loss_last_epoch": round(sum(losses[-steps_per_epoch:]) / steps_per_epoch, 4),
        "losses": losses, "trainable_params": sum(p.numel() for p in params),
        "size_bytes": (out / "adapter_model.safetensors").stat().st_size,
        "machine": {"cpu": _cpu_name(), "os_cpus": os.cpu_count(),
                    "affinity_cpus": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
    recipes.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    if out_root.resolve() == recipes.ROOT:
        (recipes.RESULTS_DIR / f"train_{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[{name}] done in {seconds:.0f} s, {record['size_bytes'] / 1e6:.2f} MB -> {out}",
          flush=True)
    return record


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="adapters: " + ", ".join(
            f"{s.name} ({s.behaviour}; r={s.r} on {'+'.join(s.targets)}"
            f"{', rsLoRA' if s.use_rslora else ''})" for s in recipes.SPECS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="adapter names, or 'all'")
    ap.add_argument("--data", action="store_true",
                    help="regenerate adapters/data/base_answers.json from the base model")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", type=Path, default=recipes.ROOT,
                    help="folder for the adapter folders (default adapters/; results JSON are "
                         "written only there)")
    args = ap.parse_args(argv)
    names = list(recipes.SPECS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in recipes.SPECS]
    if unknown:
        ap.error(f"unknown adapter(s) {unknown}; choose from {list(recipes.SPECS)} or 'all'")
    if args.data:
        make_base_answers(args.threads)
    if not names and not args.data:
        ap.print_help()
        return 2
    for n in names:
        train(n, args.threads, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
