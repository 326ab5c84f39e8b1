// Diagnostic: how many bytes per second one SM can pull, by the ways csrc/lora_stream.cu could.
//
//   nvcc -O3 -std=c++17 -Icsrc -gencode=arch=compute_90a,code=sm_90a \
//        benchmarks/diag/stream_rate.cu -o /tmp/stream_rate && /tmp/stream_rate [MB_per_CTA]
//
// Why: the streamed LoRA kernel moves only ~20-34 GB/s per CTA (one CTA per SM), whatever its
// ring depth, copy engine or L2 residency (docs/KERNELS.md). This program streams disjoint
// slices of a 2 GB buffer into a ring of shared-memory stages with N CTAs (one per SM) and
// nothing else, so the ceiling of each way is measured without the LoRA arithmetic:
//   tma    one bulk copy (cp.async.bulk) per stage by one thread, mbarrier transaction counts
//   lsu    16-byte cp.async by a producer warp, cp.async.mbarrier.arrive.noinc per lane
//   ldg    16-byte loads by every thread straight into registers (summed, no shared memory)
// and, for tma and lsu, consumers that only wait and release (idle) or also sum the stage
// (sum). Prints GB/s per CTA and in all, for a sweep of CTAs, stages and stage sizes.
// Not part of the build or the tests; no torch.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.cuh"
#include "sgmv_common.cuh"

constexpr int kConsumerWarps = 16;
constexpr int kThreads = (kConsumerWarps + 1) * 32;
constexpr int kMaxStages = 12;

using namespace punica;   // the mbarrier, bulk-copy and cp.async helpers of the kernels

enum Mode { kTma = 0, kLsu = 1, kLdg = 2 };

// Each CTA streams bytes [blockIdx.x * per_cta, +per_cta) of src through `stages` stages of
// `stage_bytes`. sum: consumers add up every 16-byte word (written to out so it is not elided).
template <int MODE>
__global__ void __launch_bounds__(kThreads, 1)
    stream(const char* __restrict__ src, int64_t per_cta, int stages, int stage_bytes, bool sum,
           float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const char* base = src + blockIdx.x * per_cta;
  const int64_t chunks = per_cta / stage_bytes;
  float acc = 0.f;
  if (MODE == kLdg) {   // every thread streams its share through registers, 4 loads in flight
    const uint4* p = reinterpret_cast<const uint4*>(base);
    const int64_t n = per_cta / 16;
    for (int64_t i = tid; i < n; i += 4 * kThreads) {
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        v[u] = i + u * kThreads < n ? __ldg(p + i + u * kThreads) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < 4; ++u) acc += __int_as_float(v[u].x ^ v[u].y ^ v[u].z ^ v[u].w);
    }
    if (acc == 1.2345f) *out = acc;
    return;
  }
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + kMaxStages;
  unsigned char* ring = smem + 256;
  if (tid == 0) {
    for (int i = 0; i < stages; ++i) {
      mbar_init(&full[i], MODE == kTma ? 1 : 32);
      mbar_init(&empty[i], kConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();
  if (warp == kConsumerWarps) {   // producer
    int st = 0;
    uint32_t ph = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      if (lane == 0) {
        mbar_wait(&empty[st], ph ^ 1);
        if (MODE == kTma) mbar_arrive_expect_tx(&full[st], stage_bytes);
      }
      __syncwarp();
      unsigned char* dst = ring + size_t(st) * stage_bytes;
      const char* from = base + c * stage_bytes;
      if (MODE == kTma) {
        if (lane == 0) bulk_copy(dst, from, stage_bytes, &full[st]);
      } else {
        for (int off = lane * 16; off < stage_bytes; off += 32 * 16)
          cp_async16(dst + off, from + off, 16);
        cp_async_arrive_noinc(&full[st]);
      }
      if (++st == stages) {
        st = 0;
        ph ^= 1;
      }
    }
    return;
  }
  int st = 0;
  uint32_t ph = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    mbar_wait(&full[st], ph);
    if (sum) {
      const uint4* w = reinterpret_cast<const uint4*>(ring + size_t(st) * stage_bytes);
      for (int i = tid; i < stage_bytes / 16; i += kConsumerWarps * 32) {
        const uint4 v = w[i];
        acc += __int_as_float(v.x ^ v.y ^ v.z ^ v.w);
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[st]);
    if (++st == stages) {
      st = 0;
      ph ^= 1;
    }
  }
  if (acc == 1.2345f) *out = acc;
}

template <int MODE>
float run(const char* src, int ctas, int64_t per_cta, int stages, int stage_bytes, bool sum,
          float* out) {
  const size_t smem = 256 + size_t(stages) * stage_bytes;
  CHECK(cudaFuncSetAttribute(stream<MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem)));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  stream<MODE><<<ctas, kThreads, smem>>>(src, per_cta, stages, stage_bytes, sum, out);  // warm
  CHECK(cudaGetLastError());
  float best = 1e30f;
  for (int rep = 0; rep < 5; ++rep) {
    CHECK(cudaEventRecord(a));
    stream<MODE><<<ctas, kThreads, smem>>>(src, per_cta, stages, stage_bytes, sum, out);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    best = ms < best ? ms : best;
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return best;
}

int main(int argc, char** argv) {
  const int64_t mb = argc > 1 ? std::atoll(argv[1]) : 8;   // bytes per CTA: MB
  const int64_t per_cta = mb << 20;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t total = size_t(sms) * per_cta;
  char* src = nullptr;
  float* out = nullptr;
  CHECK(cudaMalloc(&src, total));
  CHECK(cudaMalloc(&out, sizeof(float)));
  CHECK(cudaMemset(src, 1, total));
  std::printf("%d SMs, %lld MB per CTA (beyond L2: %s)\n", sms, (long long)mb,
              total > (64u << 20) ? "yes" : "no");
  std::printf("%-4s %-5s %5s %7s %8s %12s %12s\n", "way", "cons", "ctas", "stages", "stage_KB",
              "GB/s per CTA", "GB/s in all");
  const std::vector<int> cta_counts = {1, 8, 32, 64, sms};
  const char* names[] = {"tma", "lsu", "ldg"};
  for (int mode = 0; mode < 3; ++mode)
    for (int s : {0, 1})
      for (int ctas : cta_counts)
        for (int stages : {1, 2, 6, 12})
          for (int kb : {8, 16, 32}) {
            if (mode == kLdg && (s == 0 || stages != 1 || kb != 32)) continue;
            if (size_t(stages) * kb * 1024 + 256 > 227 * 1024) continue;
            const int sb = kb * 1024;
            float ms = mode == kTma   ? run<kTma>(src, ctas, per_cta, stages, sb, s, out)
                       : mode == kLsu ? run<kLsu>(src, ctas, per_cta, stages, sb, s, out)
                                      : run<kLdg>(src, ctas, per_cta, stages, sb, s, out);
            const double per = double(per_cta) / (ms * 1e-3) / 1e9;
            std::printf("%-4s %-5s %5d %7d %8d %12.1f %12.0f\n", names[mode], s ? "sum" : "idle",
                        ctas, stages, kb, per, per * ctas);
          }
  CHECK(cudaFree(src));
  CHECK(cudaFree(out));
  return 0;
}
