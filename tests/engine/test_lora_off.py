"""An engine started with LoRA switched off (enable_lora=False): the base model alone."""
import pytest

from helpers import run_to_completion
from punica_core import SamplingParams
from punica_core.errors import AdapterError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_lora_off_refuses_adapters_and_matches_the_base_model(make_engine, parity_adapters):
    off = make_engine(enable_lora=False)
    assert off.pool.num_slots == 0 and off.pool.nbytes == 0
    with pytest.raises(AdapterError, match="LoRA switched off"):
        off.register_adapter("r4_qv", parity_adapters["r4_qv"])
    assert "r4_qv" not in off.store
    on = make_engine()
    on.register_adapter("r4_qv", parity_adapters["r4_qv"])
    outs = {}
    for name, e in (("off", off), ("on", on)):
        req = e.add_request("Name three rivers.", GREEDY)
        run_to_completion(e)
        outs[name] = req.output_ids
    assert outs["off"] == outs["on"] and len(outs["off"]) == 12
