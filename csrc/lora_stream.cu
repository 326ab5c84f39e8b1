// Streamed LoRA decode: the same op as lora_fused.cu,
//   y[rows, off_p : off_p + out_p] (+)= (x[rows] @ a_p[slot, :r].T) @ b_p[slot, :r],
// shaped for running *beside* the base GEMM on the few SMs that GEMM leaves free.
//
// Why: cuBLAS's decode GEMMs hold a whole SM per CTA, so the LoRA launch beside one gets only
// the SMs it leaves free (16-36 on an H200), and there its bytes must flow at several times the
// average per-SM rate. Here a CTA (one per SM) walks its jobs (segment, projection) as a stream
// of bulk copies (TMA: no registers or threads per byte in flight) that a producer warp issues
// into a ring of 32 KB stages, while sixteen consumer warps reduce each stage:
//   x[row] goes to one of two x buffers (own barriers), once per job row;
//   a[slot, j0:j1] (whole rank rows: one contiguous copy per stage) -> partial dot products
//     of each rank row (a warp per part of a row), summed in a fixed order: v is deterministic
//     and rounded to the element type, as the pair's stored v is;
//   b[slot, j0:j1] (whole rank rows) -> fp32 sums in registers (each thread owns columns);
//     after the last rank row y is written once (plus y[row] from a y buffer when accumulating).
// Jobs go to CTAs round-robin; the grid size is the caller's choice (the SMs free beside the
// GEMM). Rows longer than a stage (in or out features > 16384) fall back to the fused kernel.
// The copies can also be the producer lanes' cp.async, each lane arriving on the stage's
// barrier when its own copies land (add_lora path 5; measured no faster). Alone a CTA moves only
// ~20-34 GB/s (docs/KERNELS.md); beside a GEMM it adds less than the fused kernel.
// sm_90 only (bulk copies, mbarrier transaction counts).
#include <cstdlib>

#include "sgmv_common.cuh"

namespace punica {
namespace {

constexpr int kConsumerWarps = 16;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kStreamThreads = kConsumers + 32;   // + the producer warp
constexpr int kMaxStages = 12;
constexpr int kDefaultStages = 6;
constexpr int kStageBytes = 32 * 1024;            // the largest stage (and the default)
constexpr int kRowLimit = kStageBytes / 2;        // elements of a row that fit one stage (2 B)
constexpr int kGroupsPerThread = kRowLimit / 8 / kConsumers;   // 16-byte column groups (4)

enum ChunkKind : int { kA = 0, kB = 1, kZero = 2, kDone = 3 };

// What a stage holds, written by the producer before it arms the stage's barrier.
struct Chunk {
  int kind, proj, row;
  int j0, rows, r;     // rank rows [j0, j0 + rows) of a rank-r job
  int buf;             // x / y buffer of the job row
  int last;            // last stage of its a or b
  int zero_end;        // kZero: rows [row, zero_end) of the projection's window get zeros
};

struct StreamSmem {
  uint64_t full[kMaxStages], empty[kMaxStages];
  uint64_t xfull[2], xempty[2], yfull[2], yempty[2];
  Chunk chunk[kMaxStages];
  float part[kMaxRank][kConsumerWarps];   // partial dot products: rank row x part
  float v[kMaxRank];                      // the job row's v, rounded to T
};

struct StreamLayout {
  int stages, stage_bytes, row_limit;
  int early_a;                  // stages of a issued before x (and the wait) in a CTA's first row
  int ring_off, x_off, y_off;   // byte offsets in shared memory
  int x_pitch, y_pitch;         // bytes per x / y buffer
};

__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
}

// Rank rows per stage of a (in features K): whole rows, at most one per consumer warp.
__host__ __device__ __forceinline__ int a_rows_per_stage(int K, int r, int row_limit) {
  return min(r, min(kConsumerWarps, row_limit / K));
}

// Diagnostic stamps (TIMELINE_STAMP, sgmv_common.cuh; PUNICA_TIMELINE builds of
// benchmarks/diag/fused_timeline.cu only): one thread per CTA writes %globaltimer at k = 0 entry, 1 the producer's first
// metadata in, 2 its first weight copy issued, 3 the consumers' griddepcontrol.wait done, 4 the
// first stage full, 7 the first job's v done, 5 its y written, 6 exit (the order of
// lora_fused.cu's stamps: its 7 is the shrink, 5 the reduction, 6 the exit).

// TMA: bulk copies (one per stage); else 16-byte cp.async by the producer's 32 lanes.
template <typename T, bool TMA>
__global__ void __launch_bounds__(kStreamThreads, 1)
    lora_stream_kernel(FusedParams p, StreamLayout L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char smem_raw[];
  StreamSmem& s = *reinterpret_cast<StreamSmem*>(smem_raw);
  unsigned char* ring = smem_raw + L.ring_off;
  auto xbuf = [&](int b) { return reinterpret_cast<T*>(smem_raw + L.x_off + b * L.x_pitch); };
  auto ybuf = [&](int b) { return reinterpret_cast<T*>(smem_raw + L.y_off + b * L.y_pitch); };
  pdl_launch_dependents();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) TIMELINE_STAMP(p, 0);
  if (tid == 0) {
    const int fills = TMA ? 1 : 32;   // arrivals that complete a fill
    for (int i = 0; i < L.stages; ++i) {
      mbar_init(&s.full[i], fills);
      mbar_init(&s.empty[i], kConsumerWarps);
    }
    for (int b = 0; b < 2; ++b) {
      mbar_init(&s.xfull[b], fills);
      mbar_init(&s.xempty[b], 1);
      mbar_init(&s.yfull[b], fills);
      mbar_init(&s.yempty[b], kConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();
  const int num_jobs = p.seg.num_seg * p.num_proj;
  const int K = p.in_features;

  if (warp == kConsumerWarps) {
    // ---------------- producer warp: lane 0 waits and arms the barriers; the copies are one
    // bulk copy by lane 0 (TMA) or 16-byte cp.async by every lane, each lane then arriving on
    // the barrier when its own copies have landed (LSU); the lanes share the metadata loads.
    const T* __restrict__ x = static_cast<const T*>(p.x);
    const T* __restrict__ yin = static_cast<const T*>(p.y);
    int stage = 0;
    uint32_t phase = 0;
    bool waited = false;   // griddepcontrol.wait done: x and y may come from the previous kernel
    unsigned seq = 0;      // job rows so far: buffer seq & 1, its use count seq >> 1
    auto wait_inputs = [&] {
      if (!waited) pdl_wait();
      waited = true;
    };
    // waits until the consumers have released `empty`, then expects `bytes` on `full`
    auto arm = [&](uint64_t* empty, uint32_t parity, uint64_t* full, uint32_t bytes,
                   const Chunk* c) {
      if (lane == 0) {
        mbar_wait(empty, parity);
        if (c) {
          s.chunk[stage] = *c;
          __threadfence_block();   // the chunk is visible before any arrival on `full`
        }
        if (TMA) mbar_arrive_expect_tx(full, bytes);
      }
      __syncwarp();
    };
    auto copy = [&](void* dst, const void* src, uint32_t bytes, uint64_t* full) {
      if (TMA) {
        if (lane == 0 && bytes > 0) bulk_copy(dst, src, bytes, full);
      } else {
        char* d = static_cast<char*>(dst);
        const char* g = static_cast<const char*>(src);
        for (uint32_t off = lane * 16; off < bytes; off += 32 * 16) cp_async16(d + off, g + off, 16);
        cp_async_arrive_noinc(full);
      }
    };
    auto stage_chunk = [&](const Chunk& c, const void* src, uint32_t bytes) {
      arm(&s.empty[stage], phase ^ 1, &s.full[stage], bytes, &c);
      copy(ring + size_t(stage) * L.stage_bytes, src, bytes, &s.full[stage]);
      if (++stage == L.stages) {
        stage = 0;
        phase ^= 1;
      }
    };
    for (int base = blockIdx.x; base < num_jobs; base += 32 * gridDim.x) {
      // the metadata of up to 32 of this CTA's jobs in one round trip, a job per lane
      const int mine = base + lane * gridDim.x;
      Segment g{0, 0, -1, 0};
      if (mine < num_jobs) {
        const int pi = mine % p.num_proj;
        SegmentArgs sa = p.seg;
        sa.ranks = p.proj[pi].ranks;
        sa.num_slots = p.proj[pi].num_slots;
        sa.max_rank = p.proj[pi].max_rank;
        g = load_segment(sa, mine / p.num_proj);
      }
#ifdef PUNICA_TIMELINE
      if (base == blockIdx.x) {
        const int first_slot = __shfl_sync(0xffffffffu, g.slot, 0);   // waits for the load
        if (lane == 0 && first_slot != -2) TIMELINE_STAMP(p, 1);
      }
#endif
      for (int i = 0; i < 32; ++i) {
        const int job = base + i * gridDim.x;
        if (job >= num_jobs) break;
        const int start = __shfl_sync(0xffffffffu, g.start, i);
        const int end = __shfl_sync(0xffffffffu, g.end, i);
        const int slot = __shfl_sync(0xffffffffu, g.slot, i);
        const int r = __shfl_sync(0xffffffffu, g.rank, i);
        const int pi = job % p.num_proj;
        const FusedProj& q = p.proj[pi];
        if (r <= 0 || end <= start) {
          if (!p.accumulate && end > start) {   // y = delta: these rows' delta is zero
            wait_inputs();
            stage_chunk(Chunk{kZero, pi, start, 0, 0, 0, 0, 0, end}, nullptr, 0);
          }
          continue;
        }
        const T* A = static_cast<const T*>(q.a) + slot * q.a_slot_stride;
        const T* B = static_cast<const T*>(q.b) + slot * q.b_slot_stride;
        const int N = q.out_features;
        const int ra = a_rows_per_stage(K, r, L.row_limit), rb = min(r, L.row_limit / N);
        for (int row = start; row < end; ++row, ++seq) {
          const int buf = seq & 1;
          const uint32_t use = (seq >> 1) & 1;
          // x after the first weights (only x waits for the previous kernel); in the CTA's
          // first row after L.early_a stages of them, so that more weight bytes are requested
          // before the wait. At most L.stages: the consumers need x to free an a stage
          const int early = waited ? 1 : L.early_a;
          bool x_issued = false;
          for (int j0 = 0, k = 1; j0 < r; j0 += ra, ++k) {
            const int rows = min(ra, r - j0);
            stage_chunk(Chunk{kA, pi, row, j0, rows, r, buf, j0 + rows >= r, 0},
                        A + int64_t(j0) * K, uint32_t(rows) * K * sizeof(T));
#ifdef PUNICA_TIMELINE
            if (lane == 0 && seq == 0 && j0 == 0) TIMELINE_STAMP(p, 2);
#endif
            if (!x_issued && (k >= early || j0 + rows >= r)) {
              x_issued = true;
              wait_inputs();
              arm(&s.xempty[buf], use ^ 1, &s.xfull[buf], K * sizeof(T), nullptr);
              copy(xbuf(buf), x + int64_t(row) * p.x_stride, K * sizeof(T), &s.xfull[buf]);
            }
          }
          if (p.accumulate) {
            arm(&s.yempty[buf], use ^ 1, &s.yfull[buf], N * sizeof(T), nullptr);
            copy(ybuf(buf), yin + int64_t(row) * p.y_stride + q.col_offset, N * sizeof(T),
                 &s.yfull[buf]);
          }
          for (int j0 = 0; j0 < r; j0 += rb) {
            const int rows = min(rb, r - j0);
            stage_chunk(Chunk{kB, pi, row, j0, rows, r, buf, j0 + rows >= r, 0},
                        B + int64_t(j0) * N, uint32_t(rows) * N * sizeof(T));
          }
        }
      }
    }
    stage_chunk(Chunk{kDone, 0, 0, 0, 0, 0, 0, 0, 0}, nullptr, 0);
    wait_inputs();   // every CTA waits before it exits (PDL)
    return;
  }

  // ---------------- consumer warps ----------------
  pdl_wait();
  if (tid == 0) TIMELINE_STAMP(p, 3);
  T* __restrict__ y = static_cast<T*>(p.y);
  int stage = 0;
  uint32_t phase = 0;
  unsigned seq = 0;
  float acc[kGroupsPerThread][8];
  for (;;) {
    mbar_wait(&s.full[stage], phase);
    const Chunk c = s.chunk[stage];
#ifdef PUNICA_TIMELINE
    if (tid == 0 && seq == 0 && c.kind == kA && c.j0 == 0) TIMELINE_STAMP(p, 4);
#endif
    if (c.kind == kDone) break;
    const uint4* st = reinterpret_cast<const uint4*>(ring + size_t(stage) * L.stage_bytes);
    const FusedProj& q = p.proj[c.proj];
    const uint32_t use = (seq >> 1) & 1;
    if (c.kind == kA) {
      if (c.j0 == 0) mbar_wait(&s.xfull[c.buf], use);
      const int parts = kConsumerWarps / c.rows, jj = warp / parts, pt = warp % parts;
      if (jj < c.rows) {
        const int n8 = K / 8, per = ceil_div(n8, parts);
        const int g0 = pt * per, g1 = min(n8, g0 + per);
        const uint4* xs = reinterpret_cast<const uint4*>(xbuf(c.buf));
        const uint4* as = st + int64_t(jj) * n8;
        float a = 0.f;
        for (int gi = g0 + lane; gi < g1; gi += 32) {
          float xf[8], af[8];
          unpack8<T>(xs[gi], xf);
          unpack8<T>(as[gi], af);
#pragma unroll
          for (int e = 0; e < 8; ++e) a = fmaf(xf[e], af[e], a);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane == 0) s.part[c.j0 + jj][pt] = a;
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&s.empty[stage]);
      if (c.last) {
        consumers_sync();   // every part of every rank row is in; x is no longer read
        if (tid == 0) mbar_arrive(&s.xempty[c.buf]);
        if (tid < c.r) {
          const int ra = a_rows_per_stage(K, c.r, L.row_limit);
          const int rows = min(ra, c.r - (tid / ra) * ra);
          float sum = 0.f;
          for (int q2 = 0; q2 < kConsumerWarps / rows; ++q2) sum += s.part[tid][q2];
          s.v[tid] = to_float(from_float<T>(sum));
        }
        consumers_sync();   // v complete
#ifdef PUNICA_TIMELINE
        if (tid == 0 && seq == 0) TIMELINE_STAMP(p, 7);
#endif
      }
    } else if (c.kind == kB) {
      const int n8 = q.out_features / 8;
      if (c.j0 == 0)
#pragma unroll
        for (int i = 0; i < kGroupsPerThread; ++i)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;
      for (int jj = 0; jj < c.rows; ++jj) {
        const float vj = s.v[c.j0 + jj];
        const uint4* bs = st + int64_t(jj) * n8;
#pragma unroll
        for (int i = 0; i < kGroupsPerThread; ++i) {
          const int gi = tid + i * kConsumers;
          if (gi >= n8) continue;
          float bf[8];
          unpack8<T>(bs[gi], bf);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(vj, bf[e], acc[i][e]);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&s.empty[stage]);
      if (c.last) {
        if (p.accumulate) mbar_wait(&s.yfull[c.buf], use);
        const uint4* ys = reinterpret_cast<const uint4*>(ybuf(c.buf));
        uint4* out = reinterpret_cast<uint4*>(y + int64_t(c.row) * p.y_stride + q.col_offset);
#pragma unroll
        for (int i = 0; i < kGroupsPerThread; ++i) {
          const int gi = tid + i * kConsumers;
          if (gi >= n8) continue;
          if (p.accumulate) {
            float cur[8];
            unpack8<T>(ys[gi], cur);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[i][e] += cur[e];
          }
          out[gi] = pack8<T>(acc[i]);
        }
        if (p.accumulate) {
          __syncwarp();
          if (lane == 0) mbar_arrive(&s.yempty[c.buf]);
        }
#ifdef PUNICA_TIMELINE
        if (tid == 0 && seq == 0) TIMELINE_STAMP(p, 5);
#endif
        ++seq;
      }
    } else {   // kZero
      __syncwarp();
      if (lane == 0) mbar_arrive(&s.empty[stage]);
      const int n8 = q.out_features / 8;
      for (int i = tid; i < (c.zero_end - c.row) * n8; i += kConsumers)
        *reinterpret_cast<uint4*>(y + int64_t(c.row + i / n8) * p.y_stride + q.col_offset +
                                  (i % n8) * 8) = make_uint4(0, 0, 0, 0);
    }
    if (++stage == L.stages) {
      stage = 0;
      phase ^= 1;
    }
  }
  if (tid == 0) TIMELINE_STAMP(p, 6);
#endif
}

constexpr int round128(int b) { return (b + 127) & ~127; }

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}

template <typename T, bool TMA>
cudaError_t launch_stream(DType dt, const FusedParams& p, int ctas, const LaunchOptions& o) {
  int max_n = 0;
  for (int i = 0; i < p.num_proj; ++i) max_n = max(max_n, p.proj[i].out_features);
  int dev = 0, smem_max = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    smem_max = 0;
  StreamLayout L;
  L.ring_off = round128(int(sizeof(StreamSmem)));
  L.x_pitch = round128(p.in_features * int(sizeof(T)));
  L.y_pitch = p.accumulate ? round128(max_n * int(sizeof(T))) : 0;
  const int fixed = L.ring_off + 2 * L.x_pitch + 2 * L.y_pitch;
  // Diagnostics only (benchmarks/diag/overlap_site.py): PUNICA_STREAM_STAGES (1..12) and
  // PUNICA_STREAM_STAGE_KB (4..32) override the ring's depth and stage size.
  static const int env_stages = env_int("PUNICA_STREAM_STAGES", 0);
  static const int env_kb = env_int("PUNICA_STREAM_STAGE_KB", 0);
  // and PUNICA_STREAM_EARLY_A (default 1) how many stages of a a CTA's first row issues before
  // x and the wait for the previous kernel (benchmarks/diag/fused_timeline.cu ... stream)
  static const int env_early = env_int("PUNICA_STREAM_EARLY_A", 1);
  L.stage_bytes = env_kb >= 4 && env_kb <= 32 ? env_kb * 1024 : kStageBytes;
  L.row_limit = L.stage_bytes / int(sizeof(T));
  const int fit = (smem_max - fixed) / L.stage_bytes;
  L.stages = min(fit, env_stages >= 1 && env_stages <= kMaxStages ? env_stages : kDefaultStages);
  L.early_a = max(1, min(env_early, L.stages));
  // rows that do not fit a stage (or a GPU with too little shared memory): the fused kernel
  if (p.in_features > L.row_limit || max_n > L.row_limit || L.stages < 1 ||
      (L.stages < 2 && env_stages == 0))
    return lora_fused(dt, p, o);
  L.x_off = L.ring_off + L.stages * L.stage_bytes;
  L.y_off = L.x_off + 2 * L.x_pitch;
  const size_t smem = size_t(L.y_off) + 2 * size_t(L.y_pitch);
  auto kernel = lora_stream_kernel<T, TMA>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int jobs = p.seg.num_seg * p.num_proj;
  const int grid = max(1, min(ctas > 0 ? ctas : o.num_sms, jobs));
  return launch(kernel, dim3(grid), dim3(kStreamThreads), smem, o.stream, o.pdl, p, L);
}

}  // namespace

cudaError_t lora_stream(DType dt, const FusedParams& p, int ctas, bool tma,
                        const LaunchOptions& o) {
  if (!o.vec || p.num_proj < 1 || p.num_proj > kMaxFusedProj) return cudaErrorInvalidValue;
  if (dt == DType::kHalf)
    return tma ? launch_stream<__half, true>(dt, p, ctas, o)
               : launch_stream<__half, false>(dt, p, ctas, o);
  return tma ? launch_stream<__nv_bfloat16, true>(dt, p, ctas, o)
             : launch_stream<__nv_bfloat16, false>(dt, p, ctas, o);
}

}  // namespace punica
