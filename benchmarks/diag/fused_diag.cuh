// What the diagnostic programs for chains of fused launches share (fused_timeline.cu,
// fused_bench.cu): one projection's launch parameters, and the time a launch of a captured
// chain takes. Include after lora_fused.cu (or sgmv.h).
#pragma once

#include <algorithm>
#include <vector>

#include "cuda_check.cuh"

namespace punica {

// y[rows, :fout] += the adapters' delta of x[rows, :fin], one projection, y accumulated.
inline FusedParams one_projection(const SegmentArgs& seg, const FusedProj& proj, const void* x,
                                  int fin, void* y, int fout, int cluster, bool x_ready) {
  FusedParams p{};
  p.seg = seg;
  p.proj[0] = proj;
  p.num_proj = 1;
  p.x = x;
  p.x_stride = fin;
  p.in_features = fin;
  p.y = y;
  p.y_stride = fout;
  p.cluster = cluster;
  p.accumulate = true;
  p.x_ready = x_ready;
  return p;
}

// Instantiates the captured chain of `launches` launches, replays it 3 times to warm up, then
// `samples` times `reps` replays: the median over the samples of the time a launch took, in us.
inline double us_per_launch(cudaGraph_t graph, cudaStream_t s, int launches, int reps,
                            int samples, cudaGraphExec_t* exec_out = nullptr) {
  cudaGraphExec_t exec;
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int w = 0; w < 3; ++w) CHECK(cudaGraphLaunch(exec, s));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<double> per;
  for (int i = 0; i < samples; ++i) {
    CHECK(cudaEventRecord(e0, s));
    for (int w = 0; w < reps; ++w) CHECK(cudaGraphLaunch(exec, s));
    CHECK(cudaEventRecord(e1, s));
    CHECK(cudaStreamSynchronize(s));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    per.push_back(ms * 1e3 / reps / launches);
  }
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  if (exec_out) *exec_out = exec;
  else CHECK(cudaGraphExecDestroy(exec));
  std::sort(per.begin(), per.end());
  return per[per.size() / 2];
}

}  // namespace punica
