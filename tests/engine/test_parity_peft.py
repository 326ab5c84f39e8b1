"""The batched multi-adapter engine against Hugging Face transformers + PEFT (fp32, CPU)."""
import torch

from helpers import run_to_completion
from punica_core import SamplingParams

PROMPTS = ["The capital of France is", "Write a haiku about rain:",
           "List three prime numbers:", "Once upon a time", "def fibonacci(n):"]
NEW_TOKENS = 32


def peft_reference(hf_model, adapter_dir, prompt_ids):
    """PEFT one adapter at a time: greedy tokens and the logits that chose them."""
    from peft import PeftModel
    model = PeftModel.from_pretrained(hf_model, str(adapter_dir)) if adapter_dir else hf_model
    try:
        with torch.no_grad():
            ids = torch.tensor([prompt_ids])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            tokens = gen[0, len(prompt_ids):].tolist()
            logits = model(input_ids=gen[:, :-1]).logits[0, len(prompt_ids) - 1:]
    finally:
        if adapter_dir:
            model.unload()
    return tokens, logits


def test_mixed_adapter_batch_matches_peft(make_engine, hf_model, parity_adapters):
    engine = make_engine(max_adapters_on_gpu=4)
    for name, path in parity_adapters.items():
        engine.register_adapter(name, path)
    plan = list(zip(PROMPTS, list(parity_adapters) + [None]))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params, a) for p, a in plan]
    engine.runner.capture = captured = []
    run_to_completion(engine)

    # every request was decoded in shared steps holding all five (4 adapters + base)
    mixed = [s for s in engine.metrics.recent() if len(s.rows_per_adapter) == 5]
    assert len(mixed) >= NEW_TOKENS - 1

    by_req = {r.id: [] for r in reqs}
    for ids, logits in captured:
        for i, rid in enumerate(ids):
            by_req[rid].append(logits[i])
    for req, (prompt, adapter) in zip(reqs, plan):
        ref_tokens, ref_logits = peft_reference(
            hf_model, parity_adapters.get(adapter), req.prompt_ids)
        ours = torch.stack(by_req[req.id])
        assert ours.shape == ref_logits.shape
        err = (ours - ref_logits).abs().max().item()
        assert err < 1e-3, f"{adapter}: max |logit diff| {err}"
        assert req.output_ids == ref_tokens, f"{adapter}: greedy tokens differ"


def test_adapters_really_change_the_output(make_engine, parity_adapters):
    """Guards the parity test against adapters too weak to matter."""
    engine = make_engine()
    for name, path in parity_adapters.items():
        engine.register_adapter(name, path)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(PROMPTS[0], params, a) for a in [None, *parity_adapters]]
    run_to_completion(engine)
    base = reqs[0].output_ids
    same = [r.adapter for r in reqs[1:] if r.output_ids == base]
    assert not same, f"adapters {same} left the greedy output unchanged"

