// Diagnostic: where the time of a chain of fused LoRA launches goes (csrc/lora_fused.cu), or
// of streamed ones (csrc/lora_stream.cu: 5th argument "stream", 6th its CTAs, default all SMs).
//
//   nvcc -O3 -std=c++17 -Icsrc -DPUNICA_TIMELINE -gencode=arch=compute_90a,code=sm_90a \
//        benchmarks/diag/fused_timeline.cu -o /tmp/fused_timeline && /tmp/fused_timeline
//   /tmp/fused_timeline 32 4096 4096 stream 132
//
// Why: 32 rows with 32 distinct rank-16 adapters (8 MiB) take ~5 us a launch in a CUDA graph of
// back-to-back launches, against 2 us for the bytes at the copy bandwidth and ~1 us for an empty
// launch. The kernel writes %globaltimer stamps per CTA (PUNICA_TIMELINE builds only): entry,
// after the segment metadata, after issuing its weight copies, after griddepcontrol.wait, when
// its weights and x/y have arrived, after the cluster reduction, at exit. Printed per launch
// (relative to the first launch's first entry, in ns): when its CTAs start (first / median / last),
// when their waits release, when their weights are in (median / last), when they end.
// With -DPUNICA_DIAG_LOADS_ONLY the staged path stops once its copies have landed (then waits
// for the previous launch and exits): the ceiling of this access pattern and launch chain.
// Not part of the build or the tests; no torch.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.cuh"
#include "lora_fused.cu"   // -Icsrc (or another copy, for an A/B)
#include "lora_stream.cu"
#include "fused_diag.cuh"
#include <cstring>

using namespace punica;

int main(int argc, char** argv) {
  const int rows = argc > 1 ? std::atoi(argv[1]) : 32;    // = adapters (1-row segments)
  const int fin = argc > 2 ? std::atoi(argv[2]) : 4096;
  const int fout = argc > 3 ? std::atoi(argv[3]) : 4096;
  const bool stream = argc > 4 && std::strcmp(argv[4], "stream") == 0;
  const int rank = 16, slots = rows, layers = 32, launches = 32;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int stream_ctas = argc > 5 ? std::atoi(argv[5]) : sms;
  const size_t a_elems = size_t(slots) * layers * rank * fin, b_elems = size_t(slots) * layers * rank * fout;
  __nv_bfloat16 *a, *b, *x, *y;
  CHECK(cudaMalloc(&a, a_elems * 2));
  CHECK(cudaMalloc(&b, b_elems * 2));
  CHECK(cudaMalloc(&x, size_t(rows) * fin * 2));
  CHECK(cudaMalloc(&y, size_t(rows) * fout * 2));
  CHECK(cudaMemset(a, 0, a_elems * 2));
  CHECK(cudaMemset(b, 0, b_elems * 2));
  CHECK(cudaMemset(x, 0, size_t(rows) * fin * 2));
  CHECK(cudaMemset(y, 0, size_t(rows) * fout * 2));
  std::vector<int32_t> h_indptr(rows + 1), h_slots(rows), h_ranks(slots, rank);
  for (int i = 0; i <= rows; ++i) h_indptr[i] = i;
  for (int i = 0; i < rows; ++i) h_slots[i] = (i * 7) % slots;
  int32_t *indptr, *slot_ids, *ranks;
  CHECK(cudaMalloc(&indptr, (rows + 1) * 4));
  CHECK(cudaMalloc(&slot_ids, rows * 4));
  CHECK(cudaMalloc(&ranks, slots * 4));
  CHECK(cudaMemcpy(indptr, h_indptr.data(), (rows + 1) * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(slot_ids, h_slots.data(), rows * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(ranks, h_ranks.data(), slots * 4, cudaMemcpyHostToDevice));
  // env X_READY=1: the launches say x is ready (FusedParams::x_ready); CLUSTER=N: cluster size
  const bool x_ready = std::getenv("X_READY") && std::atoi(std::getenv("X_READY")) != 0;
  int cluster = std::getenv("CLUSTER") ? std::atoi(std::getenv("CLUSTER")) : 0;
  if (cluster < 1)  // the auto size of these launches
    cluster = lora_fused_cluster_of(
        one_projection(SegmentArgs{nullptr, nullptr, nullptr, rows, slots, rows, rank},
                       FusedProj{nullptr, nullptr, 0, 0, nullptr, slots, rank, fout, 0}, nullptr,
                       fin, nullptr, fout, 0, x_ready),
        sms);
  const int grid = stream ? std::max(1, std::min(stream_ctas, rows)) : rows * cluster;
  unsigned long long* tl;
  CHECK(cudaMalloc(&tl, size_t(launches) * grid * 8 * 8));

  for (int pdl = 1; pdl >= 0; --pdl) {
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaGraph_t graph;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int l = 0; l < launches; ++l) {
      FusedParams p = one_projection(
          SegmentArgs{indptr, slot_ids, ranks, rows, slots, rows, rank},
          FusedProj{a + size_t(l % layers) * rank * fin, b + size_t(l % layers) * rank * fout,
                    int64_t(layers) * rank * fin, int64_t(layers) * rank * fout, ranks, slots,
                    rank, fout, 0},
          x, fin, y, fout, cluster, x_ready);
      p.tl = tl;
      p.tl_launch = l;
      const LaunchOptions o{s, sms, true, pdl != 0};
      CHECK(stream ? lora_stream(DType::kBFloat16, p, stream_ctas, true, o)
                   : lora_fused(DType::kBFloat16, p, o));
    }
    CHECK(cudaStreamEndCapture(s, &graph));
    cudaGraphExec_t exec;
    const double per = us_per_launch(graph, s, launches, 20, 1, &exec);  // stamps: its last replay
    const double bytes = double(rows) * rank * (fin + fout) * 2;
    std::printf("\n== %s%s pdl=%d rows=adapters=%d %dx%d rank %d cluster %d grid %d: "
                "%.2f us/launch, %.0f GB/s on the weights\n", stream ? "stream" : "fused",
                x_ready ? " x_ready" : "", pdl, rows, fin, fout, rank, stream ? 0 : cluster, grid,
                per, bytes / per * 1e-3);
    std::vector<unsigned long long> h(size_t(launches) * grid * 8);
    CHECK(cudaMemcpy(h.data(), tl, h.size() * 8, cudaMemcpyDeviceToHost));
    unsigned long long t0 = ~0ull;
    for (int c = 0; c < grid; ++c) t0 = std::min(t0, h[size_t(c) * 8]);
    if (stream)   // the streamed kernel's stamps (lora_stream.cu), same columns
      std::printf("launch | start first..med..last | meta med | 1st copy issued med | wait "
                  "first..last | 1st stage full med..last | v done med | y written med | end "
                  "first..last   (ns from launch 0's start)\n");
    else
      std::printf("launch | start first..med..last | meta med | issued med | wait first..last | "
                  "data med..last | shrunk med | reduced med | end first..last   (ns from launch 0's start)\n");
    for (int l = 0; l < launches; ++l) {
      auto col = [&](int k) {
        std::vector<long long> v(grid);
        for (int c = 0; c < grid; ++c) v[c] = (long long)(h[(size_t(l) * grid + c) * 8 + k] - t0);
        std::sort(v.begin(), v.end());
        return v;
      };
      auto st = col(0), me = col(1), is = col(2), wa = col(3), da = col(4), re = col(5), en = col(6),
           sh = col(7);
      const int m = grid / 2;
      std::printf("%3d | %7lld..%7lld..%7lld | %7lld | %7lld | %7lld..%7lld | %7lld..%7lld | %7lld | "
                  "%7lld | %7lld..%7lld\n", l, st[0], st[m], st[grid - 1], me[m], is[m], wa[0], wa[grid - 1],
                  da[m], da[grid - 1], sh[m], re[m], en[0], en[grid - 1]);
    }
    CHECK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphDestroy(graph));
  }
  return 0;
}
