// Prefill SGMV kernels as memory pipelines (sm_90): the shape of a LoRA prefill is a matmul with
// a tiny inner (expand) or outer (shrink) dimension, so its time is the bytes of y read and
// written (expand) or of x (shrink), not the MMAs. The sgmv_shrink.cu / sgmv_expand.cu
// tensor-core kernels load, compute and store one item at a time; these stream a CTA's run of
// tiles through a ring of cp.async stages.
//
//  * expand_pipe_kernel (the expand's prefill path on sm_90): y[rows, off:off+out] += v[rows, :r]
//    @ b[slot, :r]. Tiles of 128 rows x 64 columns, two CTAs a SM; every CTA takes an equal
//    contiguous run of the launch's tiles (in segment, row-block, column order) and streams their
//    y and b tiles through a ring of 3 stages; the row block's v stays in registers as MMA
//    fragments, reloaded only when the row block changes. y is updated in fp32 in shared memory
//    and written back with 16-byte stores.
//  * shrink_pipe_kernel (PUNICA_PREFILL=pipe only: measured slower than sgmv_shrink.cu's kernel,
//    see ring_slots): v[rows, :r] = x[rows] @ a[slot, :r].T. Tiles of 128 rows x the rank class
//    (16/32/64/128), a ring of stages of 64 input columns. When the row blocks do not fill the
//    GPU, a thread-block cluster of C CTAs splits the input dimension and sums its fp32 partial
//    tiles through distributed shared memory in a fixed order (deterministic, no workspace, no
//    second launch).
// Ranks are per segment (any 1..128 in one launch); the kernel's rank class only sizes its
// tiles. Rows past a segment are never read or written; weight rows past a slot's rank are never
// read (zeros take their place); v's columns past the rank are never read (expand) or written
// (shrink).
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "sgmv_common.cuh"

namespace cg = cooperative_groups;

namespace punica {
namespace {

constexpr int kThreads = 256;
constexpr int kBM = 128;   // shrink: rows per tile
constexpr int kBK = 64;    // shrink: input columns per stage
constexpr int kExpandBN = 64;     // expand: columns per tile
constexpr int kExpandBM = 128;    // expand: rows per tile (a 16 KB y tile)
constexpr size_t kRingBudget = 196 * 1024;  // the stages' shared memory (the work list follows)

// A stage is an activation tile and the weight tile of the same width (KP rows), both kernels.
constexpr int stages_for(size_t stage_bytes) { return int(std::min<size_t>(8, kRingBudget / stage_bytes)); }

// Ring slots a launch uses: 3 (two tiles in flight while one computes), or PUNICA_PIPE_STAGES=N
// (diagnostics, read once; at least 3: the shrink's fp32 partial tile reuses the ring, at most
// what fits). Measured on an H200 (benchmarks/diag/prefill_ab.py, 4096 rows of 7B,
// results/diag/prefill_pipe_s16_h200.txt): 8 slots on one CTA a SM: expand r16 33 us, shrink r16
// 45 us (sgmv_*.cu: 26.5 / 19.5 us); 3 slots, 2 (expand) or 3 (shrink) CTAs a SM: 24 / 21 us;
// one CTA alone moved ~13 GB/s whatever its depth. The expand compiled for 3 CTAs a SM (80
// registers) was slower (r16 32 us), as were 64 x 128 expand tiles.
int ring_slots(int most) {
  static const char* env = std::getenv("PUNICA_PIPE_STAGES");
  const int n = env ? std::atoi(env) : 3;
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
template <typename T, int KP>
__global__ void __launch_bounds__(kThreads, 2) expand_pipe_kernel(ExpandParams p, int S) {
  constexpr int kBM = kExpandBM, kBN = kExpandBN, CH = kBN / 8;  // 16-byte chunks per row
  constexpr int WMC = kBM / 32;                       // warps along rows (32 rows x 32 columns)
  constexpr int kYElems = kBM * kBN, kStageElems = kYElems + KP * kBN;
  constexpr int KS = KP / 16;  // k16 steps of the rank class
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* ring = reinterpret_cast<T*>(smem_raw);
  int* prefix = reinterpret_cast<int*>(ring + size_t(S) * kStageElems);

  const SegmentArgs& sa = p.seg;
  const int N = p.out_features, ntiles = ceil_div(N, kBN);
  const T* __restrict__ vin = static_cast<const T*>(p.v);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WMC, wn = warp / WMC;

  const int total = build_worklist(prefix, sa.num_seg, [&](int s) {
    const Segment g = load_segment(sa, s);
    return g.active() ? ceil_div(g.end - g.start, kBM) * ntiles : 0;
  });
  const int t_begin = int(int64_t(total) * blockIdx.x / gridDim.x);
  const int t_end = int(int64_t(total) * (blockIdx.x + 1) / gridDim.x);
  if (t_begin >= t_end) return;

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
#pragma unroll
    for (int i = tid; i < kBM * CH; i += kThreads) {
      const int row = i / CH, c8 = (i % CH) * 8;
      if (row < rows && n0 + c8 < N) cp_async16(ys + swz_tile<kBN>(row, c8), yt + int64_t(row) * p.y_stride + c8, 16);
    }
    const int kp16 = min(KP, ceil_div(c.g.rank, 16) * 16);
    const T* wp = w + c.g.slot * p.w_slot_stride + n0;
    for (int i = tid; i < kp16 * CH; i += kThreads) {
      const int k = i / CH, c8 = (i % CH) * 8;
      if (n0 + c8 >= N) continue;
      const bool ok = k < c.g.rank;
      cp_async16(ws + swz_tile<kBN>(k, c8), ok ? wp + int64_t(k) * N + c8 : wp, ok ? 16 : 0);
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
  for (int st = 0; st < S - 1; ++st) {
    if (pc.t < t_end) {
      issue(pc, st);
      advance(pc);
    }
    cp_async_commit();
  }
  load_v(cc);

  for (int slot = 0; cc.t < t_end; slot = slot + 1 == S ? 0 : slot + 1) {
    cp_async_wait_dyn(S - 2);
    __syncthreads();  // tile cc landed for every thread; the slot of the tile before is free
    if (pc.t < t_end) {
      issue(pc, slot == 0 ? S - 1 : slot - 1);
      advance(pc);
    }
    cp_async_commit();

    T* ys = ring + slot * kStageElems;
    const T* ws = ys + kYElems;
    const int kp16 = ceil_div(cc.g.rank, 16);
    float acc[2][4][4] = {};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      if (ks >= kp16) break;
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, ws + swz_tile<kBN>(ks * 16 + (lane & 15), wn * 32 + np * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_16816<T>(acc[mi][2 * np], vf[mi][ks], bf[0], bf[1]);
          mma_16816<T>(acc[mi][2 * np + 1], vf[mi][ks], bf[2], bf[3]);
        }
      }
    }
    add_fragments<T, kBN>(ys, acc, wm * 32, wn * 32, lane);  // y += C in shared memory
    __syncthreads();
    {
      const int m0 = cc.g.start + cc.rb * kBM, n0 = cc.ct * kBN;
      const int rows = min(kBM, cc.g.end - m0);
      T* yt = y + p.col_offset + n0 + int64_t(m0) * p.y_stride;
#pragma unroll
      for (int i = tid; i < kBM * CH; i += kThreads) {
        const int row = i / CH, c8 = (i % CH) * 8;
        if (row < rows && n0 + c8 < N)
          *reinterpret_cast<uint4*>(yt + int64_t(row) * p.y_stride + c8) =
              *reinterpret_cast<const uint4*>(ys + swz_tile<kBN>(row, c8));
      }
    }
    const int rb = cc.rb, s = cc.s;
    advance(cc);
    if (cc.t < t_end && (cc.rb != rb || cc.s != s)) load_v(cc);  // a new row block
  }
  cp_async_wait<0>();
}

// ------------------------------------------------------------------------------------------
// Shrink. Warps: WM along rows x WN along ranks; each warp MI m16 tiles x NP n16 rank groups.
template <int KP>
struct ShrinkWarps {
  static constexpr int WN = KP >= 32 ? 2 : 1, WM = 8 / WN;
  static constexpr int MI = kBM / WM / 16, NP = KP / WN / 16;
};

template <typename T, int KP>
__global__ void __launch_bounds__(kThreads, KP >= 128 ? 2 : 3) shrink_pipe_kernel(ShrinkParams p, int S) {
  constexpr int CH = kBK / 8;  // 16-byte chunks per row of a stage
  constexpr int kXElems = kBM * kBK, kStageElems = kXElems + KP * kBK;
  using WL = ShrinkWarps<KP>;
  constexpr int MI = WL::MI, NP = WL::NP;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* ring = reinterpret_cast<T*>(smem_raw);
  int* prefix = reinterpret_cast<int*>(ring + size_t(S) * kStageElems);

  const SegmentArgs& sa = p.seg;
  const int K = p.in_features, KT = ceil_div(K, kBK), C = p.ksplit;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WL::WM, wn = warp / WL::WM;
  const int crank = int(blockIdx.x) % C, unit = int(blockIdx.x) / C;  // C CTAs a cluster

  const int total = build_worklist(prefix, sa.num_seg, [&](int s) {
    const Segment g = load_segment(sa, s);
    return g.active() ? ceil_div(g.end - g.start, kBM) : 0;
  });
  if (unit >= total) return;  // the whole cluster shares the unit, so it leaves together
  const int s = find_segment(prefix, sa.num_seg, unit);
  const Segment g = load_segment(sa, s);
  const int m0 = g.start + (unit - prefix[s]) * kBM, rows = min(kBM, g.end - m0);
  const int kt0 = crank * KT / C, nk = (crank + 1) * KT / C - kt0;
  const int kp16 = min(KP, ceil_div(g.rank, 16) * 16);
  const T* xt = x + int64_t(m0) * p.x_stride;
  const T* wp = w + g.slot * p.w_slot_stride;

  // x rows past the segment are not copied (never stored); input columns past K are zeros in
  // both operands; a's rows from the rank up to the next multiple of 16 are zeros.
  auto issue = [&](int slot, int kt) {
    T* xs = ring + slot * kStageElems;
    T* ws = xs + kXElems;
    const int k0 = kt * kBK;
#pragma unroll
    for (int i = tid; i < kBM * CH; i += kThreads) {
      const int row = i / CH, k = (i % CH) * 8;
      if (row >= rows) continue;
      const bool ok = k0 + k < K;
      cp_async16(xs + swz(row, k, kBK), ok ? xt + int64_t(row) * p.x_stride + k0 + k : x, ok ? 16 : 0);
    }
    for (int i = tid; i < kp16 * CH; i += kThreads) {
      const int r = i / CH, k = (i % CH) * 8;
      const bool ok = r < g.rank && k0 + k < K;
      cp_async16(ws + swz(r, k, kBK), ok ? wp + int64_t(r) * K + k0 + k : wp, ok ? 16 : 0);
    }
  };

  float acc[MI][2 * NP][4] = {};

  for (int st = 0; st < S - 1; ++st) {
    if (st < nk) issue(st, kt0 + st);
    cp_async_commit();
  }
  for (int it = 0, slot = 0; it < nk; ++it, slot = slot + 1 == S ? 0 : slot + 1) {
    cp_async_wait_dyn(S - 2);
    __syncthreads();
    if (it + S - 1 < nk) issue(slot == 0 ? S - 1 : slot - 1, kt0 + it + S - 1);
    cp_async_commit();
    const T* xs = ring + slot * kStageElems;
    const T* ws = xs + kXElems;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], xs + swz(wm * MI * 16 + mi * 16 + (lane & 15), ks * 16 + (lane >> 4) * 8, kBK));
#pragma unroll
      for (int np = 0; np < NP; ++np) {
        const int n0 = wn * NP * 16 + np * 16;
        if (n0 >= kp16) continue;
        uint32_t bf[4];
        ldmatrix_x4(bf, ws + swz(n0 + (lane & 7) + ((lane >> 4) << 3), ks * 16 + ((lane >> 3) & 1) * 8, kBK));
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma_16816<T>(acc[mi][2 * np], af[mi], bf[0], bf[1]);
          mma_16816<T>(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  T* v = static_cast<T*>(p.v);
  // Each thread holds rows (lane/4, +8) x ranks (2*(lane%4), +1) of every 16 x 8 tile.
  if (C == 1) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < 2 * NP; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = wm * MI * 16 + mi * 16 + (lane >> 2) + (e >> 1) * 8;
          const int col = wn * NP * 16 + ni * 8 + (lane & 3) * 2 + (e & 1);
          if (row < rows && col < g.rank) v[int64_t(m0 + row) * p.v_stride + col] = from_float<T>(acc[mi][ni][e]);
        }
    return;
  }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  // Split over the input dimension: the cluster's partial tiles meet in distributed shared
  // memory; CTA `crank` sums its share of the rows over the cluster in rank order.
  constexpr int kPitch = KP + 8;  // fp32 partial tile row pitch (fewer bank conflicts)
  cg::cluster_group cluster = cg::this_cluster();
  __syncthreads();  // every warp is done with the ring: it becomes the partial tile
  float* part = reinterpret_cast<float*>(smem_raw);  // [kBM][kPitch]
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < 2 * NP; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wm * MI * 16 + mi * 16 + (lane >> 2) + h * 8;
        const int col = wn * NP * 16 + ni * 8 + (lane & 3) * 2;
        *reinterpret_cast<float2*>(part + row * kPitch + col) =
            make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
      }
  cluster_arrive();
  cluster_wait();
  const int per = ceil_div(rows, C), r0 = crank * per, r1 = min(rows, r0 + per);
  const int quads = kp16 / 4;  // 4 ranks per read
  for (int i = tid; i < (r1 - r0) * quads; i += kThreads) {
    const int row = r0 + i / quads, col = (i % quads) * 4;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if (q >= C) break;
      const float4 got = *reinterpret_cast<const float4*>(cluster.map_shared_rank(part, q) + row * kPitch + col);
      sum.x += got.x;
      sum.y += got.y;
      sum.z += got.z;
      sum.w += got.w;
    }
    T* dst = v + int64_t(m0 + row) * p.v_stride + col;
    const float e4[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (col + e < g.rank) dst[e] = from_float<T>(e4[e]);
  }
  cluster_arrive();  // no CTA leaves while another may still read its partial tile
  cluster_wait();
#endif
}

// ------------------------------------------------------------------------------------------
// Launchers.
// The work list's shared memory, in 1 KB steps (up to 255 segments: 1 KB), so that launches of
// similar batches share one shared-memory size (and one cached occupancy).
size_t prefix_bytes(int num_seg) {
  return (size_t(num_seg + 1) * sizeof(int) + 1023) / 1024 * 1024;
}

// CTAs of `kernel` a SM at `smem` bytes, asked once per (kernel, size): an occupancy query costs
// microseconds of host time, which eager steps would pay per launch.
template <typename Kernel>
int cached_blocks_per_sm(Kernel kernel, size_t smem) {
  static size_t last_smem = 0;  // per instantiation
  static int last = 1;
  if (smem != last_smem) {
    last = blocks_per_sm(kernel, kThreads, smem);
    last_smem = smem;
  }
  return last;
}
// The rank class is the pool's stored rank rounded up to 16, 32, 64 or 128.
template <typename T, int KP>
cudaError_t launch_expand(const ExpandParams& p, const LaunchOptions& o) {
  constexpr int kBM = kExpandBM, kBN = kExpandBN;
  auto kernel = expand_pipe_kernel<T, KP>;
  const int S = ring_slots(stages_for(size_t(kBM * kBN + KP * kBN) * sizeof(T)));
  const size_t smem = size_t(S) * (kBM * kBN + KP * kBN) * sizeof(T) + prefix_bytes(p.seg.num_seg);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  // the CTAs that fit at once, at most one per tile
  const int64_t tiles = (int64_t(ceil_div(p.seg.num_rows, kBM)) + p.seg.num_seg) *
                        ceil_div(p.out_features, kBN);
  const int64_t resident = int64_t(o.num_sms) * cached_blocks_per_sm(kernel, smem);
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(tiles, resident)));
  return launch(kernel, dim3(grid), dim3(kThreads), smem, o.stream, false, p, S);
}

template <typename T, int KP>
cudaError_t launch_shrink(ShrinkParams p, const LaunchOptions& o) {
  auto kernel = shrink_pipe_kernel<T, KP>;
  const int S = ring_slots(stages_for(size_t(kBM * kBK + KP * kBK) * sizeof(T)));
  const size_t smem = size_t(S) * (kBM * kBK + KP * kBK) * sizeof(T) + prefix_bytes(p.seg.num_seg);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  p.ksplit = shrink_pipe_split(p.seg.num_rows, p.in_features,
                               o.num_sms * cached_blocks_per_sm(kernel, smem));
  const int units = ceil_div(p.seg.num_rows, kBM) + p.seg.num_seg;  // row blocks, at most
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = p.ksplit;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(units * p.ksplit);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = o.stream;
  cfg.attrs = attr;
  cfg.numAttrs = p.ksplit > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, p, S);
}

template <typename T>
cudaError_t expand_by_class(const ExpandParams& p, const LaunchOptions& o) {
  const int r = p.seg.max_rank;
  return r <= 16 ? launch_expand<T, 16>(p, o) : r <= 32 ? launch_expand<T, 32>(p, o)
         : r <= 64 ? launch_expand<T, 64>(p, o) : launch_expand<T, 128>(p, o);
}

template <typename T>
cudaError_t shrink_by_class(const ShrinkParams& p, const LaunchOptions& o) {
  const int r = p.seg.max_rank;
  return r <= 16 ? launch_shrink<T, 16>(p, o) : r <= 32 ? launch_shrink<T, 32>(p, o)
         : r <= 64 ? launch_shrink<T, 64>(p, o) : launch_shrink<T, 128>(p, o);
}

}  // namespace

// K-slices (= cluster size) for a shrink of num_rows rows: enough that the row blocks fill the
// resident CTAs, at most 8 (portable cluster size), each slice at least 2 stages of input.
// PUNICA_SHRINK_KSPLIT=N (diagnostics, read once) forces N (clamped the same way).
int shrink_pipe_split(int num_rows, int in_features, int resident_ctas) {
  static const char* env = std::getenv("PUNICA_SHRINK_KSPLIT");
  const int most = std::max(1, std::min(8, ceil_div(in_features, kBK) / 2));
  if (env && std::atoi(env) > 0) return std::min(most, std::atoi(env));
  const int blocks = std::max(1, ceil_div(num_rows, kBM));
  return std::max(1, std::min(most, resident_ctas / blocks));
}

// PUNICA_PREFILL (diagnostics, read once): unset, the expand runs pipelined and the shrink on
// its tensor-core kernel (measured faster for the shrink: see ring_slots); "mma" both on the
// tensor-core kernels; "pipe" both pipelined.
int prefill_mode() {
  static const char* env = std::getenv("PUNICA_PREFILL");
  static const int mode = !env ? 1 : std::strcmp(env, "mma") == 0 ? 0 : std::strcmp(env, "pipe") == 0 ? 2 : 1;
  return mode;
}

bool prefill_pipe(const LaunchOptions& o, bool shrink) {
  return o.vec && o.sm >= 90 && prefill_mode() > (shrink ? 1 : 0);
}

cudaError_t shrink_pipe(DType dt, const ShrinkParams& p, const LaunchOptions& o) {
  if (!o.vec || p.seg.max_rank > kMaxRank) return cudaErrorInvalidValue;
  return dt == DType::kHalf ? shrink_by_class<__half>(p, o) : shrink_by_class<__nv_bfloat16>(p, o);
}

cudaError_t expand_pipe(DType dt, const ExpandParams& p, const LaunchOptions& o) {
  if (!o.vec || p.seg.max_rank > kMaxRank) return cudaErrorInvalidValue;
  return dt == DType::kHalf ? expand_by_class<__half>(p, o) : expand_by_class<__nv_bfloat16>(p, o);
}

}  // namespace punica
