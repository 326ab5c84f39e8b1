// The prefill expand in column strips (sm_90, rank classes <= 64, segments of 256+ rows on
// average; expand_strip_fits): y[rows, off:off+out] += v[rows, :r] @ b[slot, :r] with tiles of 64 rows x 128 columns
// taken down a segment's column strip, so a CTA's b stays in registers for its whole strip and
// the CTAs that run at once read whole rows of y between them (sgmv_prefill.cu's tiles go along
// a row block, each CTA 128-byte pieces of rows 8 KB apart). Per tile only y (16 KB) and the row
// block's v (64 rows x the rank, zero-filled past it) go through a 4-slot cp.async ring; v's
// fragments come by ldmatrix, y is updated by ldmatrix / stmatrix and a full tile goes back as
// two TMA stores (boxes of 64 x 64, the tile's two halves) issued by one thread; partial tiles
// by the threads' checked copies and stores. Ranks are per segment, as everywhere.
#include <algorithm>

#include "sgmv_common.cuh"
#include "tma.cuh"

namespace punica {
namespace {

constexpr int kThreads = 256;                  // 2 x 4 warps of 32 rows x 32 columns
constexpr int kBM = 64, kBN = 128, kHalf = 64;  // a tile is two 64-column halves
constexpr int kSlots = 4, kAhead = 2;           // a slot is copied into two tiles after its store
constexpr int kYElems = kBM * kBN, kVElems = kBM * 64, kStageElems = kYElems + kVElems;
constexpr int kChunks = kBN / 8;                // 16-byte chunks in a tile row

// TMA_Y (the default; PUNICA_EXPAND_TMA_LOAD=0 off, as for sgmv_prefill.cu's LEAN kernel): a
// full tile's y comes as two TMA boxes onto its slot's mbarrier (every issued tile arrives on it
// once: the boxes' bytes or, for a partial tile, a plain arrival).
template <typename T, int KP, bool PDL, bool TMA_Y>
__global__ void __launch_bounds__(kThreads, 2)
    expand_strip_kernel(ExpandParams p, const __grid_constant__ CUtensorMap ymap) {
  constexpr int KS = KP / 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* ring = reinterpret_cast<T*>(smem_raw);
  ring += ((1024u - (smem_u32(ring) & 1023u)) & 1023u) / sizeof(T);  // the 128-byte swizzle
  int* prefix = reinterpret_cast<int*>(ring + kSlots * kStageElems);
  uint64_t* bars = reinterpret_cast<uint64_t*>(reinterpret_cast<char*>(prefix) + prefix_bytes(p.seg.num_seg));
  if constexpr (TMA_Y) init_slot_bars(bars, kSlots);  // the work list's barriers order it before use
  uint32_t phases = 0;  // TMA_Y: bit i is the parity slot i's barrier completes next

  const SegmentArgs& sa = p.seg;
  const int N = p.out_features, nstrips = ceil_div(N, kBN);
  const T* __restrict__ vin = static_cast<const T*>(p.v);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 1, wn = warp >> 1;
  // PDL (the default where the op asks for it; PUNICA_EXPAND_PDL=0 off): the next launch may
  // start now; this one reads the metadata and its strip's b (the contract of the decode kernels:
  // neither is written by a kernel it may overlap) before it waits for the kernel launched before
  // it, and touches v and y only after.
  if constexpr (PDL) pdl_launch_dependents();

  const int total = build_worklist(prefix, sa.num_seg, [&](int s) {
    const Segment g = load_segment(sa, s);
    return g.active() ? ceil_div(g.end - g.start, kBM) * nstrips : 0;
  });
  const int t_begin = int(int64_t(total) * blockIdx.x / gridDim.x);
  const int t_end = int(int64_t(total) * (blockIdx.x + 1) / gridDim.x);
  if (t_begin >= t_end) {
    if constexpr (PDL) pdl_wait();  // a CTA must not finish before the kernel it depends on
    return;
  }
  if (tid == 0) tma_prefetch_map(&ymap);

  // Tile t is row block rb of column strip ct of segment s (strips one after the other).
  struct Cursor {
    int t, s, rb, ct, nrb;
    Segment g;
  };
  auto seek = [&](Cursor& c, int t) {
    c.t = t;
    c.s = find_segment(prefix, sa.num_seg, t);
    c.g = load_segment(sa, c.s);
    c.nrb = ceil_div(c.g.end - c.g.start, kBM);
    const int local = t - prefix[c.s];
    c.ct = local / c.nrb;
    c.rb = local % c.nrb;
  };
  auto advance = [&](Cursor& c) {
    ++c.t;
    if (c.t >= t_end) return;
    if (c.t >= prefix[c.s + 1]) {
      seek(c, c.t);
    } else if (++c.rb == c.nrb) {
      c.rb = 0;
      ++c.ct;
    }
  };
  auto full_tile = [&](const Cursor& c) {
    return c.g.end - (c.g.start + c.rb * kBM) >= kBM && (c.ct + 1) * kBN <= N;
  };
  // element (row, column) of a tile in its stage: two swizzled halves of 64-element rows
  auto cell = [](T* ys, int row, int col) {
    return ys + (col / kHalf) * (kBM * kHalf) + swz(row, col % kHalf, kHalf);
  };

  // Copies tile c's y tile and its rows of v (columns up to the rank class; zeros from the rank
  // on, and for rows past the segment) into ring slot `slot`. y rows past the segment and
  // columns past out are not copied (their results are never stored).
  auto issue = [&](const Cursor& c, int slot) {
    T* ys = ring + slot * kStageElems;
    T* vs = ys + kYElems;
    const int m0 = c.g.start + c.rb * kBM, n0 = c.ct * kBN;
    const T* yt = y + p.col_offset + n0 + int64_t(m0) * p.y_stride;
    if (TMA_Y && full_tile(c)) {
      if (tid == 0) {
        mbar_arrive_expect_tx(&bars[slot], kYElems * sizeof(T));
        tma_load_2d(ys, &ymap, n0, m0, &bars[slot]);
        tma_load_2d(ys + kBM * kHalf, &ymap, n0 + kHalf, m0, &bars[slot]);
      }
    } else if (full_tile(c)) {
      // each thread's four chunks are one column of chunks, 16 rows apart (16 & 7 == 0)
      const int row = tid / kChunks, col = (tid % kChunks) * 8;
      T* dst = cell(ys, row, col);
      const T* src = yt + int64_t(row) * p.y_stride + col;
#pragma unroll
      for (int j = 0; j < kBM * kChunks / kThreads; ++j)
        cp_async16(dst + j * 16 * kHalf, src + int64_t(j * 16) * p.y_stride, 16);
    } else {
      if (TMA_Y && tid == 0) mbar_arrive(&bars[slot]);
      const int rows = min(kBM, c.g.end - m0);
#pragma unroll
      for (int i = tid; i < kBM * kChunks; i += kThreads) {
        const int row = i / kChunks, col = (i % kChunks) * 8;
        if (row < rows && n0 + col < N) cp_async16(cell(ys, row, col), yt + int64_t(row) * p.y_stride + col, 16);
      }
    }
    constexpr int kVChunks = KP / 8;
#pragma unroll
    for (int j = 0; j < ceil_div(kBM * kVChunks, kThreads); ++j) {
      const int i = tid + j * kThreads;
      if (i >= kBM * kVChunks) break;
      const int row = i / kVChunks, k = (i % kVChunks) * 8;
      const int bytes = m0 + row < c.g.end ? 2 * max(0, min(8, c.g.rank - k)) : 0;
      cp_async16(vs + swz(row, k, 64), bytes ? vin + int64_t(m0 + row) * p.v_stride + k : vin, bytes);
    }
  };

  // This warp's 32 columns of the strip's b as B fragments of every k16 step (zeros past the
  // rank and past out), loaded once a strip.
  uint32_t bf[KS][4][2];
  auto load_b = [&](const Cursor& c) {
    const T* wp = w + c.g.slot * p.w_slot_stride;
    const uint16_t* wb = reinterpret_cast<const uint16_t*>(wp);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int nb = 0; nb < 4; ++nb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int k = ks * 16 + (lane & 3) * 2 + h * 8;
          const int n = c.ct * kBN + wn * 32 + nb * 8 + (lane >> 2);
          const uint32_t lo = k < c.g.rank && n < N ? wb[int64_t(k) * N + n] : 0u;
          const uint32_t hi = k + 1 < c.g.rank && n < N ? wb[int64_t(k + 1) * N + n] : 0u;
          bf[ks][nb][h] = lo | (hi << 16);
        }
  };

  Cursor pc, cc;
  seek(pc, t_begin);
  cc = pc;
  if constexpr (PDL) {
    load_b(cc);
    pdl_wait();
  }
  for (int st = 0; st < kAhead; ++st) {
    if (pc.t < t_end) {
      issue(pc, st);
      advance(pc);
    }
    cp_async_commit();
  }
  if constexpr (!PDL) load_b(cc);

  for (int slot = 0; cc.t < t_end; slot = slot + 1 == kSlots ? 0 : slot + 1) {
    cp_async_wait<kAhead - 1>();
    if constexpr (TMA_Y) wait_slot_bar(bars, phases, slot);
    if (tid == 0) tma_store_wait_read<1>();  // the slot copied into next is free
    __syncthreads();  // tile cc landed for every thread; the slot copied into next is free
    if (pc.t < t_end) {
      issue(pc, slot + kAhead < kSlots ? slot + kAhead : slot + kAhead - kSlots);
      advance(pc);
    }
    cp_async_commit();

    T* ys = ring + slot * kStageElems;
    const T* vs = ys + kYElems;
    const int kp16 = ceil_div(cc.g.rank, 16);
    float acc[2][4][4] = {};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      if (ks >= kp16) break;
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        uint32_t a[4];
        ldmatrix_x4(a, vs + swz(wm * 32 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                ks * 16 + (lane >> 4) * 8, 64));
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) mma_16816<T>(acc[mi][nb], a, bf[ks][nb][0], bf[ks][nb][1]);
      }
    }
    add_fragments_ldsm<T>(ys + (wn >> 1) * (kBM * kHalf), acc, wm * 32, (wn & 1) * 32, lane);
    fence_smem_to_async();
    __syncthreads();
    const int m0 = cc.g.start + cc.rb * kBM, n0 = cc.ct * kBN;
    if (full_tile(cc)) {
      if (tid == 0) {
        tma_store_2d(&ymap, n0, m0, ys);
        tma_store_2d(&ymap, n0 + kHalf, m0, ys + kBM * kHalf);
        tma_store_commit();
      }
    } else {
      const int rows = min(kBM, cc.g.end - m0);
      T* yt = y + p.col_offset + n0 + int64_t(m0) * p.y_stride;
#pragma unroll
      for (int i = tid; i < kBM * kChunks; i += kThreads) {
        const int row = i / kChunks, col = (i % kChunks) * 8;
        if (row < rows && n0 + col < N)
          *reinterpret_cast<uint4*>(yt + int64_t(row) * p.y_stride + col) =
              *reinterpret_cast<const uint4*>(cell(ys, row, col));
      }
    }
    const int ct = cc.ct, s = cc.s;
    advance(cc);
    if (cc.t < t_end && (cc.ct != ct || cc.s != s)) load_b(cc);  // a new strip
  }
  cp_async_wait<0>();
  if (tid == 0) tma_store_wait_all();
}

template <typename T, int KP, bool PDL, bool TMA_Y>
cudaError_t launch_strip(const ExpandParams& p, const LaunchOptions& o, const CUtensorMap& ymap) {
  auto kernel = expand_strip_kernel<T, KP, PDL, TMA_Y>;
  const size_t smem = 1024 + size_t(kSlots) * kStageElems * sizeof(T) + prefix_bytes(p.seg.num_seg) +
                      (TMA_Y ? kSlots * sizeof(uint64_t) : 0);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int grid = persistent_grid(row_tiles_at_most(p.seg, kBM, ceil_div(p.out_features, kBN)),
                                   o.num_sms,
                                   cached_blocks_per_sm<expand_strip_kernel<T, KP, PDL, TMA_Y>>(kThreads, smem));
  return launch(kernel, dim3(grid), dim3(kThreads), smem, o.stream, PDL, p, ymap);
}

template <typename T, bool PDL, bool TMA_Y>
cudaError_t by_rank(int r, const ExpandParams& p, const LaunchOptions& o, const CUtensorMap& ymap) {
  return r <= 16 ? launch_strip<T, 16, PDL, TMA_Y>(p, o, ymap)
         : r <= 32 ? launch_strip<T, 32, PDL, TMA_Y>(p, o, ymap)
                   : launch_strip<T, 64, PDL, TMA_Y>(p, o, ymap);
}

template <typename T>
cudaError_t strip_typed(const ExpandParams& p, const LaunchOptions& o) {
  CUtensorMap ymap = {};  // boxes of a tile's halves (64 rows x 64 columns)
  if (p.seg.max_rank > 64 || reinterpret_cast<uintptr_t>(p.v) % 16 != 0 || p.v_stride % 8 != 0 ||
      !encode_expand_y<T>(&ymap, p, kHalf, kBM))
    return cudaErrorNotSupported;
  // PDL where the op asks for it (512+ rows a segment: rank 64 9-11% faster, rank 16 4-8%, as
  // launches overlap their predecessors' tails; results/diag/prefill_ab_s19_h200.txt) and y by
  // TMA loads: the defaults (expand_pdl, expand_tma_load in sgmv_prefill.cu).
  const int r = p.seg.max_rank;
  const int variant = (expand_pdl(o) ? 1 : 0) | (expand_tma_load() ? 2 : 0);
  return variant == 0 ? by_rank<T, false, false>(r, p, o, ymap)
         : variant == 1 ? by_rank<T, true, false>(r, p, o, ymap)
         : variant == 2 ? by_rank<T, false, true>(r, p, o, ymap)
                        : by_rank<T, true, true>(r, p, o, ymap);
}

}  // namespace

// Segments of 256 rows or more on average take the strips: at 512+ rows they are as fast or
// faster (gate/up rank 64: 63.3 vs 70.9 us; results/diag/prefill_expand_s18_h200.txt), at 256
// even, at 128 slower (rank 64: 36% vs 41% of matmul: two tiles a strip, b reloaded for each
// pair). PUNICA_EXPAND_STRIP=1 / 0 (read once): always / never, for A/B runs.
bool expand_strip_fits(const ExpandParams& p) {
  static const int mode = env_knob("PUNICA_EXPAND_STRIP", -1);
  if (mode >= 0) return mode == 1;
  return int64_t(p.seg.num_rows) >= 256 * int64_t(std::max(p.seg.num_seg, 1));
}

cudaError_t expand_strip(DType dt, const ExpandParams& p, const LaunchOptions& o) {
  if (!o.vec || o.sm < 90) return cudaErrorNotSupported;
  return dt == DType::kHalf ? strip_typed<__half>(p, o) : strip_typed<__nv_bfloat16>(p, o);
}

}  // namespace punica
