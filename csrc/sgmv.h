// The interface between the torch registration (sgmv_ops.cpp) and the kernels (sgmv_*.cu).
// Plain structs of pointers and sizes: the .cu files never see a torch header.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace punica {

constexpr int kMaxRank = 128;         // largest rank the kernels support
constexpr int kMaxSegments = 8192;    // the per-CTA work list lives in shared memory

enum class DType { kHalf, kBFloat16 };

// Which kernel family runs: chosen by the op from rows per segment, or forced (tests, benchmarks).
enum class Path { kAuto = 0, kSimt = 1, kMma = 2 };

struct SegmentArgs {
  const int32_t* seg_indptr;  // [num_seg + 1]
  const int32_t* slot_ids;    // [num_seg], -1 = no adapter
  const int32_t* ranks;       // [num_slots]
  int num_seg;
  int num_slots;
  int num_rows;               // rows of x / v / y
  int max_rank;               // a.size(2) == b.size(2): stored rank rows per slot
};

// v[rows, :r] = x[rows] @ w[slot, :r].T   (w = a[:, layer])
struct ShrinkParams {
  SegmentArgs seg;
  void* v;
  int64_t v_stride;           // elements between rows of v
  const void* x;
  int64_t x_stride;
  const void* w;              // &a[0, layer, 0, 0]
  int64_t w_slot_stride;      // layers * max_rank * in_features
  int in_features;
  float* ws;                  // split-K workspace fp32 (MMA path), or null: ws_planes planes of
  int64_t ws_stride;          // [num_rows, ws_stride], one per K-slice (or one plane of atomic
  int64_t ws_plane_stride;    // sums, zeroed by the caller: diagnostics)
  int ws_planes;
  int ksplit;
};

// y[rows, col_offset + c] += v[rows, :r] @ w[slot, :r, c]   (w = b[:, layer])
struct ExpandParams {
  SegmentArgs seg;
  void* y;
  int64_t y_stride;
  int64_t col_offset;
  const void* v;
  int64_t v_stride;
  const void* w;              // &b[0, layer, 0, 0]
  int64_t w_slot_stride;      // layers * max_rank * out_features
  int out_features;
};

// Fused decode op: for each projection p (sharing the input x),
//   y[rows, off_p : off_p + out_p] += (x[rows] @ a_p[slot, layer, :r].T) @ b_p[slot, layer, :r]
// in one launch. Every (segment, projection) is one thread-block cluster: each CTA reduces a
// K-slice of v, the cluster sums the slices through distributed shared memory, and each CTA
// then expands its own column slice (sm_90 only).
constexpr int kMaxFusedProj = 4;

struct FusedProj {
  const void* a;              // &a_p[0, layer, 0, 0]
  const void* b;              // &b_p[0, layer, 0, 0]
  int64_t a_slot_stride;
  int64_t b_slot_stride;
  const int32_t* ranks;       // [num_slots]
  int num_slots;
  int max_rank;
  int out_features;
  int64_t col_offset;
};

struct FusedParams {
  SegmentArgs seg;            // seg.ranks / num_slots / max_rank are per projection
  FusedProj proj[kMaxFusedProj];
  int num_proj;
  const void* x;
  int64_t x_stride;
  int in_features;
  void* y;
  int64_t y_stride;
  int cluster;                // CTAs per (segment, projection): 1..16, 0 = auto (fused kernel)
  int rank_block;             // rank rows whose weight slices are staged in shared memory
  int n_pitch;                // staged row length of b (the widest projection's column slice)
  bool accumulate;            // y += delta; false: y = delta (rows of inactive segments get 0)
  bool x_ready;               // x is final before the launch starts (no kernel this one may
                              // overlap through PDL writes it): the fused kernel computes the
                              // delta before its dependency wait and waits only to touch y
  bool y_red;                 // set by the launcher (fused kernel): y += delta as L2
                              // reductions of delta rounded to T (no read of y)
  int rank_bound;             // the caller's bound on the segments' ranks (0: the pools' max
                              // rank): the fused kernel's launch is shaped for it; a rank above
                              // it still gives the right delta, on a slower path
  int split_rows;             // set by the launcher (fused kernel): jobs of ranks above this
  int split_parts;            // many rows run as split_parts parts of split_rows rank rows each
                              // (1: whole jobs; the last part takes any rows past the others);
                              // parts add their deltas to y by reductions
#ifdef PUNICA_TIMELINE       // diagnostic builds only (benchmarks/diag/fused_timeline.cu)
  unsigned long long* tl;     // [launches][grid][8] %globaltimer stamps
  int tl_launch;
#endif
};

struct LaunchOptions {
  cudaStream_t stream;
  int num_sms;
  bool vec;                   // every row start and size allows 16-byte accesses
  bool pdl;                   // programmatic dependent launch (sm_90)
  int sm = 0;                 // compute capability, major * 10 + minor
};

// Memory-bound (decode) kernels: CUDA cores, 16-byte loads, many CTAs per adapter.
cudaError_t shrink_simt(DType dt, const ShrinkParams& p, const LaunchOptions& o);
cudaError_t expand_simt(DType dt, const ExpandParams& p, const LaunchOptions& o);

// Compute-bound (prefill) kernels: tensor cores (mma.sync), cp.async pipelines. Need o.vec.
// shrink_mma with p.ksplit > 1 writes each K-slice's partial sums to its plane of p.ws (no
// zeroing needed) and then sums the planes into v; shrink_mma_ws_planes(ksplit) planes (1: one
// plane of fp32 atomics, zeroed by the caller).
int shrink_mma_ksplit(int num_rows, int in_features, int num_sms);
int shrink_mma_ws_planes(int ksplit);
cudaError_t shrink_mma(DType dt, const ShrinkParams& p, const LaunchOptions& o);
cudaError_t expand_mma(DType dt, const ExpandParams& p, const LaunchOptions& o);

// The prefill expand as a memory pipeline (sm_90; needs o.vec): prefill_pipe(o) says whether the
// op runs it instead of expand_mma (PUNICA_PREFILL=mma: never, for A/B runs).
bool prefill_pipe(const LaunchOptions& o);
cudaError_t expand_pipe(DType dt, const ExpandParams& p, const LaunchOptions& o);
// The same in column strips (sgmv_expand_strip.cu), for long segments: expand_strip_fits says
// whether expand_pipe tries it; cudaErrorNotSupported where it does not take the call (rank
// class over 64, unaligned v or y).
bool expand_strip_fits(const ExpandParams& p);
bool expand_tma_load();  // both expands' full y tiles by TMA loads (PUNICA_EXPAND_TMA_LOAD=0: not)
bool expand_pdl(const LaunchOptions& o);  // both expands under PDL where o asks (PUNICA_EXPAND_PDL=0: not)
cudaError_t expand_strip(DType dt, const ExpandParams& p, const LaunchOptions& o);

// Prefill shrink as one stream of TMA tensor copies (sm_90; needs o.vec): 32-row items over the
// whole input dimension, no K split (sgmv_shrink_bulk.cu).
// shrink_bulk_fits says whether the op runs it for these shapes (PUNICA_SHRINK_BULK: 0 / 1).
bool shrink_bulk_fits(const ShrinkParams& p, const LaunchOptions& o);
cudaError_t shrink_bulk(DType dt, const ShrinkParams& p, const LaunchOptions& o);

// Fused decode kernel (sm_90; needs o.vec). p.cluster 0 picks the size.
int lora_fused_cluster_of(const FusedParams& p, int num_sms);  // the size p.cluster 0 gets
cudaError_t lora_fused(DType dt, const FusedParams& p, const LaunchOptions& o);

// Streamed decode kernel (sm_90; needs o.vec): the same op on `ctas` CTAs (0: one per SM), each
// walking its jobs through a ring of shared-memory stages filled by bulk copies (tma) or by a
// warp's cp.async (p.cluster/rank_block/n_pitch unused; rows over 16384 run lora_fused).
cudaError_t lora_stream(DType dt, const FusedParams& p, int ctas, bool tma, const LaunchOptions& o);

}  // namespace punica
