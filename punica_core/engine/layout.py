"""BatchLayout: everything one engine step needs, built once per step (never per layer)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    """Rows [row_start, row_end) of one request; attends to kv_index (its whole context)."""
    row_start: int
    row_end: int
    kv_index: torch.Tensor          # [ctx] flat KV indices, ctx = first_pos + rows
    first_pos: int                  # position of the first row


@dataclass
class PrefillTables:
    """The prefill chunks of a step for the paged Triton prefill kernel (int32, on CUDA):
    chunk c's rows start at starts[c], lens[c] of them, at positions first_pos[c] + j, read
    through block_tables[c]; max_rows (host) bounds lens."""
    starts: torch.Tensor
    lens: torch.Tensor
    first_pos: torch.Tensor
    block_tables: torch.Tensor      # [C, blocks], padded with block 0
    max_rows: int


@dataclass
class LoraSegments:
    """Rows grouped by adapter slot: rows indptr[i]:indptr[i+1] use slot_ids[i] (-1: none)."""
    indptr: list[int]
    slot_ids: list[int]
    indptr_t: torch.Tensor          # int32 on the model's device
    slot_ids_t: torch.Tensor

    @property
    def any_adapter(self) -> bool:
        return any(s >= 0 for s in self.slot_ids)


@dataclass
class BatchLayout:
    input_ids: torch.Tensor         # [T] token ids
    positions: torch.Tensor         # [T]
    slot_mapping: torch.Tensor      # [T] flat KV index where each row's K/V is written
    decode_rows: torch.Tensor       # [Bd] rows of requests with exactly one new token
    decode_kv_index: torch.Tensor   # [Bd, C] flat KV indices of their contexts (padded)
    decode_kv_mask: torch.Tensor    # [Bd, C] True where a key is real
    prefills: list[PrefillChunk]
    logit_rows: torch.Tensor        # [B] rows whose next token is sampled
    lora: LoraSegments | None = None
    # decode-only steps on CUDA (the graph runner): paged attention reads the block tables
    block_tables: torch.Tensor | None = None    # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None    # [B] int32 (0 for padding rows)
    # the decode rows of any step, for the paged kernel on CUDA (steps that also prefill)
    decode_block_tables: torch.Tensor | None = None     # [Bd, blocks] int32
    decode_context_lens: torch.Tensor | None = None     # [Bd] int32
    # the prefill chunks, for the paged prefill kernel (built when asked: paged_prefill)
    prefill_tables: PrefillTables | None = None
    stats: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class ScheduledChunk:
    """One request's share of a step, as the scheduler hands it to the layout builder."""
    token_ids: list[int]            # the tokens to run this step
    first_pos: int                  # their first position
    block_table: list[int]
    slot: int                       # adapter slot, -1 for none
    sample: bool                    # does this chunk end at the request's newest token?


def build_layout(chunks: list[ScheduledChunk], block_size: int, device,
                 paged_prefill: bool = False,
                 one_row_decode_segments: bool = False) -> BatchLayout:
    """Rows are laid out in the order given; the scheduler sorts chunks by slot so that each
    adapter's rows are contiguous and form one SGMV segment. paged_prefill: also the prefill
    chunks' tables for the paged prefill kernel (model/attention_prefill_triton.py).
    one_row_decode_segments: a decode row with an adapter is a segment of its own even beside
    rows of the same adapter, as in the decode graphs. For the CUDA kernels: segments of more
    than 8 rows take the tensor-core pair, which runs one row tile split over K (32 rows of one
    adapter took 16 us a 7B q/k/v/o projection against 4.7 us for 32 one-row segments of 32
    adapters, benchmarks/results/kernels_h200.json). The torch reference prefers them merged."""
    ids, pos, slots_map = [], [], []
    decode_rows, decode_ctx, decode_tables = [], [], []
    prefills: list[tuple[int, int, list[int], int]] = []
    logit_rows, indptr, seg_slots = [], [0], []
    row = prev_n = 0
    for c in chunks:
        n = len(c.token_ids)
        ids.extend(c.token_ids)
        for p in range(c.first_pos, c.first_pos + n):
            pos.append(p)
            slots_map.append(c.block_table[p // block_size] * block_size + p % block_size)
        ctx = c.first_pos + n
        if n == 1:
            decode_rows.append(row)
            decode_ctx.append(ctx)
            decode_tables.append(c.block_table)
        else:
            prefills.append((row, row + n, c.block_table, c.first_pos))
        if c.sample:
            logit_rows.append(row + n - 1)
        if seg_slots and seg_slots[-1] == c.slot and not (
                one_row_decode_segments and c.slot >= 0 and (n == 1 or prev_n == 1)):
            indptr[-1] = row + n
        else:
            seg_slots.append(c.slot)
            indptr.append(row + n)
        row += n
        prev_n = n

    def flat_index(table: list[int], ctx: int) -> torch.Tensor:
        p = torch.arange(ctx)
        return torch.tensor(table, dtype=torch.long)[p // block_size] * block_size \
            + p % block_size

    to = dict(device=device)
    tables = lens = None
    if decode_rows:
        # the decode rows' block tables, padded to the longest context's blocks with block 0;
        # the reference gathers through them (a few ops for all rows, not a few per row)
        width = max(decode_ctx)
        blocks = -(-width // block_size)
        table = torch.tensor(_padded(decode_tables, blocks), dtype=torch.long)  # [Bd, blocks]
        ctx = torch.tensor(decode_ctx, dtype=torch.long)
        p = torch.arange(width)
        kv_index = table[:, p // block_size] * block_size + p % block_size   # [Bd, width]
        kv_mask = p[None, :] < ctx[:, None]
        if torch.device(device).type == "cuda":     # for the paged kernel (model/llama.py)
            tables = table.to(device=device, dtype=torch.int32)
            lens = ctx.to(device=device, dtype=torch.int32)
    else:
        kv_index = torch.zeros(0, 0, dtype=torch.long)
        kv_mask = torch.zeros(0, 0, dtype=torch.bool)

    prefill_tables = _prefill_tables(prefills, block_size, device) \
        if paged_prefill and prefills else None
    lora = LoraSegments(indptr, seg_slots,
                        torch.tensor(indptr, dtype=torch.int32, **to),
                        torch.tensor(seg_slots, dtype=torch.int32, **to))
    return BatchLayout(
        input_ids=torch.tensor(ids, dtype=torch.long, **to),
        positions=torch.tensor(pos, dtype=torch.long, **to),
        slot_mapping=torch.tensor(slots_map, dtype=torch.long, **to),
        decode_rows=torch.tensor(decode_rows, dtype=torch.long, **to),
        decode_kv_index=kv_index.to(device), decode_kv_mask=kv_mask.to(device),
        prefills=[PrefillChunk(s, e, flat_index(t, fp + e - s).to(device), fp)
                  for s, e, t, fp in prefills],
        logit_rows=torch.tensor(logit_rows, dtype=torch.long, **to),
        lora=lora, decode_block_tables=tables, decode_context_lens=lens,
        prefill_tables=prefill_tables)


def _prefill_tables(prefills: list[tuple[int, int, list[int], int]], block_size: int,
                    device) -> PrefillTables:
    """prefills: (row_start, row_end, block table, first_pos) per chunk; one int32 copy."""
    blocks = max(-(-(fp + e - s) // block_size) for s, e, _, fp in prefills)
    meta = [[s for s, _, _, _ in prefills], [e - s for s, e, _, _ in prefills],
            [fp for _, _, _, fp in prefills]]
    rows = _padded([t for _, _, t, _ in prefills], blocks)
    flat = torch.tensor([x for m in meta for x in m] + [x for r in rows for x in r],
                        dtype=torch.int32).to(device)
    C = len(prefills)
    return PrefillTables(flat[:C], flat[C:2 * C], flat[2 * C:3 * C],
                         flat[3 * C:].view(C, blocks), max(meta[1]))


def _padded(tables: list[list[int]], blocks: int) -> list[list[int]]:
    """Each block table cut or padded with block 0 to `blocks` entries."""
    return [t[:blocks] + [0] * (blocks - len(t[:blocks])) for t in tables]
