// Prefill shrink on sm_90 as one stream of TMA tensor copies: v[rows, :r] = x[rows] @ a[slot, :r].T.
//
// Why: the shrink of a prefill reads x once (rows x in_features) and writes a tiny v, so its time
// is the bytes of x. sgmv_shrink.cu's tensor-core kernel needs a K split to fill the GPU (its
// 128-row tiles are too few), and the split costs a workspace of fp32 partial planes and a second
// launch that sums them (at rank 64, 8 MB written and read again for 4096 rows). Here a work item
// is 32 rows x the whole rank class over the whole input dimension, so 4096 rows are 128 items,
// about one per SM, with nothing to reduce across CTAs. One CTA a SM; one producer thread streams
// each item through a ring of up to 16 stages (~176 KB), a stage being 128 input columns: two
// tensor copies of x (boxes of 32 rows x 64 columns) and two of a (the slot's rank-class rows x 64
// columns), so that many stages are in flight without a register or a thread per byte. Eight
// consumer warps each multiply 16 of a stage's 128 columns for all of the item's rows and ranks
// (ldmatrix + mma.sync) and free the stage; at the item's end their partial tiles are summed in
// warp order (deterministic). Items follow each other through the ring without a pause. (Bulk
// copies of one row each were tried first: a SM issues them at ~35 ns each, so 256-byte rows
// moved ~7 GB/s; four consumer warps taking all of a stage's columns paced the ring with their
// MMA chains.)
//
// Rows past a segment (the next segment's, or zeros past the tensor) and a's rows past a slot's
// rank reach only output rows and rank columns that are never stored (an MMA's output cell
// depends on its own row of x and its own rank row only); input columns past the end are zeros.
// A segment of rank r still reads the rank class's rows of a (at most 128): extra bytes only where
// a pool mixes ranks, and those come from L2 for every item of a segment after its first (16-row
// boxes up to the rank were measured no faster: results/diag/prefill_bulk_s17_h200.txt).
#include <algorithm>
#include <cstdlib>

#include "sgmv_common.cuh"
#include "tma.cuh"

namespace punica {
namespace {

constexpr int kRows = 32;                 // rows of x per work item
constexpr int kBox = 64;                  // columns of a box: one 128-byte swizzled row
constexpr int kBoxes = 2;                 // boxes per operand a stage: 128 input columns
constexpr int kConsumerWarps = 8;         // warp w multiplies the stage's columns 16w .. 16w + 15
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kThreads = kConsumers + 32;  // + the producer warp
constexpr int kMaxStages = 16;
constexpr size_t kRingBudget = 176 * 1024;
constexpr size_t kHeadBytes = 2 * kMaxStages * sizeof(uint64_t);  // the barriers; the work list follows

// A stage: kBoxes boxes of kRows x kBox of x, then kBoxes of KP x kBox of a (the rank class's
// rows of the slot; rows past the rank hold what the pool stores there, rows past the pool
// zeros). Every box starts on a 1024-byte boundary, as the 128-byte swizzle needs.
template <int KP>
constexpr int stage_bytes() { return kBoxes * (kRows + KP) * kBox * 2; }

template <int KP>
constexpr int ring_stages() {
  return int(std::min<size_t>(kMaxStages, kRingBudget / stage_bytes<KP>()));
}

// The item's fp32 tile, where the consumer warps' partial sums meet (in warp order).
template <int KP>
constexpr size_t red_bytes() { return size_t(kRows) * KP * sizeof(float); }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
}
#endif

template <typename T, int KP>
__global__ void __launch_bounds__(kThreads, 1)
    shrink_bulk_kernel(ShrinkParams p, const __grid_constant__ CUtensorMap xmap,
                       const __grid_constant__ CUtensorMap wmap, int rows_per_slot) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // (never launched below sm_90)
  constexpr int S = ring_stages<KP>();
  constexpr int kStage = stage_bytes<KP>();
  constexpr int kXBox = kRows * kBox, kWBox = KP * kBox;  // elements
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw);   // [S] a stage's copies have landed
  uint64_t* empty = full + kMaxStages;                        // [S] its consumers are done with it
  int* prefix = reinterpret_cast<int*>(smem_raw + kHeadBytes);
  unsigned char* ring = smem_raw + kHeadBytes + (size_t(p.seg.num_seg) + 1) * sizeof(int);
  ring += (1024u - (smem_u32(ring) & 1023u)) & 1023u;
  float* red = reinterpret_cast<float*>(ring + S * kStage);   // [kRows][KP]

  const SegmentArgs& sa = p.seg;
  const int KT = ceil_div(p.in_features, kBox * kBoxes);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // PDL (launched with it unless PUNICA_SHRINK_PDL=0; otherwise both calls are no-ops): the next
  // launch may start now; this one reads the metadata and issues its first ring of a's boxes
  // before it waits for the kernel before (weights and metadata: not written by a kernel it may
  // overlap, the decode kernels' contract), and copies x and writes v only after.
  pdl_launch_dependents();
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumerWarps);
    }
    mbar_init_fence();
    tma_prefetch_map(&xmap);
    tma_prefetch_map(&wmap);
  }
  // (build_worklist's barriers also publish the barriers' initialisation)
  const int total = build_worklist(prefix, sa.num_seg, [&](int s) {
    const Segment g = load_segment(sa, s);
    return g.active() ? ceil_div(g.end - g.start, kRows) : 0;
  });

  if (warp == kConsumerWarps) {  // producer: one lane issues the stage's tensor copies
    if (lane != 0) return;
    // stage `it` of this CTA: column block it % KT of item blockIdx.x + (it / KT) * gridDim.x
    const int items = int(blockIdx.x) < total ? ceil_div(total - int(blockIdx.x), int(gridDim.x)) : 0;
    const int stages = items * KT;
    int cur = -1, m0 = 0, wrow = 0;
    auto locate = [&](int it) {
      if (it / KT == cur) return;
      cur = it / KT;
      const int t = blockIdx.x + cur * gridDim.x;
      const int s = find_segment(prefix, sa.num_seg, t);
      const Segment g = load_segment(sa, s);
      m0 = g.start + (t - prefix[s]) * kRows;
      wrow = g.slot * rows_per_slot;
    };
    auto issue = [&](int it, bool a, bool x) {
      locate(it);
      T* dst = reinterpret_cast<T*>(ring + (it % S) * kStage);
      const int kt = it % KT;
#pragma unroll
      for (int b = 0; b < kBoxes; ++b) {
        const int k0 = (kt * kBoxes + b) * kBox;
        if (x) tma_load_2d(dst + b * kXBox, &xmap, k0, m0, &full[it % S]);
        if (a) tma_load_2d(dst + kBoxes * kXBox + b * kWBox, &wmap, k0, wrow, &full[it % S]);
      }
    };
    const int ahead = min(S, stages);  // the first ring: a before the wait, x after
    for (int it = 0; it < ahead; ++it) {
      mbar_arrive_expect_tx(&full[it], kStage);
      issue(it, true, false);
    }
    pdl_wait();
    for (int it = 0; it < ahead; ++it) issue(it, false, true);
    for (int it = ahead; it < stages; ++it) {
      const int st = it % S;
      mbar_wait(&empty[st], ((it / S) - 1) & 1);
      mbar_arrive_expect_tx(&full[st], kStage);
      issue(it, true, true);
    }
    return;
  }

  // consumers: warp w takes input columns 16w.. of every stage (its box and 16 of the box's 64)
  // for all of the item's rows and ranks; the partial sums meet in `red` in warp order.
  constexpr int NI = KP / 8;
  const int box = warp / (kBox / 16), kk = (warp % (kBox / 16)) * 16;
  T* v = static_cast<T*>(p.v);
  pdl_wait();  // v may still be read by the kernel before
  int it = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const int s = find_segment(prefix, sa.num_seg, t);
    const Segment g = load_segment(sa, s);
    const int m0 = g.start + (t - prefix[s]) * kRows;
    float acc[2][NI][4] = {};
    for (int kt = 0; kt < KT; ++kt, ++it) {
      const int st = it % S;
      mbar_wait(&full[st], (it / S) & 1);
      const T* xs = reinterpret_cast<const T*>(ring + st * kStage) + box * kXBox;
      const T* ws = reinterpret_cast<const T*>(ring + st * kStage) + kBoxes * kXBox + box * kWBox;
      uint32_t af[2][4];  // columns past the input are zeros (TMA fill)
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(af[mi], xs + swz(mi * 16 + (lane & 15), kk + (lane >> 4) * 8, kBox));
#pragma unroll
      for (int np = 0; np < KP / 16; ++np) {
        if (np * 16 >= g.rank) break;  // no MMAs past the rank
        uint32_t bf[4];
        ldmatrix_x4(bf, ws + swz(np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                 kk + ((lane >> 3) & 1) * 8, kBox));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_16816<T>(acc[mi][2 * np], af[mi], bf[0], bf[1]);
          mma_16816<T>(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[st]);
    }
    // red = the warps' partial tiles summed in warp order (deterministic), then v = red, rounded.
    // Each thread holds rows (lane / 4, + 8) x ranks (2 * (lane % 4), + 1) of each 16 x 8 tile.
    consumers_sync();  // the previous item's stores have read red
    for (int w = 0; w < kConsumerWarps; ++w) {
      if (warp == w) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float* cell = red + (mi * 16 + (lane >> 2) + (e >> 1) * 8) * KP + ni * 8 + (lane & 3) * 2 + (e & 1);
              *cell = w == 0 ? acc[mi][ni][e] : *cell + acc[mi][ni][e];
            }
      }
      consumers_sync();
    }
    const int rows = min(kRows, g.end - m0);
    for (int i = tid; i < rows * KP; i += kConsumers) {
      const int r = i / KP, c = i % KP;
      if (c < g.rank) v[int64_t(m0 + r) * p.v_stride + c] = from_float<T>(red[i]);
    }
  }
#endif
}

template <typename T, int KP>
cudaError_t launch_bulk(const ShrinkParams& p, const LaunchOptions& o) {
  auto kernel = shrink_bulk_kernel<T, KP>;
  const int K = p.in_features;
  const int rows_per_slot = int(p.w_slot_stride / K);   // layers x stored rank rows
  CUtensorMap xmap, wmap;
  // a's map starts at the layer's first row; the last slot's rows end at its stored rank
  const uint64_t wrows = uint64_t(std::max(p.seg.num_slots, 1) - 1) * rows_per_slot + p.seg.max_rank;
  if (!encode_rows<T>(&xmap, p.x, K, p.seg.num_rows, uint64_t(p.x_stride) * 2, kBox, kRows) ||
      !encode_rows<T>(&wmap, p.w, K, wrows, uint64_t(K) * 2, kBox, KP))
    return cudaErrorInvalidValue;
  const size_t smem = kHeadBytes + size_t(p.seg.num_seg + 1) * sizeof(int) + 1024 +
                      size_t(ring_stages<KP>()) * stage_bytes<KP>() + red_bytes<KP>();
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int grid = persistent_grid(row_tiles_at_most(p.seg, kRows, 1), o.num_sms, 1);  // one CTA a SM
  // PUNICA_SHRINK_PDL=0 (read once): launched without PDL, for A/B runs
  static const bool pdl = env_knob("PUNICA_SHRINK_PDL", 1) == 1;
  return launch(kernel, dim3(grid), dim3(kThreads), smem, o.stream, pdl && o.pdl, p, xmap, wmap,
                rows_per_slot);
}

template <typename T>
cudaError_t bulk_by_class(const ShrinkParams& p, const LaunchOptions& o) {
  const int r = p.seg.max_rank;
  return r <= 16 ? launch_bulk<T, 16>(p, o) : r <= 32 ? launch_bulk<T, 32>(p, o)
         : r <= 64 ? launch_bulk<T, 64>(p, o) : launch_bulk<T, 128>(p, o);
}

}  // namespace

// PUNICA_SHRINK_BULK (diagnostics, read once): "0" never, "1" whenever the shapes allow; unset,
// for pools of rank class 64 and 128 when the items (32-row tiles) keep at least 3/4 of the SMs
// busy on average over their waves. Measured on an H200 (benchmarks/diag/prefill_ab.py, 4096
// rows of 7B in segments of 512, bf16): rank 64 q/k/v/o 27.2 -> 23.0 us, gate/up 27.4 -> 23.0,
// down 51.9 -> 37.6; rank 16 slower (q/k/v/o 19.6 -> 22.0, gate/up 19.4 -> 22.1, down even).
bool shrink_bulk_fits(const ShrinkParams& p, const LaunchOptions& o) {
  static const char* env = std::getenv("PUNICA_SHRINK_BULK");
  static const int mode = !env ? 2 : std::atoi(env);
  if (mode == 0 || !o.vec || o.sm < 90 || p.seg.max_rank > kMaxRank || !tensor_map_encoder())
    return false;
  if (mode == 1) return true;
  if (p.seg.max_rank <= 32) return false;
  const int64_t items = ceil_div(p.seg.num_rows, kRows);
  const int64_t waves = (items + o.num_sms - 1) / o.num_sms;
  return 4 * items >= 3 * waves * o.num_sms;
}

cudaError_t shrink_bulk(DType dt, const ShrinkParams& p, const LaunchOptions& o) {
  if (!o.vec || p.seg.max_rank > kMaxRank) return cudaErrorInvalidValue;
  return dt == DType::kHalf ? bulk_by_class<__half>(p, o) : bulk_by_class<__nv_bfloat16>(p, o);
}

}  // namespace punica
