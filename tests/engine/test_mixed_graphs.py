"""MixedGraphs: a step that prefills beside decode rows, laid out in fixed shapes (rows and
chunks padded to buckets, one LoRA segment per chunk, attention from the paged Triton kernels
on device metadata), gives the eager step's logits. On CPU the padded layout runs eagerly
through Triton's interpreter (the capture itself needs CUDA: test_gpu_engine.py's
test_mixed_step_graphs_match_eager_steps_bf16 replays it)."""
from triton_interpreter import needs_triton, run_in_interpreter

_SCRIPT = r"""
import json, tempfile
import torch
from punica_core.adapters.peft import parse_adapter
from punica_core.adapters.random_adapter import write_random_adapter
from punica_core.adapters.slots import SlotPool
from punica_core.engine import mixed_graphs
from punica_core.engine.layout import ScheduledChunk, build_layout
from punica_core.engine.mixed_graphs import MixedGraphs
from punica_core.model.kv_cache import KVCache
from punica_core.model.loader import load_model
from punica_core.model.lora import LoraContext

torch.manual_seed(0)
model = load_model("random:tiny", "cpu", torch.float32).model
cfg = model.cfg
kv = KVCache(cfg, 64, 16, torch.float32, "cpu")
pool = SlotPool(cfg, 3, 8, torch.float32, "cpu")
tmp = tempfile.mkdtemp()
for i in range(2):
    pool.load(parse_adapter(f"a{i}", write_random_adapter(cfg, f"{tmp}/a{i}", 8, seed=i,
                                                          dtype=torch.float32), cfg, 8))

def eager(chunks):
    layout = build_layout(chunks, 16, "cpu")
    lora = LoraContext(pool, layout.lora, layout.num_rows, torch.float32, "cpu") \
        if layout.lora.any_adapter else None
    return model.forward(layout, kv, lora)

# three requests prefill their prompts (fills their KV), then one step: their decode rows
# beside a new prompt and the continuation of a chunked prompt
tables = [[0, 1], [2, 3], [4, 5], [6, 7, 8]]
first = [ScheduledChunk(list(range(3, 3 + n)), 0, t, s, True)
         for n, t, s in ((20, tables[0], 0), (5, tables[1], 1), (9, tables[2], -1))]
first.append(ScheduledChunk(list(range(40, 57)), 0, tables[3], 1, False))   # chunk 1 of 2
eager(first)
step = [ScheduledChunk([11], 20, tables[0], 0, True), ScheduledChunk([12], 5, tables[1], 1, True),
        ScheduledChunk([13], 9, tables[2], -1, True),
        ScheduledChunk(list(range(60, 75)), 17, tables[3], 1, True),        # chunk 2 of 2
        ScheduledChunk(list(range(80, 87)), 0, [9], 0, False)]              # not sampled yet
step[4].block_table = [9]
want = eager(step)
mixed_graphs.MIXED_GRAPHS = True
mg = MixedGraphs(model, kv, pool, max_batch=8, max_tokens_per_step=100, max_model_len=256)
assert not mg.fits(step)            # LoRA rows: only with the CUDA kernels (capturable)
mg.lora_ok = True                   # here the torch reference stands in for them
assert mg.fits(step) and not mg.fits(step[:3])          # decode-only steps are not its
sampled = mg.write_inputs(step)
assert sampled == [0, 1, 2, 3]
got = model.forward(mg.layout(128, 8), kv, mg.lora(128, 8))[sampled]
torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
# a second step in the same buffers (fewer chunks, stale entries behind them)
step2 = [ScheduledChunk([21], 21, tables[0], 0, True),
         ScheduledChunk(list(range(90, 93)), 7, [9], 0, True)]
want2 = eager(step2)
sampled2 = mg.write_inputs(step2)
got2 = model.forward(mg.layout(64, 2), kv, mg.lora(64, 2))[sampled2]
torch.testing.assert_close(got2, want2, atol=1e-4, rtol=1e-4)
print("RESULTS " + json.dumps([list(got.shape), list(got2.shape)]))
"""


@needs_triton
def test_padded_layout_gives_the_eager_logits_on_cpu():
    assert run_in_interpreter(_SCRIPT) == [[4, 49152], [2, 49152]]
