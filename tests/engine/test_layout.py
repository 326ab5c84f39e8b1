"""build_layout: the tables it makes for the paged kernels hold what the chunks say."""
import torch

from punica_core.engine.layout import ScheduledChunk, build_layout


def test_prefill_tables_for_the_paged_prefill_kernel():
    bs = 4
    chunks = [ScheduledChunk([7], 9, [3, 5, 8], -1, True),            # a decode row
              ScheduledChunk([1] * 6, 0, [2, 9], 0, False),           # a prompt's first chunk
              ScheduledChunk([1] * 3, 10, [4, 6, 1, 0], 0, True)]     # a continuation
    layout = build_layout(chunks, bs, "cpu", paged_prefill=True)
    pt = layout.prefill_tables
    assert pt.starts.tolist() == [1, 7] and pt.lens.tolist() == [6, 3]
    assert pt.first_pos.tolist() == [0, 10] and pt.max_rows == 6
    # as many blocks as the longest context needs (13 positions: 4 blocks), padded with 0
    assert pt.block_tables.tolist() == [[2, 9, 0, 0], [4, 6, 1, 0]]
    assert pt.block_tables.dtype == torch.int32 and pt.starts.dtype == torch.int32
    assert layout.decode_rows.tolist() == [0]
    assert build_layout(chunks, bs, "cpu").prefill_tables is None       # only when asked
    assert build_layout(chunks[:1], bs, "cpu", paged_prefill=True).prefill_tables is None


def test_decode_rows_of_one_adapter_as_one_row_segments_for_the_kernels():
    """Merged, an adapter's decode rows make one long segment (the torch reference's best);
    for the CUDA kernels each row with an adapter is its own segment (rows without one still
    merge, and so do a prompt's chunks)."""
    chunks = [ScheduledChunk([5], 3, [1], 2, True),
              ScheduledChunk([6], 4, [2, 3], 2, True),
              ScheduledChunk([7], 5, [4, 5], 2, True),
              ScheduledChunk([1] * 4, 0, [6], 2, False),
              ScheduledChunk([1] * 2, 4, [6, 7], 2, True),
              ScheduledChunk([8], 6, [8, 9], -1, True),
              ScheduledChunk([9], 7, [10, 11], -1, True)]
    merged = build_layout(chunks, 4, "cpu").lora
    assert merged.indptr == [0, 9, 11] and merged.slot_ids == [2, -1]
    split = build_layout(chunks, 4, "cpu", one_row_decode_segments=True).lora
    assert split.indptr == [0, 1, 2, 3, 9, 11] and split.slot_ids == [2, 2, 2, 2, -1]
    assert split.indptr_t.tolist() == split.indptr and split.slot_ids_t.tolist() == [2, 2, 2, 2, -1]
