// Diagnostic: what one thread-block cluster barrier costs on its own (sm_90), by cluster size,
// with and without distributed-shared-memory stores before it.
//
//   nvcc -O3 -std=c++17 -Icsrc -gencode=arch=compute_90a,code=sm_90a \
//        benchmarks/diag/cluster_barrier.cu -o /tmp/cluster_barrier && /tmp/cluster_barrier
//
// Why: in the fused LoRA kernel (csrc/lora_fused.cu) the span from "weights and x in shared
// memory" to "v reduced over the cluster" takes ~1.2-1.5 us (benchmarks/diag/fused_timeline.cu)
// although its arithmetic is ~0.1 us and it has one or two cluster barriers. Each CTA (256
// threads) runs `iters` rounds of [optional: one float stored into every CTA of the cluster]
// + barrier.cluster.arrive.release + wait.acquire; %globaltimer around the loop gives ns a round.
// Not part of the build or the tests; no torch.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "cuda_check.cuh"
#include "sgmv_common.cuh"

namespace cg = cooperative_groups;
using namespace punica;

__global__ void rounds(int iters, bool push, unsigned long long* out) {
  __shared__ float inbox[16 * 256];
  cg::cluster_group cluster = cg::this_cluster();
  const int C = int(cluster.num_blocks()), crank = int(cluster.block_rank());
  cluster.sync();
  unsigned long long t0, t1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (int it = 0; it < iters; ++it) {
    if (push)
      for (int q = 0; q < C; ++q) cluster.map_shared_rank(inbox, q)[crank * 256 + threadIdx.x] = it;
    cluster_arrive();
    cluster_wait();
  }
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
  if (threadIdx.x == 0) out[blockIdx.x] = t1 - t0;
  cluster.sync();
}

int main() {
  unsigned long long* out;
  CHECK(cudaMalloc(&out, 4096 * 8));
  const int iters = 1000;
  for (int clusters : {1, 32})
    for (int C : {2, 4, 8, 16})
      for (int push = 0; push < 2; ++push) {
        if (C > 8) CHECK(cudaFuncSetAttribute(rounds, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = C;
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        cfg.blockDim = dim3(256);
        cfg.gridDim = dim3(C * clusters);
        CHECK(cudaLaunchKernelEx(&cfg, rounds, iters, push != 0, out));
        CHECK(cudaDeviceSynchronize());
        unsigned long long h[4096];
        CHECK(cudaMemcpy(h, out, C * clusters * 8, cudaMemcpyDeviceToHost));
        unsigned long long mx = 0;
        for (int i = 0; i < C * clusters; ++i) mx = h[i] > mx ? h[i] : mx;
        std::printf("clusters %2d x %2d CTAs, %s: %.0f ns a round\n", clusters, C,
                    push ? "C stores + barrier" : "barrier only", double(mx) / iters);
      }
  return 0;
}
