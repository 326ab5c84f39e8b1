"""Shared test data: the adapter mix the parity test asks for."""
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
