// Diagnostic: how fast TMA tensor boxes stream an activation matrix, by box shape, the way
// csrc/sgmv_shrink_bulk.cu reads x (and a).
//
//   nvcc -O3 -std=c++17 -Icsrc -Ibenchmarks/diag -gencode=arch=compute_90a,code=sm_90a \
//        benchmarks/diag/tma_rate.cu -o /tmp/tma_rate && /tmp/tma_rate
//
// Why: the bulk shrink moves ~40 GB/s a SM through its boxes (32 rows x 64 columns of x, the rank
// class's rows x 64 of a, 128-byte swizzle) whatever its ring depth; with x in HBM a 4096 x 4096
// shrink takes ~22 us whatever a's bytes (x at ~1.5 TB/s), where the copy bandwidth is ~4.2 TB/s
// (results/diag/prefill_bulk_s17_h200.txt). This program streams a 256 MB bf16 matrix (past the
// 50 MB L2) in bands of R rows, one CTA a SM walking its bands' columns, each stage one of:
//   2d   nb boxes of R rows x 64 columns side by side (nb instructions a stage; the kernel's way)
//   3d   one box of R rows x nb 64-column pieces (a 3-D map: pieces x rows; one instruction)
// plus, with wrows > 0, a box of wrows x 64 columns of a small L2-resident matrix per 64 columns
// (the shrink's a); stagger: each band starts at another column (CTAs read different column
// ranges at the same time instead of the same one). One consumer warp only waits and frees the stages: no arithmetic. Prints the
// matrix's GB/s (HBM) and the boxes' GB/s per CTA.
// Not part of the build or the tests; no torch.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>

#include "cuda_check.cuh"
#include "sgmv_common.cuh"
#include "tma.cuh"

using namespace punica;

constexpr int kMaxStages = 16;
constexpr int kRows = 32768, kCols = 4096;   // 256 MB of bf16 (rows of Llama-2-7B's hidden size)
constexpr int kWRows = 128;                  // the small matrix: [kWRows, kCols]

__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
      : "memory");
#endif
}

// grid-stride over bands of R rows; each band's columns in stages of nb x 64
__global__ void __launch_bounds__(64, 1)
    stream(const __grid_constant__ CUtensorMap xmap, const __grid_constant__ CUtensorMap wmap,
           bool three_d, int R, int nb, int wrows, int stages, bool stagger) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw);
  uint64_t* empty = full + kMaxStages;
  unsigned char* ring = smem_raw + 2 * kMaxStages * sizeof(uint64_t);
  ring += (1024u - (smem_u32(ring) & 1023u)) & 1023u;
  const int xbytes = R * 64 * nb * 2, wbytes = wrows * 64 * nb * 2;
  const int stage = ((xbytes + wbytes) + 1023) / 1024 * 1024;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 1);
    }
    mbar_init_fence();
  }
  __syncthreads();
  const int bands = kRows / R, steps = kCols / (64 * nb);
  int it = 0;
  if (warp == 1) {  // producer
    if (lane != 0) return;
    for (int b = blockIdx.x; b < bands; b += gridDim.x)
      for (int kk = 0; kk < steps; ++kk, ++it) {
        const int k = stagger ? (kk + b * 5) % steps : kk;  // CTAs at different columns at once
        const int st = it % stages;
        if (it >= stages) mbar_wait(&empty[st], ((it / stages) - 1) & 1);
        unsigned char* dst = ring + st * stage;
        mbar_arrive_expect_tx(&full[st], xbytes + wbytes);
        if (three_d) {
          tma_load_3d(dst, &xmap, 0, k * nb, b * R, &full[st]);
        } else {
          for (int j = 0; j < nb; ++j)
            tma_load_2d(dst + j * R * 128, &xmap, (k * nb + j) * 64, b * R, &full[st]);
        }
        for (int j = 0; wrows > 0 && j < nb; ++j)
          tma_load_2d(dst + xbytes + j * wrows * 128, &wmap, (k * nb + j) * 64, 0, &full[st]);
      }
    return;
  }
  for (int b = blockIdx.x; b < bands; b += gridDim.x)  // consumer: wait and free
    for (int k = 0; k < steps; ++k, ++it) {
      const int st = it % stages;
      mbar_wait(&full[st], (it / stages) & 1);
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[st]);
    }
}

int main(int argc, char** argv) {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  void *x = nullptr, *w = nullptr;
  CHECK(cudaMalloc(&x, size_t(kRows) * kCols * 2));
  CHECK(cudaMalloc(&w, size_t(kWRows) * kCols * 2));
  CHECK(cudaMemset(x, 0, size_t(kRows) * kCols * 2));
  CHECK(cudaMemset(w, 0, size_t(kWRows) * kCols * 2));
  CHECK(cudaFuncSetAttribute(stream, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  const auto encode = tensor_map_encoder();
  if (!encode) { std::printf("no cuTensorMapEncodeTiled\n"); return 1; }
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::printf("mode R nb wrows stagger stages ctas: us  HBM GB/s  box GB/s per CTA\n");
  // (mode, R, nb, wrows, stagger): the bulk shrink's stage is 2d 32 2 {16, 64} 0
  const int cases[][5] = {{0, 32, 2, 0, 0},  {0, 32, 2, 16, 0}, {0, 32, 2, 64, 0}, {0, 32, 2, 0, 1},
                          {0, 32, 2, 64, 1}, {0, 32, 4, 0, 0},  {0, 64, 2, 0, 0},  {0, 128, 1, 0, 0},
                          {1, 32, 2, 0, 0},  {1, 32, 4, 0, 0},  {1, 32, 8, 0, 0},  {1, 64, 4, 0, 0},
                          {1, 32, 4, 64, 0}, {1, 32, 4, 0, 1}};
  for (const auto& c : cases) {
    const bool three_d = c[0] == 1;
    const int R = c[1], nb = c[2], wrows = c[3];
    const bool stagger = c[4] == 1;
    CUtensorMap xmap, wmap;
    if (three_d) {  // dims (64 elements, pieces, rows), strides (128 B, row bytes)
      const cuuint64_t dims[3] = {64, kCols / 64, kRows};
      const cuuint64_t strides[2] = {128, uint64_t(kCols) * 2};
      const cuuint32_t box[3] = {64, uint32_t(nb), uint32_t(R)};
      const cuuint32_t elem[3] = {1, 1, 1};
      if (encode(&xmap, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, x, dims, strides, box, elem,
                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
        std::printf("3d map failed\n");
        continue;
      }
    } else if (!encode_rows<__nv_bfloat16>(&xmap, x, kCols, kRows, uint64_t(kCols) * 2, 64, R)) {
      std::printf("2d map failed\n");
      continue;
    }
    if (!encode_rows<__nv_bfloat16>(&wmap, w, kCols, kWRows, uint64_t(kCols) * 2, 64,
                     wrows > 0 ? wrows : 16))
      return 1;
    const int stage = (R + wrows) * 64 * nb * 2;
    for (int ctas : {1, sms}) {
      const int stages = std::min(kMaxStages, int(192 * 1024 / ((stage + 1023) / 1024 * 1024)));
      const size_t smem = 2 * kMaxStages * 8 + 1024 + size_t(stages) * ((stage + 1023) / 1024 * 1024);
      stream<<<ctas, 64, smem>>>(xmap, wmap, three_d, R, nb, wrows, stages, stagger);
      CHECK(cudaGetLastError());
      CHECK(cudaEventRecord(e0));
      stream<<<ctas, 64, smem>>>(xmap, wmap, three_d, R, nb, wrows, stages, stagger);
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      float ms = 0.f;
      CHECK(cudaEventElapsedTime(&ms, e0, e1));
      const double xb = double(kRows) * kCols * 2, boxes = xb * (R + wrows) / R;
      std::printf("%s %3d %d %3d %d %2d %3d: %9.1f  %7.0f  %6.1f\n", three_d ? "3d" : "2d", R, nb, wrows,
                  int(stagger), stages, ctas, ms * 1e3, xb / ms / 1e6, boxes / ms / 1e6 / ctas);
    }
  }
  return 0;
}
