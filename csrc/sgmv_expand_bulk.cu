// Prefill expand on sm_90 as one stream of TMA tensor copies:
//   y[rows, off : off + out] += v[rows, :r] @ b[slot, :r].
//
// Why: the expand of a prefill reads and writes y once (rows x out) and its MMAs are few, so its
// time is y's bytes. sgmv_prefill.cu's pipelined kernel moves y with every thread's cp.async and
// 16-byte stores, two __syncthreads a tile. Here one producer thread streams the tiles' y boxes
// (128 rows x 64 columns) and b boxes (the rank class's rows x the same 64 columns) into a ring
// of stages; each of eight consumer warps owns 16 rows of every tile, keeps those rows' v as MMA
// fragments in registers (reloaded when the row block changes), adds its delta into the staged
// y in fp32 and writes its 16 x 64 box back with a TMA store, then frees its share of the stage:
// the warps never wait for each other. Each CTA (one a SM) takes an equal contiguous run of the
// launch's tiles in (segment, row block, column) order, so a run crosses few row blocks.
//
// Rows past a segment are loaded (they belong to the next segment, or are zeros past the tensor)
// but never stored: a warp whose 16 rows cross the segment's end stores its rows before the end
// with plain 16-byte stores. b's rows past a slot's rank hold whatever the pool stores there; the
// MMA's operand for those rows is masked to zero in registers (v is zero there too, but 0 x NaN
// is NaN), and rank groups of 16 wholly past the rank are skipped. Columns past out are neither
// loaded nor stored (the map's bounds).
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "sgmv_common.cuh"
#include "tma.cuh"

namespace punica {
namespace {

constexpr int kBM = 128;                  // rows of a tile
constexpr int kBN = 64;                   // columns of a tile: one 128-byte swizzled box row
constexpr int kWarpRows = 16;             // rows of a tile per consumer warp
constexpr int kConsumerWarps = kBM / kWarpRows;
constexpr int kThreads = (kConsumerWarps + 1) * 32;   // + the producer warp
constexpr int kMaxStages = 12;
constexpr size_t kRingBudget = 192 * 1024;
constexpr size_t kHeadBytes = 2 * kMaxStages * sizeof(uint64_t);  // the barriers; the work list follows

// A stage: y's box (kBM x kBN), then b's (KP x kBN); both on 1024-byte boundaries.
template <int KP>
constexpr int stage_bytes() { return (kBM + KP) * kBN * 2; }

template <int KP>
constexpr int ring_stages() {
  return int(std::min<size_t>(kMaxStages, kRingBudget / stage_bytes<KP>()));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Zeroes the halves of an MMA B-operand register whose k (k, k + 1) is at or past the rank.
__device__ __forceinline__ uint32_t mask_k_pair(uint32_t r, int k, int rank) {
  if (k >= rank) return 0u;
  return k + 1 < rank ? r : (r & 0xffffu);
}
#endif

template <typename T, int KP>
__global__ void __launch_bounds__(kThreads, 1)
    expand_bulk_kernel(ExpandParams p, const __grid_constant__ CUtensorMap yload,
                       const __grid_constant__ CUtensorMap ystore,
                       const __grid_constant__ CUtensorMap bmap, int rows_per_slot) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // (never launched below sm_90)
  constexpr int S = ring_stages<KP>();
  constexpr int kStage = stage_bytes<KP>();
  constexpr int KS = KP / 16;  // k16 steps of the rank class
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw);   // [S] a stage's copies have landed
  uint64_t* empty = full + kMaxStages;                        // [S] its warps are done with it
  int* prefix = reinterpret_cast<int*>(smem_raw + kHeadBytes);
  unsigned char* ring = smem_raw + kHeadBytes + (size_t(p.seg.num_seg) + 1) * sizeof(int);
  ring += (1024u - (smem_u32(ring) & 1023u)) & 1023u;

  const SegmentArgs& sa = p.seg;
  const int N = p.out_features, ntiles = ceil_div(N, kBN);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    tma_prefetch_map(&yload);
    tma_prefetch_map(&ystore);
    tma_prefetch_map(&bmap);
  }
  // (build_worklist's barriers also publish the barriers' initialisation)
  const int total = build_worklist(prefix, sa.num_seg, [&](int s) {
    const Segment g = load_segment(sa, s);
    return g.active() ? ceil_div(g.end - g.start, kBM) * ntiles : 0;
  });
  const int t_begin = int(int64_t(total) * blockIdx.x / gridDim.x);
  const int t_end = int(int64_t(total) * (blockIdx.x + 1) / gridDim.x);

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
  auto advance = [&](Cursor& c) {  // (the new row block's segment only where it changes)
    ++c.t;
    if (c.t >= t_end) return;
    if (c.t >= prefix[c.s + 1]) {
      seek(c, c.t);
    } else if (++c.ct == ntiles) {
      c.ct = 0;
      ++c.rb;
    }
  };
  if (t_begin >= t_end) return;

  if (warp == kConsumerWarps) {  // producer: one lane issues the stage's two tensor copies
    if (lane != 0) return;
    Cursor c;
    seek(c, t_begin);
    for (int it = 0; c.t < t_end; ++it, advance(c)) {
      const int st = it % S;
      if (it >= S) mbar_wait(&empty[st], ((it / S) - 1) & 1);
      unsigned char* dst = ring + st * kStage;
      mbar_arrive_expect_tx(&full[st], kStage);
      tma_load_2d(dst, &yload, c.ct * kBN, c.g.start + c.rb * kBM, &full[st]);
      tma_load_2d(dst + kBM * kBN * 2, &bmap, c.ct * kBN, c.g.slot * rows_per_slot, &full[st]);
    }
    return;
  }

  // consumer warp: rows warp*16 .. +15 of every tile
  const T* __restrict__ vin = static_cast<const T*>(p.v);
  T* __restrict__ y = static_cast<T*>(p.y);
  uint32_t vf[KS][4];  // the warp's rows of the row block's v, A fragments of every k16 step
  auto load_v = [&](const Cursor& c) {
    const int m0 = c.g.start + c.rb * kBM + warp * kWarpRows;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = m0 + (lane >> 2) + (j & 1) * 8;
        const int k = ks * 16 + (lane & 3) * 2 + (j >> 1) * 8;
        vf[ks][j] = load_v_pair(vin, p.v_stride, row, c.g.end, k, c.g.rank);
      }
  };
  Cursor c;
  seek(c, t_begin);
  load_v(c);
  int pending = -1;  // (lane 0) the stage of this warp's TMA store in flight, if any
  for (int it = 0; c.t < t_end; ++it) {
    const int st = it % S;
    bool stored = false;
    mbar_wait(&full[st], (it / S) & 1);
    T* ys = reinterpret_cast<T*>(ring + st * kStage);
    const T* ws = ys + kBM * kBN;
    const int m0 = c.g.start + c.rb * kBM + warp * kWarpRows;  // this warp's first row
    const int rows = min(kWarpRows, c.g.end - m0);             // of the segment (may be <= 0)
    if (rows > 0) {
      float acc[1][kBN / 8][4] = {};
      const int kp16 = ceil_div(c.g.rank, 16);
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        if (ks >= kp16) break;
        const int kb = ks * 16 + (lane & 3) * 2;  // this thread's k in bf[0] / bf[2] (+8: bf[1] / bf[3])
#pragma unroll
        for (int np = 0; np < kBN / 16; ++np) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, ws + swz(ks * 16 + (lane & 15), np * 16 + (lane >> 4) * 8, kBN));
          if (ks * 16 + 16 > c.g.rank) {  // the rank ends inside this group: rows past it are 0
            bf[0] = mask_k_pair(bf[0], kb, c.g.rank);
            bf[2] = mask_k_pair(bf[2], kb, c.g.rank);
            bf[1] = mask_k_pair(bf[1], kb + 8, c.g.rank);
            bf[3] = mask_k_pair(bf[3], kb + 8, c.g.rank);
          }
          mma_16816<T>(acc[0][2 * np], vf[ks], bf[0], bf[1]);
          mma_16816<T>(acc[0][2 * np + 1], vf[ks], bf[2], bf[3]);
        }
      }
      T* yw = ys + warp * kWarpRows * kBN;  // the warp's 16 rows of the staged y box
      add_fragments<T, kBN>(yw, acc, 0, 0, lane);
      const int n0 = c.ct * kBN;
      if (rows == kWarpRows) {  // the whole box is the segment's: one TMA store
        tma_store_fence();
        __syncwarp();
        if (lane == 0) tma_store_2d(&ystore, n0, m0, yw);
        stored = true;
      } else {  // the segment ends inside the warp's rows: plain stores of its rows
        __syncwarp();
        T* yt = y + p.col_offset + n0 + int64_t(m0) * p.y_stride;
        for (int i = lane; i < rows * (kBN / 8); i += 32) {
          const int row = i / (kBN / 8), c8 = (i % (kBN / 8)) * 8;
          if (n0 + c8 < N)
            *reinterpret_cast<uint4*>(yt + int64_t(row) * p.y_stride + c8) =
                *reinterpret_cast<const uint4*>(yw + swz(row, c8, kBN));
        }
      }
    }
    __syncwarp();
    if (lane == 0) {
      // A stage whose TMA store is still reading it is freed one store later (wait_group.read 1:
      // all but the newest of this thread's stores have read their shared memory).
      if (stored) {
        if (pending >= 0) {
          tma_store_wait_read_all_but_one();
          mbar_arrive(&empty[pending]);
        }
        pending = st;
      } else {
        mbar_arrive(&empty[st]);
      }
    }
    const int rb = c.rb, s = c.s;
    advance(c);
    if (c.t < t_end && (c.rb != rb || c.s != s)) load_v(c);  // a new row block
  }
  if (lane == 0) tma_store_wait_all();  // y written before the CTA retires
#endif
}

template <typename T, int KP>
cudaError_t launch_bulk(DType dt, const ExpandParams& p, const LaunchOptions& o) {
  auto kernel = expand_bulk_kernel<T, KP>;
  const int N = p.out_features;
  const int rows_per_slot = int(p.w_slot_stride / N);   // layers x stored rank rows
  const uint64_t brows = uint64_t(std::max(p.seg.num_slots, 1) - 1) * rows_per_slot + p.seg.max_rank;
  const T* ybase = static_cast<const T*>(p.y) + p.col_offset;
  CUtensorMap yload, ystore, bmap;
  if (!encode_rows(&yload, dt, ybase, N, p.seg.num_rows, uint64_t(p.y_stride) * 2, kBN, kBM) ||
      !encode_rows(&ystore, dt, ybase, N, p.seg.num_rows, uint64_t(p.y_stride) * 2, kBN, kWarpRows) ||
      !encode_rows(&bmap, dt, p.w, N, brows, uint64_t(N) * 2, kBN, KP))
    return cudaErrorInvalidValue;
  const size_t smem = kHeadBytes + size_t(p.seg.num_seg + 1) * sizeof(int) + 1024 +
                      size_t(ring_stages<KP>()) * stage_bytes<KP>();
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t tiles = (int64_t(ceil_div(p.seg.num_rows, kBM)) + p.seg.num_seg) * ceil_div(N, kBN);
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(tiles, o.num_sms)));
  return launch(kernel, dim3(grid), dim3(kThreads), smem, o.stream, false, p, yload, ystore, bmap,
                rows_per_slot);
}

template <typename T>
cudaError_t bulk_by_class(DType dt, const ExpandParams& p, const LaunchOptions& o) {
  const int r = p.seg.max_rank;
  return r <= 16 ? launch_bulk<T, 16>(dt, p, o) : r <= 32 ? launch_bulk<T, 32>(dt, p, o)
         : r <= 64 ? launch_bulk<T, 64>(dt, p, o) : launch_bulk<T, 128>(dt, p, o);
}

}  // namespace

// PUNICA_EXPAND_BULK (diagnostics, read once): "0" never, otherwise whenever the shapes allow.
bool expand_bulk_fits(const ExpandParams& p, const LaunchOptions& o) {
  static const char* env = std::getenv("PUNICA_EXPAND_BULK");
  static const bool off = env && std::strcmp(env, "0") == 0;
  return !off && o.vec && o.sm >= 90 && p.seg.max_rank <= kMaxRank && tensor_map_encoder();
}

cudaError_t expand_bulk(DType dt, const ExpandParams& p, const LaunchOptions& o) {
  if (!o.vec || p.seg.max_rank > kMaxRank) return cudaErrorInvalidValue;
  return dt == DType::kHalf ? bulk_by_class<__half>(dt, p, o) : bulk_by_class<__nv_bfloat16>(dt, p, o);
}

}  // namespace punica
