// SGMV shrink: v[rows, :r] = x[rows] @ a[slot, layer, :r].T for every segment (hidden -> rank).
//
// Two kernels:
//  * shrink_simt_kernel (decode, memory-bound): a work item is RT rank rows of one segment over
//    the whole input dimension, so every weight byte is read once and there is no cross-CTA
//    reduction. 256 threads stream the rows with 16-byte loads, U iterations in flight.
//  * shrink_mma_kernel (prefill, compute-bound): 128-row x 128-rank tiles on tensor cores, a
//    3-stage cp.async pipeline over the input dimension, split-K across CTAs when the segments
//    alone do not fill the GPU (each K-slice stores its fp32 partial tile to its own plane of a
//    workspace, then a finalize kernel sums the planes in slice order into v).
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "sgmv_common.cuh"

namespace punica {
namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------------------------------------------
// Decode kernel.
template <typename T, bool VEC, int RT = 4, int MT = 4, int U = 2>
__global__ void __launch_bounds__(kThreads) shrink_simt_kernel(ShrinkParams p) {
  extern __shared__ int prefix[];  // [num_seg + 1]
  __shared__ float red[kThreads / 32][MT * RT];
  pdl_launch_dependents();

  const SegmentArgs& sa = p.seg;
  const int K = p.in_features;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  T* __restrict__ v = static_cast<T*>(p.v);

  const int total = build_worklist(prefix, sa.num_seg, [&](int s) {
    const Segment g = load_segment(sa, s);
    return g.active() ? ceil_div(g.rank, RT) : 0;
  });
  if (VEC && int(blockIdx.x) < total) {  // warm L2 with this CTA's first weight rows
    const int s = find_segment(prefix, sa.num_seg, blockIdx.x);
    const Segment g = load_segment(sa, s);
    const int j0 = (blockIdx.x - prefix[s]) * RT;
    const int rt = min(RT, g.rank - j0);
    prefetch_span_l2(w + g.slot * p.w_slot_stride + int64_t(j0) * K, int64_t(rt) * K * sizeof(T));
  }
  // The first batch of weight loads is issued before waiting for the previous kernel (they do
  // not depend on it); x may be written by that kernel and v read by it, so both come after.
  bool waited = false;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int K8 = VEC ? K / 8 : ceil_div(K, 8);
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const int s = find_segment(prefix, sa.num_seg, t);
    const Segment g = load_segment(sa, s);
    const int j0 = (t - prefix[s]) * RT;
    const int rt = min(RT, g.rank - j0);
    const T* wp = w + g.slot * p.w_slot_stride + int64_t(j0) * K;

    for (int row0 = g.start; row0 < g.end; row0 += MT) {
      const int mt = min(MT, g.end - row0);
      float acc[MT][RT];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < RT; ++j) acc[i][j] = 0.f;

      for (int k8 = tid; k8 < K8; k8 += kThreads * U) {
        // Issue all loads of U iterations before any math: U * (RT + MT) 16-byte loads in flight.
        uint4 wr[U][RT], xr[U][MT];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int kk = k8 + u * kThreads;
          const bool ok = kk < K8;
          const int nvalid = K - kk * 8;
#pragma unroll
          for (int j = 0; j < RT; ++j)
            wr[u][j] = (ok && j < rt) ? load8<T, VEC>(wp + int64_t(j) * K + kk * 8, nvalid)
                                      : make_uint4(0, 0, 0, 0);
        }
        if (!waited) {
          pdl_wait();
          waited = true;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int kk = k8 + u * kThreads;
          const bool ok = kk < K8;
          const int nvalid = K - kk * 8;
#pragma unroll
          for (int i = 0; i < MT; ++i)
            xr[u][i] = (ok && i < mt)
                           ? load8<T, VEC>(x + int64_t(row0 + i) * p.x_stride + kk * 8, nvalid)
                           : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            if (i >= mt) continue;
            float xf[8];
            unpack8<T>(xr[u][i], xf);
#pragma unroll
            for (int j = 0; j < RT; ++j) {
              float wf[8];
              unpack8<T>(wr[u][j], wf);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[i][j] = fmaf(xf[e], wf[e], acc[i][j]);
            }
          }
        }
      }
      if (!waited) {  // threads past the end of K: v is written below
        pdl_wait();
        waited = true;
      }

      // Block reduction: warp shuffles, then one value per warp through shared memory.
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < RT; ++j) {
          float a = acc[i][j];
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
          if (lane == 0) red[warp][i * RT + j] = a;
        }
      __syncthreads();
      if (tid < MT * RT) {
        const int i = tid / RT, j = tid % RT;
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < kThreads / 32; ++k) sum += red[k][tid];
        if (i < mt && j < rt) v[int64_t(row0 + i) * p.v_stride + j0 + j] = from_float<T>(sum);
      }
      __syncthreads();
    }
  }
  if (!waited) pdl_wait();  // a CTA must not finish before the kernel it depends on
}

// ------------------------------------------------------------------------------------------
// Prefill kernel: C[BM x BN] = X[BM x K] . W[BN x K]^T; both operands K-contiguous ("NT").
constexpr int kBM = 128, kBN = 128, kBK = 64, kStages = 3;
constexpr int kTileElems = kBM * kBK;                        // X tile; the W tile is the same size
constexpr size_t kMmaSmem = size_t(kStages) * 2 * kTileElems * 2;  // 96 KB

template <typename T>
__global__ void __launch_bounds__(kThreads) shrink_mma_kernel(ShrinkParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Xs = reinterpret_cast<T*>(smem_raw);                     // [kStages][kBM][kBK] swizzled
  T* Ws = Xs + kStages * kTileElems;                          // [kStages][kBN][kBK] swizzled
  int* prefix = reinterpret_cast<int*>(smem_raw + kMmaSmem);  // [num_seg + 1]

  const SegmentArgs& sa = p.seg;
  const int K = p.in_features, KT = ceil_div(K, kBK), ksplit = p.ksplit;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2;  // 4 warps along rows x 2 along ranks; 32 x 64 each

  const int total = build_worklist(prefix, sa.num_seg, [&](int s) {
    const Segment g = load_segment(sa, s);
    return g.active() ? ceil_div(g.end - g.start, kBM) * ksplit : 0;
  });

  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const int s = find_segment(prefix, sa.num_seg, t);
    const Segment g = load_segment(sa, s);
    const int local = t - prefix[s];
    const int m0 = g.start + (local / ksplit) * kBM;
    const int kp = local % ksplit;
    const int kt0 = kp * KT / ksplit, kt1 = (kp + 1) * KT / ksplit, nk = kt1 - kt0;
    const int rows16 = min(kBN, ceil_div(g.rank, 16) * 16);  // W rows that feed valid ranks
    const T* wp = w + g.slot * p.w_slot_stride;

    auto load_stage = [&](int stage, int kt) {
      const int k0 = kt * kBK;
      T* xs = Xs + stage * kTileElems;
      T* ws = Ws + stage * kTileElems;
#pragma unroll
      for (int i = tid; i < kBM * (kBK / 8); i += kThreads) {
        const int row = i >> 3, k = (i & 7) * 8;
        const bool ok = m0 + row < g.end && k0 + k < K;
        cp_async16(xs + swz(row, k, kBK), ok ? x + int64_t(m0 + row) * p.x_stride + k0 + k : x,
                   ok ? 16 : 0);
      }
      for (int i = tid; i < rows16 * (kBK / 8); i += kThreads) {  // rows >= rank: zeros, unread
        const int row = i >> 3, k = (i & 7) * 8;
        const bool ok = row < g.rank && k0 + k < K;
        cp_async16(ws + swz(row, k, kBK), ok ? wp + int64_t(row) * K + k0 + k : wp, ok ? 16 : 0);
      }
    };

    float acc[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < nk) load_stage(st, kt0 + st);
      cp_async_commit();
    }
    for (int it = 0; it < nk; ++it) {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      const T* xs = Xs + (it % kStages) * kTileElems;
      const T* ws = Ws + (it % kStages) * kTileElems;
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks) {
        uint32_t af[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
          ldmatrix_x4(af[mi], xs + swz(wm * 32 + mi * 16 + (lane & 15), ks * 16 + (lane >> 4) * 8, kBK));
#pragma unroll
        for (int np = 0; np < 4; ++np) {  // 16 ranks per ldmatrix; skip those past the rank
          const int n0 = wn * 64 + np * 16;
          if (n0 >= g.rank) continue;
          uint32_t bf[4];
          ldmatrix_x4(bf, ws + swz(n0 + (lane & 7) + ((lane >> 4) << 3),
                                   ks * 16 + ((lane >> 3) & 1) * 8, kBK));
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma_16816<T>(acc[mi][2 * np], af[mi], bf[0], bf[1]);
            mma_16816<T>(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
          }
        }
      }
      const int nxt = it + kStages - 1;
      if (nxt < nk) load_stage(nxt % kStages, kt0 + nxt);
      cp_async_commit();
    }
    cp_async_wait<0>();
    __syncthreads();  // the next item's prologue overwrites the stages

    // Epilogue: each thread holds rows (lane/4, +8) x ranks (2*(lane%4), +1) of each 16x8 tile.
    T* v = static_cast<T*>(p.v);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 8; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + wm * 32 + mi * 16 + (lane >> 2) + (e >> 1) * 8;
          const int col = wn * 64 + ni * 8 + (lane & 3) * 2 + (e & 1);
          if (row >= g.end || col >= g.rank) continue;
          if (ksplit == 1)
            v[int64_t(row) * p.v_stride + col] = from_float<T>(acc[mi][ni][e]);
          else if (p.ws_planes > 1)  // this slice's own plane: a plain store
            p.ws[kp * p.ws_plane_stride + int64_t(row) * p.ws_stride + col] = acc[mi][ni][e];
          else
            atomicAdd(p.ws + int64_t(row) * p.ws_stride + col, acc[mi][ni][e]);
        }
  }
}

// Split-K: v[rows, :r] = the sum of the planes' ws[rows, :r], in plane (K-slice) order. The
// segment's rows x ranks as one flat range, 256 threads a CTA and a few elements a thread (one
// CTA per row of a segment, 128 threads of which the rank's worked, took 5.4 us for 4096 x 64
// on an H200: CTA launches, not bytes).
constexpr int kFinalizeThreads = 256, kFinalizePerThread = 4;
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads) shrink_finalize_kernel(ShrinkParams p) {
  const Segment g = load_segment(p.seg, blockIdx.y);
  if (!g.active()) return;
  T* v = static_cast<T*>(p.v);
  const int n = (g.end - g.start) * g.rank;
  for (int i = blockIdx.x * kFinalizeThreads + threadIdx.x; i < n; i += gridDim.x * kFinalizeThreads) {
    const int row = g.start + i / g.rank, col = i % g.rank;
    const float* src = p.ws + int64_t(row) * p.ws_stride + col;
    float sum = 0.f;
    for (int q = 0; q < p.ws_planes; ++q) sum += src[q * p.ws_plane_stride];
    v[int64_t(row) * p.v_stride + col] = from_float<T>(sum);
  }
}

template <typename T, bool VEC>
cudaError_t launch_simt(const ShrinkParams& p, const LaunchOptions& o) {
  constexpr int RT = 4;
  auto kernel = shrink_simt_kernel<T, VEC, RT>;
  const size_t smem = size_t(p.seg.num_seg + 1) * sizeof(int);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  static int occ = 0;  // cached per instantiation; only sizes the persistent grid
  if (occ == 0) occ = blocks_per_sm(kernel, kThreads, smem);
  const int upper = p.seg.num_seg * ceil_div(p.seg.max_rank, RT);
  const int grid = max(1, min(upper, o.num_sms * occ));
  return launch(kernel, dim3(grid), dim3(kThreads), smem, o.stream, o.pdl, p);
}

template <typename T>
cudaError_t launch_mma(const ShrinkParams& p, const LaunchOptions& o) {
  auto kernel = shrink_mma_kernel<T>;
  const size_t smem = kMmaSmem + size_t(p.seg.num_seg + 1) * sizeof(int);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  static int occ = 0;
  if (occ == 0) occ = blocks_per_sm(kernel, kThreads, smem);
  const int grid = persistent_grid(row_tiles_at_most(p.seg, kBM, p.ksplit), o.num_sms, occ);
  err = launch(kernel, dim3(grid), dim3(kThreads), smem, o.stream, false, p);
  if (err != cudaSuccess || p.ksplit == 1) return err;
  // CTAs for an average segment at the pool's max rank (the loop covers longer ones)
  const int64_t avg = int64_t(ceil_div(p.seg.num_rows, p.seg.num_seg)) * p.seg.max_rank;
  const int gx = int(std::max<int64_t>(
      1, std::min<int64_t>(65535, (avg + kFinalizeThreads * kFinalizePerThread - 1) /
                                      (kFinalizeThreads * kFinalizePerThread))));
  return launch(shrink_finalize_kernel<T>, dim3(gx, p.seg.num_seg), dim3(kFinalizeThreads), 0,
                o.stream, false, p);
}

}  // namespace

cudaError_t shrink_simt(DType dt, const ShrinkParams& p, const LaunchOptions& o) {
  if (dt == DType::kHalf)
    return o.vec ? launch_simt<__half, true>(p, o) : launch_simt<__half, false>(p, o);
  return o.vec ? launch_simt<__nv_bfloat16, true>(p, o) : launch_simt<__nv_bfloat16, false>(p, o);
}

// Enough K-slices that the work items fill the GPU's two CTAs per SM in one wave (a second,
// partial wave would double the time), each slice at least 4 k-tiles long.
// PUNICA_SHRINK_KSPLIT=N (diagnostics, read once) forces N slices (clamped to 1..k-tiles).
int shrink_mma_ksplit(int num_rows, int in_features, int num_sms) {
  static const char* env = std::getenv("PUNICA_SHRINK_KSPLIT");
  if (env && std::atoi(env) > 0) return max(1, min(std::atoi(env), ceil_div(in_features, kBK)));
  const int mtiles = max(1, ceil_div(num_rows, kBM));
  const int most = max(1, ceil_div(in_features, kBK) / 4);
  return max(1, min(most, (2 * num_sms) / mtiles));
}

// A plane per K-slice rather than fp32 atomics into one zeroed plane: measured on an H200
// (benchmarks/diag/prefill_ab.py, 4096 rows of 7B, 8 K-slices), rank 64 33 -> 27 us, rank 16
// 20.8 -> 19.5 us, and the sums land in a fixed order. PUNICA_SHRINK_ATOMIC=1 (diagnostics)
// keeps the single plane of atomics.
int shrink_mma_ws_planes(int ksplit) {
  static const char* env = std::getenv("PUNICA_SHRINK_ATOMIC");
  return env && std::strcmp(env, "1") == 0 ? 1 : ksplit;
}

cudaError_t shrink_mma(DType dt, const ShrinkParams& p, const LaunchOptions& o) {
  if (!o.vec) return cudaErrorInvalidValue;
  return dt == DType::kHalf ? launch_mma<__half>(p, o) : launch_mma<__nv_bfloat16>(p, o);
}

}  // namespace punica
