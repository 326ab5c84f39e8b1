// Diagnostic: time a chain of fused add_lora launches (csrc/lora_fused.cu) on any decode batch,
// without torch, so that it can be built ahead on a machine without a GPU and run at once on
// one (no JIT build). One segment of one row per listed rank; rank 0 is a row without an adapter.
//
//   nvcc -O3 -std=c++17 -Icsrc -gencode=arch=compute_90a,code=sm_90a \
//        benchmarks/diag/fused_bench.cu -o /tmp/fused_bench
//   /tmp/fused_bench 4096 4096 128 4,8,16,64,128,4,8,...   # in, out, pool rank, ranks
//   X_READY=1 CLUSTER=8 PUNICA_FUSED_STAGE_KB=96 /tmp/fused_bench ...
//
// Prints us a launch and GB/s on the real (unpadded) weight bytes, and the copy bandwidth of a
// 2 GiB device-to-device copy in the same process (read + write, as kernels.py counts it). Each
// launch of the chain of 32 reads another layer of a pool of [slots, 32 layers, pool rank, in]
// (and out), so the weights are not served from L2. Not part of the build or the tests.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_check.cuh"
#include "lora_fused.cu"   // -Icsrc (or another copy, for an A/B)
#include "fused_diag.cuh"

using namespace punica;

namespace {

double copy_bandwidth() {
  const size_t bytes = size_t(1) << 31;
  void *src, *dst;
  CHECK(cudaMalloc(&src, bytes));
  CHECK(cudaMalloc(&dst, bytes));
  CHECK(cudaMemset(src, 0, bytes));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  float best = 1e30f;
  for (int i = 0; i < 5; ++i) {
    CHECK(cudaEventRecord(e0));
    CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    best = std::min(best, ms);
  }
  CHECK(cudaFree(src));
  CHECK(cudaFree(dst));
  return 2.0 * bytes / (best * 1e-3);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::printf("usage: %s in_features out_features pool_rank rank,rank,...\n", argv[0]);
    return 2;
  }
  const int fin = std::atoi(argv[1]), fout = std::atoi(argv[2]), pool_rank = std::atoi(argv[3]);
  std::vector<int> seg_ranks;
  {
    std::stringstream ss(argv[4]);
    std::string tok;
    while (std::getline(ss, tok, ',')) seg_ranks.push_back(std::atoi(tok.c_str()));
  }
  const int nseg = int(seg_ranks.size()), slots = nseg, layers = 32, launches = 32;
  // SPLIT=n (n divides the pool rank): each adapter's rank rows as jobs of n rows, every job on
  // its own copy of the row (x duplicated, its own row of y): the bytes and the work of a launch
  // that splits large ranks across clusters and adds the parts to y by reductions, without the
  // kernel knowing (a virtual slot per (slot, layer, part): slot strides of n rank rows).
  const int split = std::getenv("SPLIT") ? std::atoi(std::getenv("SPLIT")) : 0;
  if (split > 0 && pool_rank % split != 0) {
    std::printf("SPLIT must divide the pool rank\n");
    return 2;
  }
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const double bw = copy_bandwidth();

  const size_t a_elems = size_t(slots) * layers * pool_rank * fin;
  const size_t b_elems = size_t(slots) * layers * pool_rank * fout;
  __nv_bfloat16 *a, *b, *x, *y;
  CHECK(cudaMalloc(&a, a_elems * 2));
  CHECK(cudaMalloc(&b, b_elems * 2));
  CHECK(cudaMemset(a, 0, a_elems * 2));
  CHECK(cudaMemset(b, 0, b_elems * 2));
  double bytes = 0;
  for (int i = 0; i < nseg; ++i) bytes += double(std::min(seg_ranks[i], pool_rank)) * (fin + fout) * 2;
  // jobs: (segment, part); one row each
  std::vector<int> job_seg, job_part;
  for (int i = 0; i < nseg; ++i) {
    const int r = std::min(seg_ranks[i], pool_rank);
    const int parts = split > 0 && r > 0 ? (r + split - 1) / split : 1;
    for (int q = 0; q < parts; ++q) {
      job_seg.push_back(i);
      job_part.push_back(q);
    }
  }
  const int rows = int(job_seg.size());
  const int vslots = split > 0 ? slots * layers * (pool_rank / split) : slots;
  const int job_rank = split > 0 ? split : pool_rank;
  std::vector<int32_t> h_indptr(rows + 1), h_ranks(vslots, 0);
  for (int i = 0; i <= rows; ++i) h_indptr[i] = i;
  std::vector<std::vector<int32_t>> h_slots(launches, std::vector<int32_t>(rows));
  for (int j = 0; j < rows; ++j) {
    const int i = job_seg[j], q = job_part[j], r = std::min(seg_ranks[i], pool_rank);
    for (int l = 0; l < launches; ++l) {
      const int layer = l % layers;
      const int v = split > 0 ? ((i * layers + layer) * pool_rank + q * split) / split : i;
      h_slots[l][j] = r > 0 ? v : -1;
      if (r > 0) h_ranks[v] = split > 0 ? std::min(split, r - q * split) : r;
    }
  }
  CHECK(cudaMalloc(&x, size_t(rows) * fin * 2));
  CHECK(cudaMalloc(&y, size_t(rows) * fout * 2));
  CHECK(cudaMemset(x, 0, size_t(rows) * fin * 2));
  CHECK(cudaMemset(y, 0, size_t(rows) * fout * 2));
  int32_t *indptr, *ranks;
  std::vector<int32_t*> slot_ids(launches);
  CHECK(cudaMalloc(&indptr, (rows + 1) * 4));
  CHECK(cudaMalloc(&ranks, vslots * 4));
  CHECK(cudaMemcpy(indptr, h_indptr.data(), (rows + 1) * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(ranks, h_ranks.data(), vslots * 4, cudaMemcpyHostToDevice));
  for (int l = 0; l < launches; ++l) {
    CHECK(cudaMalloc(&slot_ids[l], rows * 4));
    CHECK(cudaMemcpy(slot_ids[l], h_slots[l].data(), rows * 4, cudaMemcpyHostToDevice));
  }
  const bool x_ready = std::getenv("X_READY") && std::atoi(std::getenv("X_READY")) != 0;
  const int cluster = std::getenv("CLUSTER") ? std::atoi(std::getenv("CLUSTER")) : 0;

  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t graph;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int l = 0; l < launches; ++l) {
    const SegmentArgs seg{indptr, slot_ids[l], ranks, rows, vslots, rows, job_rank};
    const FusedProj proj =
        split > 0  // the layer is in the virtual slot id
            ? FusedProj{a, b, int64_t(split) * fin, int64_t(split) * fout, ranks, vslots, split,
                        fout, 0}
            : FusedProj{a + size_t(l % layers) * pool_rank * fin,
                        b + size_t(l % layers) * pool_rank * fout,
                        int64_t(layers) * pool_rank * fin, int64_t(layers) * pool_rank * fout,
                        ranks, slots, pool_rank, fout, 0};
    const FusedParams p = one_projection(seg, proj, x, fin, y, fout, cluster, x_ready);
    const LaunchOptions o{s, sms, true, true};
    CHECK(lora_fused(DType::kBFloat16, p, o));
  }
  CHECK(cudaStreamEndCapture(s, &graph));
  const double us = us_per_launch(graph, s, launches, 5, 7);
  const FusedParams shape = one_projection(
      SegmentArgs{nullptr, nullptr, nullptr, rows, vslots, rows, job_rank},
      FusedProj{nullptr, nullptr, 0, 0, nullptr, vslots, job_rank, fout, 0}, nullptr, fin,
      nullptr, fout, cluster, x_ready);
  const char* kb = std::getenv("PUNICA_FUSED_STAGE_KB");
  std::printf("%dx%d pool rank %d, %d segments as %d jobs (split %d), x_ready %d, cluster %d, "
              "stage budget %s KB: %.2f us a launch, %.0f GB/s on %.1f MB = %.0f%% of the copy "
              "bandwidth (%.0f GB/s)\n",
              fin, fout, pool_rank, nseg, rows, split, int(x_ready),
              lora_fused_cluster_of(shape, sms),
              kb ? kb : "64 (default)", us, bytes / us * 1e-3, bytes / 1e6,
              100.0 * bytes / (us * 1e-6) / bw, bw / 1e9);
  return 0;
}
