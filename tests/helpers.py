"""Shared test data and checks: the adapter mix the parity test asks for, logit agreement."""
from punica_core.adapters.random_adapter import ALL_PROJECTIONS as ALL
from punica_core.adapters.random_adapter import make_peft_adapter  # noqa: F401

# rank, targets, rslora
PARITY_MIX = {
    "r4_qv": (4, ["q_proj", "v_proj"], False),
    "r8_all": (8, ALL, False),
    "r16_mlp_rs": (16, ["gate_proj", "up_proj", "down_proj"], True),
    "r64_attn": (64, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
}


def run_to_completion(engine, max_steps=10_000):
    for _ in range(max_steps):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("engine did not finish")


def assert_logits_agree(ref, test, rel_tol, tie_tol):
    """ref / test: per request (greedy tokens, per-step logits). Logits agree at every step
    while both runs have seen the same tokens; where the tokens part, the reference's top two
    logits were a near-tie (random weights make greedy sequences fragile)."""
    for (ref_ids, ref_logits), (ids, logits) in zip(ref, test):
        assert len(ids) == len(ref_ids)
        for step in range(len(ids)):
            a, b = ref_logits[step], logits[step]
            err = ((a - b).norm() / a.norm()).item()
            assert err < rel_tol, f"step {step}: relative logit error {err}"
            if ids[step] != ref_ids[step]:
                top2 = a.topk(2).values
                assert (top2[0] - top2[1]).item() < tie_tol, "tokens parted without a tie"
                break


def capture_cuda_graph(step):
    """step captured in a CUDA graph after one warm-up run (the engine's recipe)."""
    from punica_core.engine.cuda_graphs import capture_graph
    return capture_graph(step)[0]


def outputs_with_logits(reqs, captured):
    """Per request, in the order given: (output ids, its fp32 logits of every step), from the
    (request ids, logits) pairs that engine.runner.capture collected."""
    logits = {r.id: [] for r in reqs}
    for ids, step_logits in captured:
        for i, rid in enumerate(ids):
            logits[rid].append(step_logits[i].float())
    return [(r.output_ids, logits[r.id]) for r in reqs]
