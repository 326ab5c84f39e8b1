// SGMV expand: y[rows, off:off+out] += v[rows, :r] @ b[slot, layer, :r] per segment (rank -> out).
//
// Two kernels:
//  * expand_simt_kernel (decode, memory-bound): a work item is a column chunk of one segment.
//    Each thread owns 8 adjacent output columns (16-byte loads of b) and walks the rank rows, so
//    the reduction over the rank stays in registers; for large ranks the rows are split among
//    thread groups and summed through shared memory, so that every item reads about the same
//    number of bytes whatever its rank (mixed ranks in one launch stay balanced).
//  * expand_mma_kernel (prefill): 128 x 128 output tiles on tensor cores; the whole rank (<= 128)
//    fits in one shared-memory tile; the y tile is fetched into shared memory together with the
//    operands and written back with coalesced 16-byte accesses.
#include "sgmv_common.cuh"

namespace punica {
namespace {

constexpr int kThreads = 256;

// Rank rows are split among this many thread groups; a chunk is (256 / groups) * 8 columns:
// r <= 8: 2048 columns, r <= 16: 1024, r <= 32: 512, else 256 (up to 64 KB of b per item).
__device__ __forceinline__ int rank_groups(int r) { return r <= 8 ? 1 : r <= 16 ? 2 : r <= 32 ? 4 : 8; }

template <typename T, bool VEC>
__device__ __forceinline__ void add_store8(T* dst, const float (&acc)[8], int n_valid) {
  if constexpr (VEC) {
    float cur[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(dst), cur);
#pragma unroll
    for (int e = 0; e < 8; ++e) cur[e] += acc[e];
    *reinterpret_cast<uint4*>(dst) = pack8<T>(cur);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < n_valid) dst[e] = from_float<T>(to_float(dst[e]) + acc[e]);
  }
}

// ------------------------------------------------------------------------------------------
// Decode kernel.
template <typename T, bool VEC, int MT = 4, int U = 8>
__global__ void __launch_bounds__(kThreads) expand_simt_kernel(ExpandParams p) {
  extern __shared__ __align__(16) int smem_i[];
  const SegmentArgs& sa = p.seg;
  int* prefix = smem_i;                                                // [num_seg + 1]
  float* vbuf = reinterpret_cast<float*>(smem_i + ((sa.num_seg + 4) & ~3));  // [MT][kMaxRank]
  float* red = vbuf + MT * kMaxRank;                                   // [groups][MT * 8][gs]
  pdl_launch_dependents();

  const int N = p.out_features;
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const T* __restrict__ vin = static_cast<const T*>(p.v);
  T* __restrict__ y = static_cast<T*>(p.y);

  const int total = build_worklist(prefix, sa.num_seg, [&](int s) {
    const Segment g = load_segment(sa, s);
    return g.active() ? ceil_div(N, (kThreads / rank_groups(g.rank)) * 8) : 0;
  });
  if (VEC && int(blockIdx.x) < total) {  // warm L2 with this CTA's first chunk of b
    const int s = find_segment(prefix, sa.num_seg, blockIdx.x);
    const Segment g = load_segment(sa, s);
    const int width = (kThreads / rank_groups(g.rank)) * 8;
    const int col0 = (blockIdx.x - prefix[s]) * width;
    const int bytes = min(width, N - col0) * int(sizeof(T));
    const T* wp = w + g.slot * p.w_slot_stride + col0;
    for (int j = threadIdx.x; j < g.rank; j += kThreads) prefetch_l2(wp + int64_t(j) * N, bytes);
  }
  // The first U rows of b are loaded before waiting for the previous kernel (they do not depend
  // on it); v and y may be written by that kernel, so they are read after.
  bool waited = false;

  const int tid = threadIdx.x;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const int s = find_segment(prefix, sa.num_seg, t);
    const Segment g = load_segment(sa, s);
    const int groups = rank_groups(g.rank), gs = kThreads / groups;
    const int grp = tid / gs, lt = tid % gs;
    const int col = (t - prefix[s]) * gs * 8 + lt * 8;
    const bool col_ok = col < N;
    const int nvalid = N - col;
    const int per = ceil_div(g.rank, groups);
    const int jb = grp * per, je = min(g.rank, jb + per);
    const T* wp = w + g.slot * p.w_slot_stride + col;
    T* yp = y + p.col_offset + col;

    for (int row0 = g.start; row0 < g.end; row0 += MT) {
      const int mt = min(MT, g.end - row0);
      uint4 wr[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        wr[u] = col_ok && jb + u < je ? load8<T, VEC>(wp + int64_t(jb + u) * N, nvalid)
                                      : make_uint4(0, 0, 0, 0);
      if (!waited) {
        pdl_wait();
        waited = true;
      }
      uint4 yr[MT];  // y is loaded now, so that its latency overlaps the rest
#pragma unroll
      for (int i = 0; i < MT; ++i)
        yr[i] = VEC && grp == 0 && col_ok && i < mt
                    ? *reinterpret_cast<const uint4*>(yp + int64_t(row0 + i) * p.y_stride)
                    : make_uint4(0, 0, 0, 0);
      for (int i = tid; i < mt * g.rank; i += kThreads) {
        const int r = i / g.rank, j = i % g.rank;
        vbuf[r * kMaxRank + j] = to_float(vin[int64_t(row0 + r) * p.v_stride + j]);
      }
      __syncthreads();

      float acc[MT][8];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;
      if (col_ok) {
        for (int j = jb; j < je; j += U) {
          if (j > jb) {  // U 16-byte loads in flight before any math
#pragma unroll
            for (int u = 0; u < U; ++u)
              wr[u] = j + u < je ? load8<T, VEC>(wp + int64_t(j + u) * N, nvalid) : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (j + u >= je) continue;
            float wf[8];
            unpack8<T>(wr[u], wf);
#pragma unroll
            for (int i = 0; i < MT; ++i) {
              if (i >= mt) continue;
              const float vv = vbuf[i * kMaxRank + j + u];
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(vv, wf[e], acc[i][e]);
            }
          }
        }
      }
      if (groups > 1) {  // sum the groups' partial results (layout keeps lanes on distinct banks)
        if (grp > 0)
#pragma unroll
          for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int e = 0; e < 8; ++e) red[((grp * MT + i) * 8 + e) * gs + lt] = acc[i][e];
        __syncthreads();
        if (grp == 0)
          for (int q = 1; q < groups; ++q)
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[i][e] += red[((q * MT + i) * 8 + e) * gs + lt];
      }
      if (grp == 0 && col_ok) {
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          if (i >= mt) continue;
          T* dst = yp + int64_t(row0 + i) * p.y_stride;
          if constexpr (VEC) {
            float cur[8];
            unpack8<T>(yr[i], cur);
#pragma unroll
            for (int e = 0; e < 8; ++e) cur[e] += acc[i][e];
            *reinterpret_cast<uint4*>(dst) = pack8<T>(cur);
          } else {
            add_store8<T, false>(dst, acc[i], nvalid);
          }
        }
      }
      __syncthreads();  // vbuf and red are reused by the next rows
    }
  }
  if (!waited) pdl_wait();  // a CTA must not finish before the kernel it depends on
}

// ------------------------------------------------------------------------------------------
// Prefill kernel: C[BM x BN] = V[BM x R] . W[R x BN]; V is K-contiguous, W is N-contiguous
// (so its fragments come from ldmatrix.trans). The y tile is fetched into shared memory with the
// operands (its latency overlaps theirs), updated there in fp32 from the accumulators, and
// written back with coalesced 16-byte stores.
constexpr int kBM = 128, kBN = 128;
constexpr size_t kTileElems = size_t(kBM) * kMaxRank;         // V, W and Y tiles: 32 KB each
constexpr size_t kMmaSmem = 3 * kTileElems * 2;               // 96 KB

template <typename T>
__global__ void __launch_bounds__(kThreads) expand_mma_kernel(ExpandParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Vs = reinterpret_cast<T*>(smem_raw);        // [kBM][kMaxRank] swizzled
  T* Ws = Vs + kTileElems;                       // [kMaxRank][kBN] swizzled
  T* Ys = Ws + kTileElems;                       // [kBM][kBN] swizzled
  int* prefix = reinterpret_cast<int*>(smem_raw + kMmaSmem);

  const SegmentArgs& sa = p.seg;
  const int N = p.out_features, ntiles = ceil_div(N, kBN);
  const T* __restrict__ vin = static_cast<const T*>(p.v);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2;  // 4 x 2 warps, 32 x 64 outputs each

  const int total = build_worklist(prefix, sa.num_seg, [&](int s) {
    const Segment g = load_segment(sa, s);
    return g.active() ? ceil_div(g.end - g.start, kBM) * ntiles : 0;
  });

  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const int s = find_segment(prefix, sa.num_seg, t);
    const Segment g = load_segment(sa, s);
    const int local = t - prefix[s];
    const int m0 = g.start + (local / ntiles) * kBM, n0 = (local % ntiles) * kBN;
    const int kpad = ceil_div(g.rank, 16) * 16;
    const T* wp = w + g.slot * p.w_slot_stride + n0;
    T* yt = y + p.col_offset + n0;

    // Y tile (rows past the segment and columns past out are neither read nor written).
    for (int i = tid; i < kBM * (kBN / 8); i += kThreads) {
      const int row = i >> 4, c = (i & 15) * 8;
      const bool ok = m0 + row < g.end && n0 + c < N;
      cp_async16(Ys + swz(row, c, kBN), ok ? yt + int64_t(m0 + row) * p.y_stride + c : y, ok ? 16 : 0);
    }
    // V tile: ranks past r are zero-filled (v's columns there are unspecified, maybe NaN).
    for (int i = tid; i < kBM * (kpad / 8); i += kThreads) {
      const int row = i / (kpad / 8), k = (i % (kpad / 8)) * 8;
      const int bytes = m0 + row < g.end ? max(0, min(8, g.rank - k)) * int(sizeof(T)) : 0;
      cp_async16(Vs + swz(row, k, kMaxRank), bytes ? vin + int64_t(m0 + row) * p.v_stride + k : vin,
                 bytes);
    }
    // W tile: only the first r rank rows are read; the rest up to the 16-row step are zeros.
    for (int i = tid; i < kpad * (kBN / 8); i += kThreads) {
      const int k = i / (kBN / 8), c = (i % (kBN / 8)) * 8;
      const bool ok = k < g.rank && n0 + c < N;
      cp_async16(Ws + swz(k, c, kBN), ok ? wp + int64_t(k) * N + c : wp, ok ? 16 : 0);
    }
    cp_async_commit();
    // Warm L2 with the y and w tiles of the item this CTA takes next, so that their loads hit L2
    // while this item computes and stores (the loop has no cross-item pipeline otherwise). A
    // hint (no data consumed); rows are 16-byte aligned on this path (vec).
    if (t + int(gridDim.x) < total) {
      const int tn = t + int(gridDim.x);
      const int sn = find_segment(prefix, sa.num_seg, tn);
      const Segment gn = load_segment(sa, sn);
      const int ln = tn - prefix[sn];
      const int m0n = gn.start + (ln / ntiles) * kBM, n0n = (ln % ntiles) * kBN;
      const uint32_t bytes = uint32_t(min(kBN, N - n0n)) * uint32_t(sizeof(T));
      if (tid < kBM) {
        if (m0n + tid < gn.end)
          prefetch_l2(y + p.col_offset + n0n + int64_t(m0n + tid) * p.y_stride, bytes);
      } else if (tid - kBM < gn.rank) {
        prefetch_l2(w + gn.slot * p.w_slot_stride + n0n + int64_t(tid - kBM) * N, bytes);
      }
    }
    cp_async_wait<0>();
    __syncthreads();

    float acc[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    for (int ks = 0; ks < kpad / 16; ++ks) {
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(af[mi], Vs + swz(wm * 32 + mi * 16 + (lane & 15), ks * 16 + (lane >> 4) * 8, kMaxRank));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, Ws + swz(ks * 16 + (lane & 15), wn * 64 + np * 16 + (lane >> 4) * 8, kBN));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_16816<T>(acc[mi][2 * np], af[mi], bf[0], bf[1]);
          mma_16816<T>(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
        }
      }
    }

    add_fragments<T, kBN>(Ys, acc, wm * 32, wn * 64, lane);  // y += C in shared memory
    __syncthreads();
    for (int i = tid; i < kBM * (kBN / 8); i += kThreads) {
      const int row = i >> 4, c = (i & 15) * 8;
      if (m0 + row < g.end && n0 + c < N)
        *reinterpret_cast<uint4*>(yt + int64_t(m0 + row) * p.y_stride + c) =
            *reinterpret_cast<const uint4*>(Ys + swz(row, c, kBN));
    }
    __syncthreads();  // the tiles are reloaded for the next item
  }
}

template <typename T, bool VEC>
cudaError_t launch_simt(const ExpandParams& p, const LaunchOptions& o) {
  constexpr int MT = 4;
  auto kernel = expand_simt_kernel<T, VEC, MT>;
  const size_t smem = size_t((p.seg.num_seg + 4) & ~3) * sizeof(int) +
                      size_t(MT) * kMaxRank * sizeof(float) + size_t(kThreads) * MT * 8 * sizeof(float);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  static int occ = 0;  // cached per instantiation; only sizes the persistent grid
  if (occ == 0) occ = blocks_per_sm(kernel, kThreads, smem);
  const int upper = p.seg.num_seg * ceil_div(p.out_features, (kThreads / 8) * 8);
  const int grid = max(1, min(upper, o.num_sms * occ));
  return launch(kernel, dim3(grid), dim3(kThreads), smem, o.stream, o.pdl, p);
}

template <typename T>
cudaError_t launch_mma(const ExpandParams& p, const LaunchOptions& o) {
  auto kernel = expand_mma_kernel<T>;
  const size_t smem = kMmaSmem + size_t(p.seg.num_seg + 1) * sizeof(int);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  static int occ = 0;
  if (occ == 0) occ = blocks_per_sm(kernel, kThreads, smem);
  const int grid = persistent_grid(row_tiles_at_most(p.seg, kBM, ceil_div(p.out_features, kBN)),
                                   o.num_sms, occ);
  return launch(kernel, dim3(grid), dim3(kThreads), smem, o.stream, false, p);
}

}  // namespace

cudaError_t expand_simt(DType dt, const ExpandParams& p, const LaunchOptions& o) {
  if (dt == DType::kHalf)
    return o.vec ? launch_simt<__half, true>(p, o) : launch_simt<__half, false>(p, o);
  return o.vec ? launch_simt<__nv_bfloat16, true>(p, o) : launch_simt<__nv_bfloat16, false>(p, o);
}

cudaError_t expand_mma(DType dt, const ExpandParams& p, const LaunchOptions& o) {
  if (!o.vec) return cudaErrorInvalidValue;
  return dt == DType::kHalf ? launch_mma<__half>(p, o) : launch_mma<__nv_bfloat16>(p, o);
}

}  // namespace punica
