// Shared pieces of the SGMV kernels: element types, 16-byte loads, segment metadata, the
// per-CTA work list, programmatic dependent launch (PDL), mbarriers and bulk copies, and
// tensor-core helpers.
// Pure CUDA (no torch headers), so the .cu files compile quickly.
#pragma once
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "sgmv.h"

namespace punica {

// Diagnostic stamps (PUNICA_TIMELINE builds only: benchmarks/diag/fused_timeline.cu; empty
// otherwise): the calling thread writes %globaltimer into p.tl[launch][CTA][k], k < 8.
#ifdef PUNICA_TIMELINE
template <typename P>
__device__ __forceinline__ void timeline_stamp(const P& p, int k) {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  p.tl[(size_t(p.tl_launch) * gridDim.x + blockIdx.x) * 8 + k] = t;
}
#define TIMELINE_STAMP(p, k) timeline_stamp(p, k)
#else
#define TIMELINE_STAMP(p, k) ((void)0)
#endif

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Element conversions (fp32 accumulation everywhere).
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }

template <typename T> struct Pair;
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Eight elements (16 bytes) as floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[8]) {
  using T2 = typename Pair<T>::type;
  const T2* p = reinterpret_cast<const T2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = to_float2(p[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&in)[8]) {
  uint4 raw;
  T* p = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) p[i] = from_float<T>(in[i]);
  return raw;
}

// Loads 8 consecutive elements. VEC: one 16-byte read-only load (the caller guarantees 16-byte
// alignment and that all 8 are in range). Otherwise element loads of the first `n_valid`
// elements, zeros past them (the path for sizes that are not multiples of 8).
template <typename T, bool VEC>
__device__ __forceinline__ uint4 load8(const T* p, int n_valid) {
  if constexpr (VEC) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    uint4 raw = make_uint4(0, 0, 0, 0);
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < n_valid) e[i] = p[i];
    return raw;
  }
}

// ---------------------------------------------------------------------------------------------
// Segments. Every value read from the metadata tensors is clamped, so that a bad slot id, rank
// or indptr can make the result wrong but can never make a kernel read or write out of bounds.
struct Segment {
  int start, end, slot, rank;
  __device__ __forceinline__ bool active() const { return rank > 0 && end > start; }
};

__device__ __forceinline__ Segment load_segment(const SegmentArgs& a, int s) {
  Segment g;
  g.start = min(max(a.seg_indptr[s], 0), a.num_rows);
  g.end = min(max(a.seg_indptr[s + 1], g.start), a.num_rows);
  g.slot = a.slot_ids[s];
  g.rank = 0;
  if (g.slot >= 0 && g.slot < a.num_slots) g.rank = min(max(a.ranks[g.slot], 0), a.max_rank);
  if (g.end <= g.start) g.rank = 0;
  return g;
}

// Every CTA builds the same work list in shared memory: prefix[s] = first work item of segment
// s, prefix[num_seg] = total. The number of items per segment depends on its rank and length,
// which live on the device: computing the list here keeps the host free of syncs (and the ops
// capturable in CUDA graphs) and lets one launch mix ranks 1..128 without padding.
// Needs blockDim.x to be a multiple of 32 and at most 1024.
template <typename CountFn>
__device__ int build_worklist(int* prefix, int num_seg, CountFn count) {
  __shared__ int warp_sums[32];
  __shared__ int carry_s;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  if (tid == 0) {
    prefix[0] = 0;
    carry_s = 0;
  }
  __syncthreads();
  for (int base = 0; base < num_seg; base += blockDim.x) {
    const int s = base + tid;
    int x = s < num_seg ? count(s) : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
      int w = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      warp_sums[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const int incl = carry_s + (warp > 0 ? warp_sums[warp - 1] : 0) + x;
    if (s < num_seg) prefix[s + 1] = incl;
    __syncthreads();
    if (tid == blockDim.x - 1) carry_s = incl;
    __syncthreads();
  }
  return prefix[num_seg];
}

// The work list's shared memory in 1 KB steps (up to 255 segments: 1 KB), so that launches of
// similar batches share one shared-memory size (and one cached occupancy); what a kernel keeps
// after its work list starts that far after it.
__host__ __device__ __forceinline__ size_t prefix_bytes(int num_seg) {
  return (size_t(num_seg + 1) * sizeof(int) + 1023) / 1024 * 1024;
}

// The segment that owns work item t (prefix[s] <= t < prefix[s + 1]); empty segments own none.
__device__ __forceinline__ int find_segment(const int* prefix, int num_seg, int t) {
  int lo = 0, hi = num_seg;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (prefix[mid] <= t) lo = mid; else hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90). A kernel lets the next one start at once; the next one
// reads metadata and warms L2 with its weights while this one finishes, then waits for it
// before touching anything this one writes. Both are no-ops when not launched with PDL.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// y[pair] += d as one reduction at L2 (sm_90; red.global.add.noftz on f16x2 / bf16x2): no read
// of y by the SM, so no round trip. d is rounded to T first (y + round(d), rounded: as torch's
// bf16 `y += delta` does), one red per element per launch, so the result is deterministic.
template <typename T>
__device__ __forceinline__ void red_add_pair(typename Pair<T>::type* dst, float2 d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  typename Pair<T>::type v;
  v.x = from_float<T>(d.x);
  v.y = from_float<T>(d.y);
  const uint32_t bits = *reinterpret_cast<const uint32_t*>(&v);
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("red.global.add.noftz.f16x2 [%0], %1;" ::"l"(dst), "r"(bits) : "memory");
  else
    asm volatile("red.global.add.noftz.bf16x2 [%0], %1;" ::"l"(dst), "r"(bits) : "memory");
#endif
}

// Thread-block cluster barrier (sm_90), split so a CTA can work between its arrive and its
// wait: release on arrive, acquire on wait (distributed shared memory writes become visible).
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire;" ::: "memory");
#endif
}

// Asks L2 to fetch [p, p + bytes): a hint that consumes no data, so it is safe before pdl_wait.
// p 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// Spreads an L2 prefetch of a contiguous span over the CTA's threads, 4 KB per instruction.
__device__ __forceinline__ void prefetch_span_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = int64_t(threadIdx.x) * 4096; off < bytes; off += int64_t(blockDim.x) * 4096)
    prefetch_l2(c + off, uint32_t(bytes - off < 4096 ? bytes - off : 4096));
}

// ---------------------------------------------------------------------------------------------
// Tensor cores: cp.async, ldmatrix and mma.sync m16n8k16 (sm_80 and later).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies src_bytes (0..16) from global and zero-fills the rest of the 16 bytes. With 0 bytes
// nothing is read from global memory.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------------------------------------
// mbarriers and bulk copies (sm_90; no-ops below): a ring of shared-memory stages whose fills
// complete by transaction counts (lora_stream.cu, benchmarks/diag/stream_rate.cu).
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count)
               : "memory");
#endif
}
// Makes this thread's mbarrier initialisations visible to the async proxy (the copies that
// complete on them); a CTA barrier must follow before other threads use them.
__device__ __forceinline__ void mbar_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
#endif
}
// A ring of `n` stages with one mbarrier each (count 1), initialised by thread 0; a CTA barrier
// must follow before any use.
__device__ __forceinline__ void init_slot_bars(uint64_t* bars, int n) {
  if (threadIdx.x == 0) {
    for (int i = 0; i < n; ++i) mbar_init(&bars[i], 1);
    mbar_init_fence();
  }
}
// Waits for stage `slot`'s barrier to complete its current phase; `phases` holds each stage's
// next parity (one completion a use of the stage).
__device__ __forceinline__ void wait_slot_bar(uint64_t* bars, uint32_t& phases, int slot) {
  mbar_wait(&bars[slot], (phases >> slot) & 1u);
  phases ^= 1u << slot;
}
// global -> shared bulk copy (TMA) completing `bytes` on the barrier; 16-byte aligned, size % 16.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
#endif
}
// Arrives on the barrier once this thread's earlier cp.async copies have landed (the barrier's
// count includes this arrival).
__device__ __forceinline__ void cp_async_arrive_noinc(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(bar))
               : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}
// The inverse of ldmatrix_x4 (sm_90; a no-op below).
__device__ __forceinline__ void stmatrix_x4(void* smem, const uint32_t (&r)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(smem_u32(smem)),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-memory tiles of 16-byte chunks are XOR-swizzled (chunk ^ row % 8) so that ldmatrix's
// eight row addresses fall in distinct banks. Offset in elements of (row, k) for rows of
// `row_elems` elements (a multiple of 64).
__device__ __forceinline__ int swz(int row, int k, int row_elems) {
  return row * row_elems + ((((k >> 3) ^ (row & 7))) << 3) + (k & 7);
}

// tile += a warp's MMA accumulators: MI x NI fragments of 16 x 8 at (row0, col0) of a swizzled
// shared-memory tile of ROW-element rows. Each thread adds its (row, column pair) cells in fp32
// and rounds each once (the tensor-core expands' y update).
template <typename T, int ROW, int MI, int NI>
__device__ __forceinline__ void add_fragments(T* tile, const float (&acc)[MI][NI][4], int row0,
                                              int col0, int lane) {
  static_assert(ROW % 64 == 0, "swizzled rows of a multiple of 64 elements");
  using T2 = typename Pair<T>::type;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + mi * 16 + (lane >> 2) + h * 8;
        const int c = col0 + ni * 8 + (lane & 3) * 2;
        T2* cell = reinterpret_cast<T2*>(tile + swz(row, c, ROW));
        const float2 cur = to_float2(*cell);
        T2 out;
        out.x = from_float<T>(cur.x + acc[mi][ni][2 * h]);
        out.y = from_float<T>(cur.y + acc[mi][ni][2 * h + 1]);
        *cell = out;
      }
}

// tile += a warp's MMA accumulators (32 rows x 32 columns at row0, col0 of a swizzled tile of
// 64-element rows): ldmatrix gives 8 x 8 blocks of the tile in the accumulators'
// layout, so each thread adds its cells in fp32, rounds each once (as add_fragments does) and
// writes them back with stmatrix: 4 + 4 instructions for what add_fragments moves with 16 + 16.
template <typename T>
__device__ __forceinline__ void add_fragments_ldsm(T* tile, const float (&acc)[2][4][4], int row0,
                                                   int col0, int lane) {
  using T2 = typename Pair<T>::type;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      // lanes 8m..8m+7 address matrix m's rows: m & 1 picks rows +8, m >> 1 columns +8
      const int row = row0 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      T* cell = tile + swz(row, col0 + np * 16 + (lane >> 4) * 8, 64);
      uint32_t r[4];
      ldmatrix_x4(r, cell);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float* a = &acc[mi][2 * np + (j >> 1)][(j & 1) * 2];
        T2 cur = *reinterpret_cast<const T2*>(&r[j]);
        const float2 f = to_float2(cur);
        cur.x = from_float<T>(f.x + a[0]);
        cur.y = from_float<T>(f.y + a[1]);
        r[j] = *reinterpret_cast<const uint32_t*>(&cur);
      }
      stmatrix_x4(cell, r);
    }
}

// Two elements (k, k + 1) of a row of v as one A-fragment register; elements at or past the rank
// and rows at or past `end` are zeros (never read).
template <typename T>
__device__ __forceinline__ uint32_t load_v_pair(const T* v, int64_t stride, int row, int end, int k,
                                                int rank) {
  if (row >= end || k >= rank) return 0u;
  const T* src = v + int64_t(row) * stride + k;
  if (k + 1 < rank) return *reinterpret_cast<const uint32_t*>(src);
  return uint32_t(*reinterpret_cast<const uint16_t*>(src));  // element k is the low half
}

// Launches `kernel` with PDL when asked (sm_90), else as a plain launch.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   bool pdl, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Raises the dynamic shared-memory limit of a kernel when it needs more than 48 KB.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

// Resident CTAs per SM for a kernel (for sizing persistent grids).
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads, size_t smem) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) != cudaSuccess)
    n = 1;
  return n > 0 ? n : 1;
}

// blocks_per_sm of one kernel, asked once per shared-memory size: an occupancy query costs
// microseconds of host time, which eager steps would pay per launch. One cache per kernel (the
// kernel is the template argument: kernels of one signature share a pointer type). The size and
// its answer live in one atomic word, so threads launching at once never pair a size with
// another size's answer.
template <auto Kernel>
int cached_blocks_per_sm(int threads, size_t smem) {
  static std::atomic<uint64_t> memo{0};  // (smem << 32) | blocks; 0: nothing asked yet
  const uint64_t m = memo.load(std::memory_order_relaxed);
  if (m != 0 && (m >> 32) == uint64_t(smem)) return int(uint32_t(m));
  const int n = blocks_per_sm(Kernel, threads, smem);
  memo.store((uint64_t(smem) << 32) | uint32_t(n), std::memory_order_relaxed);
  return n;
}

// A bound on the tiles of `bm` rows that a launch's segments cut its rows into (each segment may
// end in a partial one), times the tiles a row block has (column tiles, K slices): at most one
// CTA per tile.
inline int64_t row_tiles_at_most(const SegmentArgs& s, int bm, int per_row_block) {
  return (int64_t(ceil_div(s.num_rows, bm)) + s.num_seg) * per_row_block;
}

// A persistent grid: no more CTAs than work items, nor than fit on the GPU at once.
inline int persistent_grid(int64_t items, int num_sms, int per_sm) {
  const int64_t fit = int64_t(num_sms) * per_sm;
  return int(items < 1 ? 1 : items < fit ? items : fit);
}

// An integer knob from the environment (diagnostics and A/B runs), `fallback` when unset; callers
// keep the value in a static, so it is read once per process.
inline int env_knob(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}

}  // namespace punica
