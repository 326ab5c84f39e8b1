// The prefill expand as a memory pipeline (sm_90): y[rows, off:off+out] += v[rows, :r] @ b[slot, :r].
// The shape of a LoRA prefill expand is a matmul with a tiny inner dimension: few MMAs for the
// bytes of y read and written. sgmv_expand.cu's tensor-core kernel loads, computes and stores one
// item at a time; expand_pipe_kernel streams a CTA's run of tiles through a ring of cp.async
// stages. Tiles of 128 rows x 64 columns, two CTAs a SM; every CTA takes an equal contiguous run
// of the launch's tiles (in segment, row-block, column order) and streams their y and b tiles two
// tiles ahead; the row block's v stays in registers as MMA fragments, reloaded only when the row
// block changes. y is updated in fp32 in shared memory and written back with 16-byte stores, or,
// on the LEAN path (rank classes <= 64), by ldmatrix / stmatrix and one TMA store a full tile:
// measured, the time goes to the instructions of the per-tile chain more than to the bytes.
// Ranks are per segment (any 1..128 in one launch); the kernel's rank class only sizes its
// tiles. Rows past a segment are never read or written; weight rows past a slot's rank are never
// read (zeros take their place); v's columns past the rank are never read.
// (A pipelined shrink with a cluster split of the input dimension lived here until session 17:
// slower than both sgmv_shrink.cu's and sgmv_shrink_bulk.cu's kernels; commit 8daf3ab holds it.)
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "sgmv_common.cuh"
#include "tma.cuh"

namespace punica {
namespace {

constexpr int kThreads = 256;
constexpr int kExpandBN = 64;     // columns per tile
constexpr int kExpandBM = 128;    // rows per tile (a 16 KB y tile)
constexpr size_t kRingBudget = 196 * 1024;  // the stages' shared memory (the work list follows)

// A stage is a y tile and the b tile of the same width (KP rows).
constexpr int stages_for(size_t stage_bytes) { return int(std::min<size_t>(8, kRingBudget / stage_bytes)); }

// Ring slots a launch uses: 3 (two tiles in flight while one computes), or PUNICA_PIPE_STAGES=N
// (diagnostics, read once; at least 3, at most what fits). Measured on an H200 (benchmarks/diag/prefill_ab.py, 4096 rows of 7B,
// results/diag/prefill_pipe_s16_h200.txt): 8 slots on one CTA a SM: r16 33 us (sgmv_expand.cu:
// 26.5 us); 3 slots, 2 CTAs a SM: 24 us; one CTA alone moved ~13 GB/s whatever its depth. The expand compiled for 3 CTAs a SM (80
// registers) was slower (r16 32 us), as were 64 x 128 expand tiles.
int ring_slots(int most) {
  static const int n = env_knob("PUNICA_PIPE_STAGES", 3);
  return std::min(std::max(n, 3), most);
}

// cp.async.wait_group with a run-time count (0..7).
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    default: cp_async_wait<7>(); break;
  }
}

// ------------------------------------------------------------------------------------------
// Expand.
// LEAN (sm_90, rank classes <= 64; PUNICA_EXPAND_LEAN=0 turns it off): fewer instructions a tile,
// which is what the expand's time is made of (results/diag/prefill_expand_s18_h200.txt): full
// tiles are copied without per-chunk bounds checks, y is updated by ldmatrix / stmatrix, and a
// full tile goes back to y as one TMA store issued by one thread (partial tiles by the threads,
// as before). A 4-slot ring with copies two tiles ahead, so a slot is copied into only after the
// store of the tile it held two tiles before has read it.
template <typename T, int KP, bool LEAN>
__global__ void __launch_bounds__(kThreads, 2)
    expand_pipe_kernel(ExpandParams p, const __grid_constant__ CUtensorMap ymap, int S, int diag,
                       bool tma_y) {
  constexpr int kBM = kExpandBM, kBN = kExpandBN, CH = kBN / 8;  // 16-byte chunks per row
  constexpr int WMC = kBM / 32;                       // warps along rows (32 rows x 32 columns)
  constexpr int kYElems = kBM * kBN, kStageElems = kYElems + KP * kBN;
  constexpr int KS = KP / 16;  // k16 steps of the rank class
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* ring = reinterpret_cast<T*>(smem_raw);
  if (LEAN) ring += ((1024u - (smem_u32(ring) & 1023u)) & 1023u) / sizeof(T);  // the 128-byte swizzle
  int* prefix = reinterpret_cast<int*>(ring + size_t(S) * kStageElems);
  const int D = LEAN ? S - 2 : S - 1;  // tiles copied ahead of the one being computed
  // tma_y (LEAN, unless PUNICA_EXPAND_TMA_LOAD=0): a full tile's y comes by one TMA box onto its slot's
  // mbarrier (after the work list; every issued tile arrives on it once: the box's bytes or, for
  // a partial tile, a plain arrival)
  uint64_t* bars = reinterpret_cast<uint64_t*>(reinterpret_cast<char*>(prefix) + prefix_bytes(p.seg.num_seg));
  tma_y = LEAN && tma_y;
  if (tma_y) init_slot_bars(bars, S);
  uint32_t phases = 0;  // bit i: the parity slot i's barrier completes next

  const SegmentArgs& sa = p.seg;
  const int N = p.out_features, ntiles = ceil_div(N, kBN);
  const T* __restrict__ vin = static_cast<const T*>(p.v);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WMC, wn = warp / WMC;
  // PDL (LEAN, launched with it unless PUNICA_EXPAND_PDL=0; otherwise both calls are no-ops): the
  // next launch may start now; this one builds its work list, then waits for the kernel launched
  // before it, and only then touches v, b or y.
  if (LEAN) pdl_launch_dependents();

  const int total = build_worklist(prefix, sa.num_seg, [&](int s) {
    const Segment g = load_segment(sa, s);
    return g.active() ? ceil_div(g.end - g.start, kBM) * ntiles : 0;
  });
  const int t_begin = int(int64_t(total) * blockIdx.x / gridDim.x);
  const int t_end = int(int64_t(total) * (blockIdx.x + 1) / gridDim.x);
  if (LEAN) pdl_wait();  // (every CTA: none may finish before the kernel it depends on)
  if (t_begin >= t_end) return;
  if (LEAN && tid == 0) tma_prefetch_map(&ymap);

  // A position in the tile sequence: tile t is column tile ct of row block rb of segment s.
  struct Cursor {
    int t, s, rb, ct;
    Segment g;
  };
  auto seek = [&](Cursor& c, int t) {
    c.t = t;
    c.s = find_segment(prefix, sa.num_seg, t);
    c.g = load_segment(sa, c.s);
    const int local = t - prefix[c.s];
    c.rb = local / ntiles;
    c.ct = local % ntiles;
  };
  auto advance = [&](Cursor& c) {
    ++c.t;
    if (c.t >= t_end) return;
    if (c.t >= prefix[c.s + 1]) {
      seek(c, c.t);
    } else if (++c.ct == ntiles) {
      c.ct = 0;
      ++c.rb;
    }
  };
  auto full_tile = [&](const Cursor& c) {
    return c.g.end - (c.g.start + c.rb * kBM) >= kBM && (c.ct + 1) * kBN <= N;
  };

  // Copies tile c's y tile and its rank rows of b into ring slot `slot`. y rows past the segment
  // and columns past out are not copied (their results are never stored); b's rows from the rank
  // up to the next multiple of 16 are zero-filled (the MMA reads them; the pool may hold anything
  // there).
  auto issue = [&](const Cursor& c, int slot) {
    T* ys = ring + slot * kStageElems;
    T* ws = ys + kYElems;
    const int m0 = c.g.start + c.rb * kBM, n0 = c.ct * kBN;
    const int rows = min(kBM, c.g.end - m0);
    const T* yt = y + p.col_offset + n0 + int64_t(m0) * p.y_stride;
    const int kp16 = min(diag == 1 ? 16 : KP, ceil_div(c.g.rank, 16) * 16);
    const T* wp = w + c.g.slot * p.w_slot_stride + n0;
    if (LEAN && full_tile(c)) {
      // each thread's chunks are one column of chunks, 32 rows apart (32 & 7 == 0: same swizzle)
      constexpr int kStep = kThreads / CH;
      const int row = tid / CH, c8 = (tid % CH) * 8;
      const T* src = yt + int64_t(row) * p.y_stride + c8;
      T* dst = ys + swz(row, c8, kBN);
      if (tma_y) {
        if (tid == 0) {
          if (diag != 3) {
            mbar_arrive_expect_tx(&bars[slot], kYElems * sizeof(T));
            tma_load_2d(ys, &ymap, n0, m0, &bars[slot]);
          } else {
            mbar_arrive(&bars[slot]);
          }
        }
      } else if (diag != 3) {
#pragma unroll
        for (int j = 0; j < kBM / kStep; ++j)
          cp_async16(dst + j * kStep * kBN, src + int64_t(j * kStep) * p.y_stride, 16);
      }
#pragma unroll
      for (int j = 0; j < ceil_div(KP * CH, kThreads); ++j) {
        const int k = row + j * kStep;
        if (k >= kp16) break;
        const bool ok = k < c.g.rank;
        cp_async16(ws + swz(k, c8, kBN), ok ? wp + int64_t(k) * N + c8 : wp, ok ? 16 : 0);
      }
      return;
    }
    if (tma_y && tid == 0) mbar_arrive(&bars[slot]);
#pragma unroll
    for (int i = tid; i < kBM * CH; i += kThreads) {
      const int row = i / CH, c8 = (i % CH) * 8;
      if (row < rows && n0 + c8 < N && diag != 3) cp_async16(ys + swz(row, c8, kBN), yt + int64_t(row) * p.y_stride + c8, 16);
    }
    for (int i = tid; i < kp16 * CH; i += kThreads) {
      const int k = i / CH, c8 = (i % CH) * 8;
      if (n0 + c8 >= N) continue;
      const bool ok = k < c.g.rank;
      cp_async16(ws + swz(k, c8, kBN), ok ? wp + int64_t(k) * N + c8 : wp, ok ? 16 : 0);
    }
  };

  // This warp's 32 rows of the row block's v, as A fragments of every k16 step of the rank.
  uint32_t vf[2][KS][4];
  auto load_v = [&](const Cursor& c) {
    const int m0 = c.g.start + c.rb * kBM;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int row = m0 + wm * 32 + mi * 16 + (lane >> 2) + (j & 1) * 8;
          const int k = ks * 16 + (lane & 3) * 2 + (j >> 1) * 8;
          vf[mi][ks][j] = load_v_pair(vin, p.v_stride, row, c.g.end, k, c.g.rank);
        }
  };

  Cursor pc, cc;
  seek(pc, t_begin);
  cc = pc;
  for (int st = 0; st < D; ++st) {
    if (pc.t < t_end) {
      issue(pc, st);
      advance(pc);
    }
    cp_async_commit();
  }
  load_v(cc);

  for (int slot = 0; cc.t < t_end; slot = slot + 1 == S ? 0 : slot + 1) {
    cp_async_wait_dyn(D - 1);
    if (tma_y) wait_slot_bar(bars, phases, slot);
    if (LEAN && tid == 0) tma_store_wait_read<1>();  // the slot copied into next is free
    __syncthreads();  // tile cc landed for every thread; the slot copied into next is free
    if (pc.t < t_end) {
      issue(pc, slot + D < S ? slot + D : slot + D - S);
      advance(pc);
    }
    cp_async_commit();

    T* ys = ring + slot * kStageElems;
    const T* ws = ys + kYElems;
    const int kp16 = ceil_div(cc.g.rank, 16);
    float acc[2][4][4] = {};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      if (ks >= kp16 || (diag == 2 && ks >= 1)) break;
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, ws + swz(ks * 16 + (lane & 15), wn * 32 + np * 16 + (lane >> 4) * 8, kBN));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_16816<T>(acc[mi][2 * np], vf[mi][ks], bf[0], bf[1]);
          mma_16816<T>(acc[mi][2 * np + 1], vf[mi][ks], bf[2], bf[3]);
        }
      }
    }
    const int m0 = cc.g.start + cc.rb * kBM, n0 = cc.ct * kBN;
    if (LEAN) {
      add_fragments_ldsm<T>(ys, acc, wm * 32, wn * 32, lane);  // y += C in shared memory
      fence_smem_to_async();
    } else {
      add_fragments<T, kBN>(ys, acc, wm * 32, wn * 32, lane);  // y += C in shared memory
    }
    __syncthreads();
    if (LEAN && full_tile(cc)) {
      if (tid == 0 && diag != 4) tma_store_2d(&ymap, n0, m0, ys);
      if (tid == 0) tma_store_commit();
    } else {
      const int rows = min(kBM, cc.g.end - m0);
      T* yt = y + p.col_offset + n0 + int64_t(m0) * p.y_stride;
#pragma unroll
      for (int i = tid; i < kBM * CH; i += kThreads) {
        const int row = i / CH, c8 = (i % CH) * 8;
        if (row < rows && n0 + c8 < N && diag != 4)
          *reinterpret_cast<uint4*>(yt + int64_t(row) * p.y_stride + c8) =
              *reinterpret_cast<const uint4*>(ys + swz(row, c8, kBN));
      }
    }
    const int rb = cc.rb, s = cc.s;
    advance(cc);
    if (cc.t < t_end && (cc.rb != rb || cc.s != s)) load_v(cc);  // a new row block
  }
  cp_async_wait<0>();
  if (LEAN && tid == 0) tma_store_wait_all();
}

// ------------------------------------------------------------------------------------------
// Launchers.
// PUNICA_EXPAND_DIAG=N (diagnostics only, read once; wrong results): 1 copies only the first 16
// rank rows of b, 2 runs only the first k16 step of the MMAs, 3 copies no y tile, 4 stores no y.
// Each takes one part of a tile's work away, to see what the rank-64 expand's time is made of.
int expand_diag() {
  static const int n = env_knob("PUNICA_EXPAND_DIAG", 0);
  return n;
}

// The LEAN kernel for rank classes <= 64; PUNICA_EXPAND_LEAN=0 (diagnostics, read once): the
// kernel without it.
bool expand_lean() {
  static const bool on = env_knob("PUNICA_EXPAND_LEAN", 1) != 0;
  return on;
}

// The rank class is the pool's stored rank rounded up to 16, 32, 64 or 128.
template <typename T, int KP, bool LEAN>
cudaError_t launch_expand(const ExpandParams& p, const LaunchOptions& o, const CUtensorMap& ymap) {
  constexpr int kBM = kExpandBM, kBN = kExpandBN;
  auto kernel = expand_pipe_kernel<T, KP, LEAN>;
  const size_t stage = size_t(kBM * kBN + KP * kBN) * sizeof(T);
  const int S = LEAN ? std::min(4, stages_for(stage)) : ring_slots(stages_for(stage));
  const size_t smem = size_t(S) * stage + prefix_bytes(p.seg.num_seg) + (LEAN ? 1024 + S * sizeof(uint64_t) : 0);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int grid = persistent_grid(row_tiles_at_most(p.seg, kBM, ceil_div(p.out_features, kBN)),
                                   o.num_sms,
                                   cached_blocks_per_sm<expand_pipe_kernel<T, KP, LEAN>>(kThreads, smem));
  return launch(kernel, dim3(grid), dim3(kThreads), smem, o.stream, LEAN && expand_pdl(o), p, ymap,
                S, expand_diag(), LEAN && expand_tma_load());
}

template <typename T, bool LEAN>
cudaError_t expand_by_class(const ExpandParams& p, const LaunchOptions& o, const CUtensorMap& m) {
  const int r = p.seg.max_rank;
  return r <= 16 ? launch_expand<T, 16, LEAN>(p, o, m) : r <= 32 ? launch_expand<T, 32, LEAN>(p, o, m)
                                                       : launch_expand<T, 64, LEAN>(p, o, m);
}

template <typename T>
cudaError_t expand_typed(const ExpandParams& p, const LaunchOptions& o) {
  CUtensorMap ymap = {};
  // the LEAN kernel's boxes are its tiles (128 rows x 64 columns)
  if (p.seg.max_rank <= 64 && expand_lean() && encode_expand_y<T>(&ymap, p, kExpandBN, kExpandBM))
    return expand_by_class<T, true>(p, o, ymap);
  if (p.seg.max_rank > 64) return launch_expand<T, 128, false>(p, o, ymap);
  return expand_by_class<T, false>(p, o, ymap);
}

}  // namespace

// Full y tiles by TMA loads (LEAN and strip kernels), the default since session 19's A/B (LEAN 1-3%
// faster at 128-row segments, strips the same or up to 1% faster: results/diag/prefill_ab_s19_h200.txt).
// PUNICA_EXPAND_TMA_LOAD=0 (read once): by the threads' cp.async, for A/B runs.
bool expand_tma_load() {
  static const bool on = env_knob("PUNICA_EXPAND_TMA_LOAD", 1) == 1;
  return on;
}

// Both expands (LEAN and strips) under PDL where the op asks for it, the default since session
// 19's A/B (results/diag/prefill_ab_s19_h200.txt). PUNICA_EXPAND_PDL=0 (read once): without.
bool expand_pdl(const LaunchOptions& o) {
  static const bool on = env_knob("PUNICA_EXPAND_PDL", 1) == 1;
  return on && o.pdl;
}

// PUNICA_PREFILL=mma (diagnostics, read once): the expand on sgmv_expand.cu's tensor-core
// kernel, as on sm_80, instead of the pipelined one.
bool prefill_pipe(const LaunchOptions& o) {
  static const char* env = std::getenv("PUNICA_PREFILL");
  static const bool mma = env && std::strcmp(env, "mma") == 0;
  return o.vec && o.sm >= 90 && !mma;
}

cudaError_t expand_pipe(DType dt, const ExpandParams& p, const LaunchOptions& o) {
  if (!o.vec || p.seg.max_rank > kMaxRank) return cudaErrorInvalidValue;
  if (expand_strip_fits(p)) {
    const cudaError_t err = expand_strip(dt, p, o);
    if (err != cudaErrorNotSupported) return err;
  }
  return dt == DType::kHalf ? expand_typed<__half>(p, o) : expand_typed<__nv_bfloat16>(p, o);
}

}  // namespace punica
