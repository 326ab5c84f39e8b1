// Fused LoRA decode: y[rows, off_p : off_p + out_p] += (x[rows] @ a_p[slot, :r].T) @ b_p[slot, :r]
// for up to kMaxFusedProj projections p that read the same x (q/k/v, gate/up), in one launch.
//
// Why: a decode step's LoRA work is many tiny memory-bound jobs (a rank-16 q projection of one
// adapter is 256 KB). As a shrink kernel + an expand kernel per projection, the fixed cost of
// each launch and of the dependency between the two (the expand waits for the whole shrink)
// was most of the time. Here one thread-block cluster per (segment, projection):
//   1. each CTA asks L2 for all of its weight bytes at once (its K-slice of a, its column
//      slice of b), so the HBM pipe fills in the first microsecond;
//   2. each CTA reduces v over its K-slice into shared memory;
//   3. after a cluster barrier each CTA sums the cluster's partial v through distributed
//      shared memory (DSMEM) and rounds it to the element type, as the two-kernel path does;
//   4. each CTA expands its own column slice of b (fp32 sums) and adds it to y with reductions
//      at L2 (red.global.add: the SM never reads y; the streamed path reads, adds and writes).
// No grid-wide dependency and no v round trip through global memory. sm_90 only (clusters).
#include <cooperative_groups.h>

#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "sgmv_common.cuh"

namespace punica {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int RJ = 2;   // rank rows a warp reduces at a time (shrink)
constexpr int KU = 4;   // 16-byte loads per rank row in flight (shrink)
constexpr int NU = 8;   // rank rows in flight (expand)

__host__ __device__ constexpr int round8(int v) { return (v + 7) & ~7; }

// Diagnostic stamps by the CTA's first thread (TIMELINE_STAMP, sgmv_common.cuh).
#define TL_STAMP(p, k) \
  do {                        \
    if (threadIdx.x == 0) TIMELINE_STAMP(p, k); \
  } while (0)

// Shared memory of one CTA: the larger of the staged path (a and b slices of rank_block rows,
// x and y slices; y_fp32: the y slice as fp32 sums, for x_ready and the chunked path, which use
// the same layout) and the streaming path (x slice, the rank groups' partial sums); then the
// partial and full v. MT: rows of a segment per pass (1 for decode batches, else 4).
__host__ __device__ constexpr size_t staged_y_offset(int MT, int kc, int nc, int rank_block,
                                                     size_t elem) {
  return (size_t(rank_block) * (kc + nc) + size_t(MT) * kc) * elem;
}
__host__ __device__ constexpr size_t staged_y_bytes(int MT, int nc, size_t elem, bool fp32) {
  return size_t(MT) * nc * (fp32 ? sizeof(float) : elem);
}
__host__ __device__ constexpr size_t fused_smem_bytes(int MT, int kc, int nc, int rank_block,
                                                      int elem, bool y_fp32) {
  return (staged_y_offset(MT, kc, nc, rank_block, elem) + staged_y_bytes(MT, nc, elem, y_fp32) >
                  size_t(MT) * kc * elem + size_t(MT) * 8 * kThreads * sizeof(float)
              ? staged_y_offset(MT, kc, nc, rank_block, elem) + staged_y_bytes(MT, nc, elem, y_fp32)
              : size_t(MT) * kc * elem + size_t(MT) * 8 * kThreads * sizeof(float)) +
         2 * size_t(MT) * kMaxRank * sizeof(float);
}

// Shared memory the staged weight slices may take: ~64 KB keeps 3 CTAs on an SM.
constexpr size_t kStageBudget = 64 * 1024;

template <typename T>
__device__ __forceinline__ void add_to_row(T* dst, const float (&acc)[8], bool accumulate) {
  float cur[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (accumulate) unpack8<T>(*reinterpret_cast<const uint4*>(dst), cur);
#pragma unroll
  for (int e = 0; e < 8; ++e) cur[e] += acc[e];
  *reinterpret_cast<uint4*>(dst) = pack8<T>(cur);
}

// acc[m][e] = sum_{j in [jb, je)} vfull[m][j] * B[j][col + e]   (B: rows of N elements)
template <typename T, int MT>
__device__ __forceinline__ void expand_cols(float (&acc)[MT][8], const T* bp, int64_t N,
                                            const float* vfull, int jb, int je, int mt, bool ok) {
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[m][e] = 0.f;
  if (!ok) return;
  for (int j = jb; j < je; j += NU) {
    uint4 wr[NU];
#pragma unroll
    for (int u = 0; u < NU; ++u)
      wr[u] = j + u < je ? __ldg(reinterpret_cast<const uint4*>(bp + (j + u) * N))
                         : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      if (j + u >= je) continue;
      float wf[8];
      unpack8<T>(wr[u], wf);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= mt) continue;
        const float vv = vfull[m * kMaxRank + j + u];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m][e] = fmaf(vv, wf[e], acc[m][e]);
      }
    }
  }
}

// What one CTA works on: its K-slice of a and column slice of b for one (segment, projection).
template <typename T>
struct Slice {
  const T* A;          // &a[slot, layer, 0, k0]; rank row j at + j * K
  const T* B;          // &b[slot, layer, 0, n0]; rank row j at + j * N
  T* yrow;             // &y[0, col_offset + n0]
  int64_t K, N;
  int k0, nk8, nn8;    // slice start in K; 16-byte chunks of the K-slice and the column slice
  int Kc, Nc;          // K-slice and column-slice pitch
  int start, end, r;   // the segment's rows and rank
};

// Partial v over the K-slice for rows row0..row0+mt: part[m][j] = xs[m] . As[j] (both in shared
// memory, or As in global memory with a_stride = K); warp w reduces rank rows w*RJ...
template <typename T, int MT, bool GLOBAL_A>
__device__ __forceinline__ void shrink_partial(float* part, const T* xs, int Kc, const T* As,
                                               int64_t a_stride, int nk8, int r, int mt) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int j0 = warp * RJ; j0 < r; j0 += kWarps * RJ) {
    float acc[MT][RJ];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int jj = 0; jj < RJ; ++jj) acc[m][jj] = 0.f;
    const T* wrow = As + int64_t(j0) * a_stride;
    constexpr int U = GLOBAL_A ? KU : 1;   // global loads: several in flight per lane
    for (int c = lane; c < nk8; c += 32 * U) {
      uint4 wr[U][RJ];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int jj = 0; jj < RJ; ++jj) {
          const int cc = c + u * 32;
          const T* src = wrow + int64_t(jj) * a_stride + cc * 8;
          wr[u][jj] = cc < nk8 && j0 + jj < r
                          ? (GLOBAL_A ? __ldg(reinterpret_cast<const uint4*>(src))
                                      : *reinterpret_cast<const uint4*>(src))
                          : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int cc = c + u * 32;
        if (cc >= nk8) continue;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m >= mt) continue;
          float xf[8];
          unpack8<T>(*reinterpret_cast<const uint4*>(xs + m * Kc + cc * 8), xf);
#pragma unroll
          for (int jj = 0; jj < RJ; ++jj) {
            float wf[8];
            unpack8<T>(wr[u][jj], wf);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m][jj] = fmaf(xf[e], wf[e], acc[m][jj]);
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int jj = 0; jj < RJ; ++jj) {
        float a = acc[m][jj];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane == 0 && m < mt && j0 + jj < r) part[m * kMaxRank + j0 + jj] = a;
      }
  }
}

// acc[m] += sum_{j in [j0, je)} vfull[m][j] * B[j - j0][col pair], B's rows from bcol with a
// pitch of pitch2 pairs: the expand of one column pair over a run of rank rows.
template <typename T, int MT>
__device__ __forceinline__ void expand_pair(float2 (&acc)[MT], const typename Pair<T>::type* bcol,
                                            int pitch2, const float* vfull, int j0, int je) {
#pragma unroll 4
  for (int j = j0; j < je; ++j) {
    const float2 w = to_float2(bcol[(j - j0) * pitch2]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float vv = vfull[m * kMaxRank + j];
      acc[m].x = fmaf(vv, w.x, acc[m].x);
      acc[m].y = fmaf(vv, w.y, acc[m].y);
    }
  }
}

// y[row0 + m, slice] (+)= delta[m] for m < mt: the fp32 delta of each thread's own column pairs
// (shared memory, row pitch Nc): y += round(delta) by reductions at L2 when p.y_red (else y is
// read, added to in fp32 and rounded once); without accumulate y = round(delta).
template <typename T, int MT>
__device__ __forceinline__ void add_delta_rows(const FusedParams& p, const Slice<T>& sl,
                                               const float* delta, int Nc, int row0, int mt) {
  using T2 = typename Pair<T>::type;
  for (int c2 = threadIdx.x; c2 < sl.nn8 * 4; c2 += kThreads)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= mt) continue;
      T2* dst = reinterpret_cast<T2*>(sl.yrow + int64_t(row0 + m) * p.y_stride) + c2;
      const float2 d = reinterpret_cast<const float2*>(delta + m * Nc)[c2];
      if (p.accumulate && p.y_red) {
        red_add_pair<T>(dst, d);
        continue;
      }
      const float2 cur = p.accumulate ? to_float2(*dst) : make_float2(0.f, 0.f);
      T2 out;
      out.x = from_float<T>(cur.x + d.x);
      out.y = from_float<T>(cur.y + d.y);
      *dst = out;
    }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // clusters exist from sm_90
// The cluster's partials summed in rank order (deterministic) and rounded to T like v; then a
// release-arrive that tells the others this CTA has finished reading their partials.
template <typename T>
__device__ __forceinline__ void reduce_cluster(cg::cluster_group& cluster, float* part,
                                               float* vfull, int r, int mt) {
  cluster_arrive();
  cluster_wait();
  const int C = int(cluster.num_blocks());
  for (int i = threadIdx.x; i < mt * r; i += kThreads) {
    const int m = i / r, j = i % r;
    // up to 8 remote loads in flight before the adds (same order of sums as one at a time);
    // measured: the span barely changes (~1-1.4 us with its two cluster barriers,
    // benchmarks/diag/fused_timeline.cu and cluster_barrier.cu)
    float sum = 0.f;
    for (int q0 = 0; q0 < C; q0 += 8) {
      float got[8];
#pragma unroll
      for (int q = 0; q < 8; ++q)
        got[q] = q0 + q < C ? cluster.map_shared_rank(part, q0 + q)[m * kMaxRank + j] : 0.f;
#pragma unroll
      for (int q = 0; q < 8; ++q)
        if (q0 + q < C) sum += got[q];
    }
    vfull[m * kMaxRank + j] = to_float(from_float<T>(sum));
  }
  cluster_arrive();
  __syncthreads();
}

// Staged path (rank <= rank_block): every weight byte of the CTA is requested at entry with
// cp.async into shared memory, x and y right after the dependency wait, so the CTA's whole
// chain is one memory round trip, the shrink, a cluster barrier and the expand. (Bulk copies
// issued by one warp, one per rank row, were measured 5-10% slower than the threads' 16-byte
// cp.async here, on an H200.)
// p.x_ready (x final before the launch, see FusedParams): the first rows' x is copied with a
// (b follows as a second copy group) and their whole delta (shrink, cluster sum, expand) is
// computed before the wait into fp32 shared memory; after the wait only y is updated
// (add_delta_rows), so a chain of such launches overlaps all but that last update of y with the
// launch before.
template <typename T, int MT>
__device__ void fused_staged(const FusedParams& p, const Slice<T>& sl, cg::cluster_group& cluster,
                             unsigned char* smem) {
  using T2 = typename Pair<T>::type;
  const int tid = threadIdx.x, RB = p.rank_block, Kc = sl.Kc, Nc = p.n_pitch, r = sl.r;
  T* As = reinterpret_cast<T*>(smem);   // [RB][Kc]
  T* Bs = As + RB * Kc;                 // [RB][Nc]
  T* xs = Bs + RB * Nc;                 // [MT][Kc]
  T* ys = xs + MT * Kc;                 // [MT][Nc] (x_ready: the first rows' fp32 delta)
  float* dl = reinterpret_cast<float*>(ys);
  float* part = reinterpret_cast<float*>(smem + staged_y_offset(MT, Kc, Nc, RB, sizeof(T)) +
                                         staged_y_bytes(MT, Nc, sizeof(T), p.x_ready));
  float* vfull = part + MT * kMaxRank;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  for (int i = tid; i < r * sl.nk8; i += kThreads) {
    const int j = i / sl.nk8, c = i % sl.nk8;
    cp_async16(As + j * Kc + c * 8, sl.A + j * sl.K + c * 8, 16);
  }
  // x_ready: the first rows' x travels with a, ahead of b, so that the shrink and the cluster
  // barrier (which waits for the cluster's slowest CTA) overlap b's landing (measured on an
  // H200, 32 rank-16 jobs of 7B: 3-6% faster a launch than one group for all)
  const bool b_late = p.x_ready && sl.start < sl.end;
  if (b_late) {
    const int mt = min(MT, sl.end - sl.start);
    for (int i = tid; i < mt * sl.nk8; i += kThreads) {
      const int m = i / sl.nk8, c = i % sl.nk8;
      cp_async16(xs + m * Kc + c * 8, x + int64_t(sl.start + m) * p.x_stride + sl.k0 + c * 8, 16);
    }
  }
  cp_async_commit();
  for (int i = tid; i < r * sl.nn8; i += kThreads) {
    const int j = i / sl.nn8, c = i % sl.nn8;
    cp_async16(Bs + j * Nc + c * 8, sl.B + j * sl.N + c * 8, 16);
  }
  cp_async_commit();
  TL_STAMP(p, 2);
  bool first = true, waited = false;
  if (!p.x_ready) {
    pdl_wait();  // x and y may be written by the previous kernel
    waited = true;
    TL_STAMP(p, 3);
  }
  const int nn2 = sl.nn8 * 4;
  for (int row0 = sl.start; row0 < sl.end; row0 += MT) {
    const int mt = min(MT, sl.end - row0);
    const bool early = !waited;  // this pass's delta is computed before the dependency wait
    const bool b_pending = first && b_late;  // x is in with a; b may still be landing
    for (int i = tid; !b_pending && i < mt * sl.nk8; i += kThreads) {
      const int m = i / sl.nk8, c = i % sl.nk8;
      cp_async16(xs + m * Kc + c * 8, x + int64_t(row0 + m) * p.x_stride + sl.k0 + c * 8, 16);
    }
    for (int i = tid; !early && p.accumulate && !p.y_red && i < mt * sl.nn8; i += kThreads) {
      const int m = i / sl.nn8, c = i % sl.nn8;
      cp_async16(ys + m * Nc + c * 8, sl.yrow + int64_t(row0 + m) * p.y_stride + c * 8, 16);
    }
    if (b_pending) {
      cp_async_wait<1>();  // a and x
    } else {
      cp_async_commit();
      cp_async_wait<0>();
    }
    if (!first) cluster_wait();  // the cluster has finished reading the previous partials
    first = false;
    __syncthreads();
    TL_STAMP(p, 4);
#ifdef PUNICA_DIAG_LOADS_ONLY  // benchmarks/diag/fused_timeline.cu only: the copies, no math
    cp_async_wait<0>();
    if (!waited) pdl_wait();
    return;
#endif
    shrink_partial<T, MT, false>(part, xs, Kc, As, Kc, sl.nk8, r, mt);
    TL_STAMP(p, 7);
    reduce_cluster<T>(cluster, part, vfull, r, mt);
    if (b_pending) {
      cp_async_wait<0>();  // b
      __syncthreads();
    }
    TL_STAMP(p, 5);
    // expand: each thread owns column pairs of the slice (no rank split, no reduction)
    for (int c2 = tid; c2 < nn2; c2 += kThreads) {
      float2 acc[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m] = make_float2(0.f, 0.f);
      expand_pair<T, MT>(acc, reinterpret_cast<const T2*>(Bs) + c2, Nc / 2, vfull, 0, r);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m >= mt) continue;
        if (early) {  // kept for after the wait (each thread reads back its own columns)
          reinterpret_cast<float2*>(dl + m * Nc)[c2] = acc[m];
          continue;
        }
        if (p.accumulate && p.y_red) {
          red_add_pair<T>(reinterpret_cast<T2*>(sl.yrow + int64_t(row0 + m) * p.y_stride) + c2,
                          acc[m]);
          continue;
        }
        const float2 cur = p.accumulate
                               ? to_float2(reinterpret_cast<const T2*>(ys + m * Nc)[c2])
                               : make_float2(0.f, 0.f);
        T2 out;
        out.x = from_float<T>(cur.x + acc[m].x);
        out.y = from_float<T>(cur.y + acc[m].y);
        reinterpret_cast<T2*>(sl.yrow + int64_t(row0 + m) * p.y_stride)[c2] = out;
      }
    }
    if (early) {
      pdl_wait();  // y may be read or written by the previous kernel
      waited = true;
      TL_STAMP(p, 3);
      add_delta_rows<T, MT>(p, sl, dl, Nc, row0, mt);
    }
    __syncthreads();  // xs, ys and vfull are reused by the next rows
  }
  if (!waited) pdl_wait();  // no rows: still no exit before the previous kernel has finished
  cluster_wait();  // no CTA leaves while another may still read its partials
  TL_STAMP(p, 6);
}

// Chunked path (rank > rank_block): the staged region (rank_block rows of both slices) becomes
// a ring of two buffers that the rank rows of a (for the shrink) and then of b (for the expand)
// pass through in blocks, every block requested two ahead by all threads' cp.async; the expand
// sums into fp32 shared memory (each thread its own columns), so the sums keep the staged
// path's order. x_ready as in the staged path: the first rows' delta before the wait.
template <typename T, int MT>
__device__ void fused_chunked(const FusedParams& p, const Slice<T>& sl, cg::cluster_group& cluster,
                              unsigned char* smem) {
  using T2 = typename Pair<T>::type;
  const int tid = threadIdx.x, RB = p.rank_block, Kc = sl.Kc, Nc = p.n_pitch, r = sl.r;
  T* ring = reinterpret_cast<T*>(smem);                 // [RB][Kc] + [RB][Nc], as two buffers
  T* xs = ring + RB * (Kc + Nc);                        // [MT][Kc]
  float* acc_s = reinterpret_cast<float*>(xs + MT * Kc);  // [MT][Nc]
  float* part = reinterpret_cast<float*>(smem + staged_y_offset(MT, Kc, Nc, RB, sizeof(T)) +
                                         staged_y_bytes(MT, Nc, sizeof(T), true));
  float* vfull = part + MT * kMaxRank;
  const int total = RB * (Kc + Nc), widest = max(Kc, Nc);
  const int nbuf = total >= 2 * widest ? 2 : 1;
  const int buf = (total / nbuf) & ~7;                   // elements per buffer, 16-byte rows
  const int hA = buf / Kc, hB = buf / Nc;                // rank rows per block of a / of b
  const int nA = ceil_div(r, hA), nt = nA + ceil_div(r, hB);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int nn2 = sl.nn8 * 4;
  auto issue = [&](int t) {  // block t into buffer t % nbuf (an empty group past the end)
    if (t < nt) {
      T* dst = ring + (t % nbuf) * buf;
      const bool is_a = t < nA;
      const int j0 = is_a ? t * hA : (t - nA) * hB;
      const int rows = min(r - j0, is_a ? hA : hB), n8 = is_a ? sl.nk8 : sl.nn8;
      const int pitch = is_a ? Kc : Nc;
      const T* src = is_a ? sl.A + int64_t(j0) * sl.K : sl.B + int64_t(j0) * sl.N;
      const int64_t stride = is_a ? sl.K : sl.N;
      for (int i = tid; i < rows * n8; i += kThreads) {
        const int j = i / n8, c = i % n8;
        cp_async16(dst + j * pitch + c * 8, src + j * stride + c * 8, 16);
      }
    }
    cp_async_commit();
  };
  bool first = true, waited = false;
  for (int row0 = sl.start; row0 < sl.end; row0 += MT) {
    const int mt = min(MT, sl.end - row0);
    if (!first) cluster_wait();  // the cluster has finished reading the previous partials
    __syncthreads();             // (and every thread is done with the ring and xs)
    for (int t = 0; t < nbuf; ++t) issue(t);  // weights never depend on the previous kernel
    if (first && !p.x_ready) {
      pdl_wait();  // x and y may be written by the previous kernel
      waited = true;
    }
    const bool early = !waited;
    for (int i = tid; i < mt * sl.nk8; i += kThreads) {
      const int m = i / sl.nk8, c = i % sl.nk8;
      cp_async16(xs + m * Kc + c * 8, x + int64_t(row0 + m) * p.x_stride + sl.k0 + c * 8, 16);
    }
    cp_async_commit();
    for (int c2 = tid; c2 < nn2; c2 += kThreads)
#pragma unroll
      for (int m = 0; m < MT; ++m) reinterpret_cast<float2*>(acc_s + m * Nc)[c2] = make_float2(0.f, 0.f);
    first = false;
    for (int t = 0; t < nt; ++t) {
      if (t == 0 || nbuf == 1) cp_async_wait<0>();
      else cp_async_wait<1>();
      __syncthreads();
      const T* blk = ring + (t % nbuf) * buf;
      if (t < nA) {
        const int j0 = t * hA;
        shrink_partial<T, MT, false>(part + j0, xs, Kc, blk, Kc, sl.nk8, min(r - j0, hA), mt);
        if (t == nA - 1) reduce_cluster<T>(cluster, part, vfull, r, mt);
      } else {
        const int j0 = (t - nA) * hB, je = min(r, j0 + hB);
        for (int c2 = tid; c2 < nn2; c2 += kThreads) {
          float2 acc[MT];
#pragma unroll
          for (int m = 0; m < MT; ++m) acc[m] = reinterpret_cast<const float2*>(acc_s + m * Nc)[c2];
          expand_pair<T, MT>(acc, reinterpret_cast<const T2*>(blk) + c2, Nc / 2, vfull, j0, je);
#pragma unroll
          for (int m = 0; m < MT; ++m) reinterpret_cast<float2*>(acc_s + m * Nc)[c2] = acc[m];
        }
      }
      __syncthreads();  // the buffer is free again
      issue(t + nbuf);
    }
    if (early) {
      pdl_wait();  // y may be read or written by the previous kernel
      waited = true;
    }
    add_delta_rows<T, MT>(p, sl, acc_s, Nc, row0, mt);
  }
  cp_async_wait<0>();         // the trailing empty groups
  if (!waited) pdl_wait();    // no rows: still no exit before the previous kernel has finished
  cluster_wait();             // no CTA leaves while another may still read its partials
}

// Streaming path (rank > rank_block): weights through registers from L2 (all of them
// prefetched into L2 at entry), rank rows of the expand split among thread groups.
template <typename T, int MT>
__device__ void fused_streamed(const FusedParams& p, const Slice<T>& sl, cg::cluster_group& cluster,
                               unsigned char* smem) {
  const int tid = threadIdx.x, Kc = sl.Kc, r = sl.r;
  for (int j = tid; j < 2 * r; j += kThreads) {
    const bool is_a = j < r;
    const T* src = is_a ? sl.A + int64_t(j) * sl.K : sl.B + int64_t(j - r) * sl.N;
    const int bytes = (is_a ? sl.nk8 : sl.nn8) * 16;
    for (int off = 0; off < bytes; off += 4096)
      prefetch_l2(reinterpret_cast<const char*>(src) + off, uint32_t(min(4096, bytes - off)));
  }
  T* xs = reinterpret_cast<T*>(smem);                                        // [MT][Kc]
  float* part = reinterpret_cast<float*>(smem + size_t(MT) * Kc * sizeof(T));  // [MT][128]
  float* vfull = part + MT * kMaxRank;                                       // [MT][128]
  float* red = vfull + MT * kMaxRank;                                        // [MT*8][256]
  const T* __restrict__ x = static_cast<const T*>(p.x);

  // Expand layout: G groups of gs threads split the rank rows when the column slice is narrow
  // (each thread owns 8 adjacent columns), so small slices still use every thread.
  int G = 1;
  while (G < 8 && sl.nn8 * (G * 2) <= kThreads && G * 2 * 4 <= r) G *= 2;
  const int gs = kThreads / G, grp = tid / gs, lt = tid % gs;
  const int per = ceil_div(r, G), jb = min(r, grp * per), je = min(r, jb + per);

  pdl_wait();  // x and y may be written by the previous kernel
  bool first = true;
  for (int row0 = sl.start; row0 < sl.end; row0 += MT) {
    const int mt = min(MT, sl.end - row0);
    for (int i = tid; i < mt * sl.nk8; i += kThreads) {
      const int m = i / sl.nk8, c = i % sl.nk8;
      *reinterpret_cast<uint4*>(xs + m * Kc + c * 8) =
          *reinterpret_cast<const uint4*>(x + int64_t(row0 + m) * p.x_stride + sl.k0 + c * 8);
    }
    if (!first) cluster_wait();
    first = false;
    __syncthreads();
    shrink_partial<T, MT, true>(part, xs, Kc, sl.A, sl.K, sl.nk8, r, mt);
    reduce_cluster<T>(cluster, part, vfull, r, mt);

    float acc[MT][8];
    if (G == 1) {
      for (int c = tid; c < sl.nn8; c += kThreads) {
        expand_cols<T, MT>(acc, sl.B + c * 8, sl.N, vfull, 0, r, mt, true);
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < mt) add_to_row<T>(sl.yrow + int64_t(row0 + m) * p.y_stride + c * 8, acc[m],
                            p.accumulate);
      }
    } else {
      const bool ok = lt < sl.nn8;
      expand_cols<T, MT>(acc, sl.B + lt * 8, sl.N, vfull, jb, je, mt, ok);
      if (grp > 0)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int e = 0; e < 8; ++e) red[(((grp - 1) * MT + m) * 8 + e) * gs + lt] = acc[m][e];
      __syncthreads();
      if (grp == 0 && ok) {
        for (int q = 1; q < G; ++q)
#pragma unroll
          for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m][e] += red[(((q - 1) * MT + m) * 8 + e) * gs + lt];
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < mt) add_to_row<T>(sl.yrow + int64_t(row0 + m) * p.y_stride + lt * 8, acc[m],
                              p.accumulate);
      }
    }
    __syncthreads();  // xs, vfull and red are reused by the next rows
  }
  cluster_wait();
}

#endif

// LARGE: what a rank above the staged block (rank_block < the pools' max rank) takes: 0 none
// (every rank fits), kLargeChunked or kLargeStreamed; one path per kernel keeps the registers
// of each to itself (the staged-only kernels do not spill).
constexpr int kLargeNone = 0, kLargeChunked = 1, kLargeStreamed = 2;
template <typename T, int MT, int LARGE>
__global__ void __launch_bounds__(kThreads, MT == 1 ? 4 : 2) lora_fused_kernel(FusedParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  pdl_launch_dependents();
  TL_STAMP(p, 0);
  cg::cluster_group cluster = cg::this_cluster();
  const int C = int(cluster.num_blocks()), crank = int(cluster.block_rank());
  // part-major, the last part first: parts past their job's rank (most of them, in a pool of
  // large ranks) leave at once at the start of the grid rather than at its end, where they would
  // hold back the dependent launch (it starts once every CTA of this grid has started); part 0
  // (the job's dependency wait, its inactive rows) comes last
  const int jobs = p.seg.num_seg * p.num_proj;
  const int part = p.split_parts - 1 - int(blockIdx.x / C / jobs), item = blockIdx.x / C % jobs;
  const int pi = item % p.num_proj, s = item / p.num_proj;
  const FusedProj pr = p.proj[pi];
  SegmentArgs sa = p.seg;
  sa.ranks = pr.ranks;
  sa.num_slots = pr.num_slots;
  sa.max_rank = pr.max_rank;
  const Segment g = load_segment(sa, s);
  const int j0 = part * p.split_rows;  // the part's first rank row
  // a part past its job's rank leaves at once, without the dependency wait: it touches nothing
  // (the whole cluster shares the part, so it leaves together)
  if (part > 0 && (!g.active() || g.rank <= j0)) return;
  TL_STAMP(p, 1);
  Slice<T> sl;
  sl.K = p.in_features;
  sl.N = pr.out_features;
  sl.Kc = round8(ceil_div(p.in_features, C));
  sl.Nc = round8(ceil_div(pr.out_features, C));
  sl.k0 = min(p.in_features, crank * sl.Kc);
  sl.nk8 = (min(p.in_features, sl.k0 + sl.Kc) - sl.k0) / 8;
  const int n0 = min(pr.out_features, crank * sl.Nc);
  sl.nn8 = (min(pr.out_features, n0 + sl.Nc) - n0) / 8;
  sl.yrow = static_cast<T*>(p.y) + pr.col_offset + n0;
  if (!g.active()) {  // the whole cluster shares the segment, so it leaves together
    pdl_wait();
    if (!p.accumulate)  // y = delta: these rows' delta is zero
      for (int i = threadIdx.x; i < (g.end - g.start) * sl.nn8; i += kThreads)
        *reinterpret_cast<uint4*>(sl.yrow + int64_t(g.start + i / sl.nn8) * p.y_stride +
                                  (i % sl.nn8) * 8) = make_uint4(0, 0, 0, 0);
    return;
  }
  sl.A = static_cast<const T*>(pr.a) + g.slot * pr.a_slot_stride + j0 * sl.K + sl.k0;
  sl.B = static_cast<const T*>(pr.b) + g.slot * pr.b_slot_stride + j0 * sl.N + n0;
  sl.start = g.start;
  sl.end = g.end;
  sl.r = part == p.split_parts - 1 ? g.rank - j0 : min(p.split_rows, g.rank - j0);
  // every CTA of a cluster has the same rank, so the whole cluster takes the same path
  if (LARGE == kLargeNone || sl.r <= p.rank_block)  // kLargeNone: ranks are clamped to fit
    fused_staged<T, MT>(p, sl, cluster, smem_raw);
  else if (LARGE == kLargeChunked)
    fused_chunked<T, MT>(p, sl, cluster, smem_raw);
  else
    fused_streamed<T, MT>(p, sl, cluster, smem_raw);
#endif
}

// The fewest CTAs per (segment, projection) for auto cluster sizes (fused_shape may double it
// so that the staged slices fit): enough CTAs for half the SMs at least, so that a few jobs
// still spread their bytes (16 for one adapter), and no more, since fewer, larger CTAs keep
// more launches resident at once (measured on an H200, 32 rank-16 jobs of 7B q/k/v/o: 4 CTAs
// each 3.3 us a launch with x_ready, 8 CTAs 4.3 us; 4.7 and 5.0 us without).
int lora_fused_cluster(int items, int num_sms) {
  int c = 1;
  while (c < 16 && 2 * items * c < num_sms) c *= 2;
  return c;
}

int pools_max_rank(const FusedParams& p) {
  int most = 1;
  for (int i = 0; i < p.num_proj; ++i) most = max(most, p.proj[i].max_rank);
  return most;
}

// The ranks a launch is shaped for: the caller's bound where it is below the pools' max rank
// (an eager step knows the ranks of its adapters: rank-16 adapters in a rank-64 pool then stage
// 16 rows and run no empty parts).
int shaped_max_rank(const FusedParams& p) {
  const int most = pools_max_rank(p);
  return p.rank_bound > 0 && p.rank_bound < most ? p.rank_bound : most;
}

// Ranks above the staged block take the chunked path; PUNICA_FUSED_LARGE=streamed (diagnostics)
// the older streaming path through registers.
bool large_ranks_chunked() {
  static const char* env = std::getenv("PUNICA_FUSED_LARGE");
  return !(env && std::strcmp(env, "streamed") == 0);
}

// Split jobs: with y accumulated by reductions, a job of a rank above this many rows runs as
// parts of this many rank rows, each its own cluster (0: whole jobs). A mixed-rank batch is
// otherwise as slow as its largest rank's jobs, staged through the chunked ring while the
// small jobs' SMs idle. Measured on an H200 (7B, 32 rows of ranks 4..128 and no adapter,
// kernels.py, runs of two sessions): 24-29% of the copy bandwidth whole, 51-58% split (x_ready
// 37-43% -> 52-59%); rank 64: 51-63% -> 59-62% (x_ready 68-75% -> 66-71%; same call, gate/up
// 72 -> 68%, the others even). Parts of 8 or 32 rows were slower
// (benchmarks/results/diag/fused_bench_s15*_h200.txt). Costs: rows of such jobs get several
// roundings of y in an order that varies (not bit-reproducible); parts past a job's rank still
// launch (and leave at once): rank-16 adapters in a rank-128 pool, 7B MLP (clusters of 8):
// 5.6 -> 10.1 us a launch, which rank_bound avoids for eager steps.
// PUNICA_FUSED_SPLIT=0 keeps whole jobs; PUNICA_FUSED_SPLIT_ROWS=n (diagnostics): part size.
int split_rows_wanted() {
  static const char* off = std::getenv("PUNICA_FUSED_SPLIT");
  static const char* rows = std::getenv("PUNICA_FUSED_SPLIT_ROWS");
  if (off && std::strcmp(off, "0") == 0) return 0;
  return rows && std::atoi(rows) > 0 ? std::atoi(rows) : 16;
}

// Cluster size, staged rank rows and shared memory of a launch (q.cluster 0 on failure).
// Auto cluster size (p.cluster 0): at least lora_fused_cluster's, doubled (up to 8) until the
// staged slices hold the pool's max rank rows, so that its jobs are staged whole rather than
// passed through in blocks (the chunked path); past 3 CTAs per SM only while not even
// min(16, max rank) rows fit. Measured (H200, 7B, rank-16 pools, x_ready): q/k/v/o 4 CTAs a
// job, gate_up and down 8.
// One CTA's slices must also fit its shared memory: very wide layers get a bigger cluster.
// PUNICA_FUSED_STAGE_KB (diagnostics) overrides the staged slices' budget.
FusedParams fused_shape(const FusedParams& p, int MT, int elem, int num_sms, size_t* smem_out) {
  const int most_rank = shaped_max_rank(p);
  // a job whose rank passes split_rows x split_parts (above the caller's bound) runs its last
  // part's rows through the chunked ring
  const int pool_rank = pools_max_rank(p);
  int dev = 0, smem_max = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    smem_max = 48 * 1024;
  static const char* env_kb = std::getenv("PUNICA_FUSED_STAGE_KB");
  const size_t budget = env_kb && std::atoi(env_kb) > 0 ? size_t(std::atoi(env_kb)) << 10
                                                         : kStageBudget;
  const bool auto_c = p.cluster < 1;
  FusedParams q = p;
  // y += delta as reductions at L2 (no read of y, so no round trip after the dependency wait):
  // measured on an H200, 32 rank-16 jobs with x_ready, 3-8% faster a launch than reading y,
  // adding and writing it back. PUNICA_FUSED_Y=rmw (diagnostics) keeps the read-modify-write.
  static const char* env_y = std::getenv("PUNICA_FUSED_Y");
  q.y_red = !(env_y && std::strcmp(env_y, "rmw") == 0);
  const int want_split = split_rows_wanted();
  const bool split = want_split > 0 && p.accumulate && q.y_red && most_rank > want_split;
  const int stage_rank = split ? want_split : most_rank;  // the rank rows a job stages at most
  q.split_rows = stage_rank;
  q.split_parts = ceil_div(most_rank, stage_rank);
  for (int C = auto_c ? lora_fused_cluster(p.seg.num_seg * p.num_proj, num_sms) : p.cluster;;
       C *= 2) {
    q.cluster = C;
    const int kc = round8(ceil_div(p.in_features, C));
    q.n_pitch = 0;
    for (int i = 0; i < p.num_proj; ++i)
      q.n_pitch = max(q.n_pitch, round8(ceil_div(p.proj[i].out_features, C)));
    const size_t fit = budget / (size_t(kc + q.n_pitch) * elem);
    q.rank_block = int(fit < 1 ? 1 : (fit < size_t(stage_rank) ? fit : size_t(stage_rank)));
    // the chunked path's fp32 sums need the y slice in fp32 too, whenever a rank (a part's,
    // for split jobs) can exceed the staged block
    const bool chunks = q.rank_block < stage_rank || q.split_parts * stage_rank < pool_rank;
    *smem_out = fused_smem_bytes(MT, kc, q.n_pitch, q.rank_block, elem,
                                 p.x_ready || (large_ranks_chunked() && chunks));
    const int items = p.seg.num_seg * p.num_proj;
    const bool grow = auto_c && C < 8 && q.rank_block < stage_rank &&
                      (items * 2 * C <= 3 * num_sms || q.rank_block < min(16, stage_rank));
    if (*smem_out <= size_t(smem_max) && !grow) return q;
    if (C >= 16) {
      q.cluster = 0;
      return q;
    }
  }
}

template <typename T, int MT>
cudaError_t launch_fused(const FusedParams& p, const LaunchOptions& o) {
  size_t smem = 0;
  const FusedParams q = fused_shape(p, MT, int(sizeof(T)), o.num_sms, &smem);
  if (q.cluster < 1) return cudaErrorInvalidValue;
  const bool staged_only =  // every part's rank fits the staged block
      q.rank_block >= q.split_rows && q.split_rows * q.split_parts >= pools_max_rank(p);
  const int large = staged_only ? kLargeNone : large_ranks_chunked() ? kLargeChunked : kLargeStreamed;
  auto kernel = large == kLargeChunked    ? lora_fused_kernel<T, MT, kLargeChunked>
                : large == kLargeStreamed ? lora_fused_kernel<T, MT, kLargeStreamed>
                                          : lora_fused_kernel<T, MT, kLargeNone>;
  const int C = q.cluster;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  if (C > 8) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
  }
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = C;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  if (C > 8) {  // a 16-CTA cluster must fit in one GPC next to this smem: else fall back to 8
    static std::unordered_map<size_t, int> fits;  // (smem bytes, kernel) -> clusters of 16 that fit
    const size_t key = smem * 4 + size_t(large);
    auto it = fits.find(key);
    if (it == fits.end()) {
      cfg.gridDim = dim3(C);
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
        cudaGetLastError();
        clusters = 0;
      }
      it = fits.emplace(key, clusters).first;
    }
    if (it->second < 1) {  // unless 16 was needed for shared memory, 8 it is
      if (p.cluster != 16 && p.cluster != 0) return cudaErrorInvalidValue;
      FusedParams q8 = p;
      q8.cluster = 8;
      return launch_fused<T, MT>(q8, o);
    }
  }
  cfg.gridDim = dim3(p.seg.num_seg * p.num_proj * C * q.split_parts);
  cfg.stream = o.stream;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.numAttrs = o.pdl ? 2 : 1;
  return cudaLaunchKernelEx(&cfg, kernel, q);
}

}  // namespace

int lora_fused_cluster_of(const FusedParams& p, int num_sms) {
  size_t smem = 0;
  const int MT = p.seg.num_rows <= p.seg.num_seg ? 1 : 4;
  return fused_shape(p, MT, 2, num_sms, &smem).cluster;  // fp16 and bf16: 2 bytes
}

cudaError_t lora_fused(DType dt, const FusedParams& p, const LaunchOptions& o) {
  if (!o.vec || p.num_proj < 1 || p.num_proj > kMaxFusedProj || p.cluster < 0 || p.cluster > 16)
    return cudaErrorInvalidValue;
  const bool one_row = p.seg.num_rows <= p.seg.num_seg;  // a decode batch: 1-row segments
  if (dt == DType::kHalf)
    return one_row ? launch_fused<__half, 1>(p, o) : launch_fused<__half, 4>(p, o);
  return one_row ? launch_fused<__nv_bfloat16, 1>(p, o) : launch_fused<__nv_bfloat16, 4>(p, o);
}

}  // namespace punica
