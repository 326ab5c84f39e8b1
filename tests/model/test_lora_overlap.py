"""lora_overlap's delta path (start -> delta buffer -> finish hands it to the consumer op,
which adds it) against the plain in-place order, on the CPU (no side stream: the same math,
run in sequence)."""
import pytest
import torch

from helpers import run_to_completion
from punica_core import SamplingParams


def _run(make_engine, parity_adapters, overlap):
    e = make_engine(lora_overlap=overlap)
    for name, path in parity_adapters.items():
        e.register_adapter(name, path)
    e.runner.capture = captured = []
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    reqs = [e.add_request("Once upon a time", params, a) for a in [*parity_adapters, None]]
    run_to_completion(e)
    return [r.output_ids for r in reqs], [lg for _, lg in captured]


def test_overlap_delta_path_matches_in_place(make_engine, parity_adapters):
    ids, logits = _run(make_engine, parity_adapters, overlap=False)
    ids_o, logits_o = _run(make_engine, parity_adapters, overlap=True)
    assert ids_o == ids
    for a, b in zip(logits, logits_o):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_overlap_context_computes_the_delta_into_its_own_buffer(make_engine, parity_adapters):
    from punica_core.engine.layout import LoraSegments
    from punica_core.model.lora import LoraContext
    e = make_engine(lora_overlap=True)
    e.register_adapter("a", parity_adapters["r8_all"])
    slot = e.pool.load(e.store.get_cached("a"))
    rows = 3        # rows 0-1 use the adapter, row 2 none
    seg = LoraSegments(indptr=[0, 2, 3], slot_ids=[slot, -1],
                       indptr_t=torch.tensor([0, 2, 3], dtype=torch.int32),
                       slot_ids_t=torch.tensor([slot, -1], dtype=torch.int32))
    ctx = LoraContext(e.pool, seg, rows, e.model.dtype, e.model.device, overlap=True)
    hidden = e.model.cfg.hidden_size
    x = torch.randn(rows, hidden)
    site = ("o_proj",)
    out = torch.randn(rows, hidden)
    want = out.clone()
    ctx.apply(want, x, 0, site)
    delta = ctx.start(x, 0, site, hidden)
    assert delta is not None and delta.data_ptr() != out.data_ptr()
    assert torch.equal(delta[2], torch.zeros(hidden))      # the row without an adapter
    got = out.clone()
    assert ctx.finish(got, x, 0, site, delta) is delta and torch.equal(got, out)  # not added
    got += delta
    assert torch.allclose(got, want, atol=1e-6) and not torch.equal(got[:2], out[:2])
    again = ctx.start(x, 1, site, hidden)                    # the buffer is reused, re-zeroed
    assert again.data_ptr() == delta.data_ptr() and torch.equal(again[2], torch.zeros(hidden))
    plain = LoraContext(e.pool, seg, rows, e.model.dtype, e.model.device)
    assert plain.start(x, 0, site, hidden) is None           # no overlap: applied in finish
    got = out.clone()
    assert plain.finish(got, x, 0, site, None) is None and torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("adapter", ["r8_all", "r4_qv"])   # q/k/v all active, or k not
def test_delta_store_overwrites_whatever_the_buffer_held(make_engine, parity_adapters, adapter):
    """accumulate=False (the delta buffer's mode): the site's windows end up equal to the
    delta alone, rows without an adapter and projections no adapter targets zero, even when the
    buffer held garbage."""
    from punica_core.engine.layout import LoraSegments
    from punica_core.model.lora import LoraContext
    e = make_engine()
    e.register_adapter("a", parity_adapters[adapter])
    slot = e.pool.load(e.store.get_cached("a"))
    seg = LoraSegments(indptr=[0, 1, 3], slot_ids=[-1, slot],
                       indptr_t=torch.tensor([0, 1, 3], dtype=torch.int32),
                       slot_ids_t=torch.tensor([-1, slot], dtype=torch.int32))
    ctx = LoraContext(e.pool, seg, 3, e.model.dtype, e.model.device)
    cfg = e.model.cfg
    x = torch.randn(3, cfg.hidden_size)
    kv = cfg.num_kv_heads * cfg.head_dim
    width = cfg.q_size + 2 * kv
    want = torch.zeros(3, width)
    ctx.apply(want, x, 0, ("q_proj", "k_proj", "v_proj"))
    got = torch.full((3, width), float("nan"))
    ctx.apply(got, x, 0, ("q_proj", "k_proj", "v_proj"), accumulate=False)
    assert torch.equal(got, want) and torch.equal(got[0], torch.zeros(width))
    assert want[1:].abs().sum() > 0
    k_window = got[:, cfg.q_size:cfg.q_size + kv]
    assert (k_window.abs().sum() > 0) == (adapter == "r8_all")


def test_overlap_defaults_to_cuda_only(make_engine):
    """None (the default) resolves to on for CUDA, off on the CPU; an explicit value wins."""
    assert make_engine().runner.lora_overlap is False
    assert make_engine(lora_overlap=True).runner.lora_overlap is True


def test_overlap_launch_keeps_to_its_cta_budget():
    """Beside a base GEMM the fused launch takes 1-8 CTAs per item and, where one CTA per
    item allows it, at most OVERLAP_LAUNCH_CTAS in all (Llama-2-7B at 32 rows: q/k/v 96 items
    -> 1, o and down 32 -> 2)."""
    from punica_core.model.lora import OVERLAP_LAUNCH_CTAS, overlap_cluster
    assert overlap_cluster(96) == 1 and overlap_cluster(32) == 2 and overlap_cluster(1) == 8
    for items in range(1, 300):
        c = overlap_cluster(items)
        assert c in (1, 2, 4, 8)
        assert items * c <= OVERLAP_LAUNCH_CTAS or c == 1
        assert c == 8 or items * c * 2 > OVERLAP_LAUNCH_CTAS      # the largest that fits


def test_leaving_sms_free_restores_the_blas_settings():
    """The carve-out applies inside the block only (on a CUDA build: cuBLASLt, SMs - 32); on a
    build without cuBLASLt the block runs unchanged."""
    from punica_core.model.lora import leave_sms_free
    backend = torch.backends.cuda.preferred_blas_library()
    carve = torch._C._get_sm_carveout_experimental()
    with leave_sms_free(32):
        if torch.cuda.is_available():
            assert torch._C._get_sm_carveout_experimental() == 32
            assert torch.backends.cuda.preferred_blas_library() == \
                torch._C._BlasBackend.Cublaslt
        x = torch.ones(2, 2) @ torch.ones(2, 2)
    assert torch.equal(x, torch.full((2, 2), 2.0))
    assert torch.backends.cuda.preferred_blas_library() == backend
    assert torch._C._get_sm_carveout_experimental() == carve
    with pytest.raises(ValueError):         # restored on the way out of an error too
        with leave_sms_free(16):
            raise ValueError("boom")
    assert torch._C._get_sm_carveout_experimental() == carve


def test_streamed_kernel_ctas_per_site(monkeypatch):
    """Beside a GEMM each site's LoRA runs the streamed kernel on its share of the GPU's SMs
    (48 of an H200's 132 for q/k/v); the fused kernel (0) off CUDA, for a site without a share,
    or when OVERLAP_KERNEL says so."""
    from punica_core.model import lora
    qkv, o = ("q_proj", "k_proj", "v_proj"), ("o_proj",)
    assert lora.overlap_stream_ctas(qkv, "cpu") == 0
    monkeypatch.setattr(lora, "sm_count", lambda device_index: 132)
    assert lora.overlap_stream_ctas(qkv, "cuda") == round(lora.OVERLAP_STREAM_SMS["q_proj"] * 132)
    assert lora.overlap_stream_ctas(o, "cuda") == round(lora.OVERLAP_STREAM_SMS["o_proj"] * 132)
    assert lora.overlap_stream_ctas(("lm_head",), "cuda") == 0
    monkeypatch.setattr(lora, "sm_count", lambda device_index: 2)
    assert lora.overlap_stream_ctas(o, "cuda") >= 1          # never 0 CTAs on a small GPU
    monkeypatch.setattr(lora, "OVERLAP_KERNEL", "fused")
    assert lora.overlap_stream_ctas(qkv, "cuda") == 0


def test_a_step_with_a_long_segment_takes_the_pair_path_without_overlap():
    """A prefill chunk beside decode rows (a segment over LONG_SEGMENT_ROWS rows): the decode
    kernels would walk its rows a few at a time, so the op is asked for the tensor-core pair
    and the side-stream overlap is off; decode-shaped steps keep both."""
    from punica_core.engine.layout import LoraSegments
    from punica_core.model import lora as lora_model

    class Pool:
        max_rank, projections = 8, ()
        weights, col_offsets = {}, {}

    def ctx(indptr):
        seg = LoraSegments(indptr, [0] * (len(indptr) - 1), torch.tensor(indptr),
                           torch.zeros(len(indptr) - 1, dtype=torch.int32))
        return lora_model.LoraContext(Pool(), seg, indptr[-1], torch.float32, "cpu",
                                      overlap=True)
    long = ctx([0, 1, 2, 2 + lora_model.LONG_SEGMENT_ROWS + 1])
    assert long.path == lora_model.PAIR_PATH and long.overlap is False
    short = ctx([0, 1, 2, 2 + lora_model.LONG_SEGMENT_ROWS])
    assert short.path == 0 and short.overlap is True


def test_an_eager_step_bounds_the_kernels_ranks_by_its_adapters(monkeypatch):
    """The op is told the largest rank of the step's adapters on the site's projections (the
    fused kernel shapes its launch for it: rank-16 adapters in a rank-64 pool stage 16 rank
    rows, with no parts past them); a graph's context gives the pool's max rank."""
    from types import SimpleNamespace

    from punica_core.engine.layout import LoraSegments
    from punica_core.model import lora as lora_model

    ranks = {"q_proj": [8, 16, 64], "v_proj": [4, 32, 0]}

    class Pool:
        max_rank, projections = 64, tuple(ranks)
        weights = {p: SimpleNamespace(a=None, b=None, ranks=None, ranks_list=r)
                   for p, r in ranks.items()}
        col_offsets = {"q_proj": 0, "v_proj": 64}

        def rank_of(self, p, slot):
            return ranks[p][slot]

    calls = []
    monkeypatch.setattr(lora_model.ops, "add_lora", lambda *a: calls.append(a))

    def bound(slots, projs):
        seg = LoraSegments(list(range(len(slots) + 1)), slots, None, None)
        ctx = lora_model.LoraContext(Pool(), seg, len(slots), torch.float32, "cpu")
        ctx.apply(torch.zeros(len(slots), 128), torch.zeros(len(slots), 8), 0, projs)
        return calls.pop()[-1]

    assert bound([0, 1], ("q_proj", "v_proj")) == 32      # v's 32 beats q's 16
    assert bound([0, 1], ("q_proj",)) == 16
    assert bound([2, -1], ("q_proj", "v_proj")) == 64     # v is rank 0 there: q's 64
    graph = lora_model.LoraContext.for_graph(Pool(), None, None, torch.zeros(2, 64))
    graph.apply(torch.zeros(2, 128), torch.zeros(2, 8), 0, ("v_proj",))
    assert calls.pop()[-1] == 64
