// TMA tensor copies (sm_90): 2-D maps over rows of activations or of a weight pool, encoded on
// the host per launch (the map holds the base pointer, so a CUDA graph replays it with the
// captured tensors, like any pointer argument), and the copies that use them.
#pragma once

#include <cuda.h>            // CUtensorMap (the type only; the encoder comes from the runtime)
#include <cudaTypedefs.h>

#include <type_traits>

#include "sgmv_common.cuh"

namespace punica {

// TMA tensor copy of the box at (c0 = column, c1 = row) to shared memory, completing on bar
// (sm_90; a no-op below).
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1,
                                            uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
#endif
}

// TMA tensor store of the shared-memory box at src to (c0 = column, c1 = row), in the bulk group
// that the next tma_store_commit closes; boxes past the map's bounds are clipped.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, int c0, int c1, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(smem_u32(src))
               : "memory");
#endif
}
__device__ __forceinline__ void tma_store_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#endif
}
// Waits until at most N of this thread's store groups still read their shared memory (their
// boxes may be rewritten then).
template <int N>
__device__ __forceinline__ void tma_store_wait_read() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
#endif
}
// Waits until all of this thread's store groups are complete.
__device__ __forceinline__ void tma_store_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#endif
}
// Makes this thread's shared-memory writes visible to the TMA engine (before a CTA barrier and a
// store of them).
__device__ __forceinline__ void fence_smem_to_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}

// cuTensorMapEncodeTiled, looked up once through the runtime (no link against the driver
// library); null where the driver lacks it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
            cudaSuccess || q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 2-D map over rows of `cols` elements of T (__half or __nv_bfloat16), `row_bytes` apart, read
// and written as boxes of box_rows x box_cols (64: one 128-byte row) with the 128-byte swizzle
// (swz(row, k, 64)'s layout in shared memory); loads out of range read zeros, stores out of range
// are dropped.
template <typename T>
bool encode_rows(CUtensorMap* map, const void* base, uint64_t cols, uint64_t rows,
                 uint64_t row_bytes, uint32_t box_cols, uint32_t box_rows) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "fp16 or bf16");
  const auto encode = tensor_map_encoder();
  if (!encode) return false;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem[2] = {1, 1};
  const auto type = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                              : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(map, type, 2, const_cast<void*>(base), dims, strides, box, elem,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// An expand's y as a map for TMA boxes of box_rows x box_cols (box_cols 64: one 128-byte row):
// rows of `out` columns from the column offset. False where TMA cannot address y (the offset or
// the stride not a multiple of 16 bytes) or the driver lacks the encoder.
template <typename T>
bool encode_expand_y(CUtensorMap* map, const ExpandParams& p, uint32_t box_cols, uint32_t box_rows) {
  const auto base = reinterpret_cast<uintptr_t>(static_cast<const T*>(p.y) + p.col_offset);
  if (base % 16 != 0 || (int64_t(p.y_stride) * int64_t(sizeof(T))) % 16 != 0 || p.seg.num_rows < 1)
    return false;
  return encode_rows<T>(map, reinterpret_cast<const void*>(base), p.out_features, p.seg.num_rows,
                        uint64_t(p.y_stride) * sizeof(T), box_cols, box_rows);
}

}  // namespace punica
