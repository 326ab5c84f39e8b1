// Registers punica::sgmv_shrink and punica::sgmv_expand with the torch dispatcher, checks every
// argument at the boundary, and picks the kernel family for the batch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "sgmv.h"

namespace punica {
namespace {

// Average rows per segment above which the tensor-core kernels win: a decode batch (1-row
// segments) stays on the memory-bound kernels, a prefill chunk goes to the tensor cores.
constexpr int64_t kMmaMinRowsPerSegment = 8;
// The streamed kernel's copies on the auto path: bulk copies (TMA) or a warp's cp.async.
constexpr bool kStreamTma = true;   // measured: as fast or faster (overlap_site.py)

// Numbers in error messages are formatted with std::to_string, never by streaming an integer
// into an ostream: on the device machine (extensions built by another g++ than torch's) the
// latter crashed inside TORCH_CHECK.
std::string num(int64_t v) { return std::to_string(v); }

std::string dims(c10::IntArrayRef d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

void check_cuda(const char* fn, const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), "punica::", fn, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == dev, "punica::", fn, ": ", name, " is on ", t.device(), " but x is on ",
              dev);
}

void check_index(const char* fn, const at::Tensor& t, const char* name, const at::Device& dev) {
  check_cuda(fn, t, name, dev);
  TORCH_CHECK(t.scalar_type() == at::kInt, "punica::", fn, ": ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "punica::", fn, ": ", name,
              " must be a contiguous 1-D tensor");
}

// Rows of a 2-D activation: last dimension contiguous, 16-byte aligned rows for the fast paths.
void check_rows(const char* fn, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "punica::", fn, ": ", name, " must be 2-D, got ", dims(t.sizes()));
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, "punica::", fn, ": ", name,
              " must be contiguous in its last dimension (got strides ", dims(t.strides()), ")");
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), "punica::", fn, ": ", name,
              " rows overlap (strides ", dims(t.strides()), ")");
}

bool aligned16(const at::Tensor& t, int64_t elem_offset = 0) {
  const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr()) + elem_offset * t.element_size();
  return addr % 16 == 0 && (t.size(0) <= 1 || t.stride(0) % 8 == 0);
}

DType dtype_of(const char* fn, const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf) return DType::kHalf;
  if (t.scalar_type() == at::kBFloat16) return DType::kBFloat16;
  TORCH_CHECK(false, "punica::", fn, ": only float16 and bfloat16 are supported, got ",
              t.scalar_type());
  return DType::kHalf;
}

SegmentArgs segment_args(const char* fn, const at::Tensor& weights, const at::Tensor& seg_indptr,
                         const at::Tensor& slot_ids, const at::Tensor& ranks, int64_t layer,
                         int64_t num_rows, const at::Device& dev) {
  check_index(fn, seg_indptr, "seg_indptr", dev);
  check_index(fn, slot_ids, "slot_ids", dev);
  check_index(fn, ranks, "ranks", dev);
  TORCH_CHECK(seg_indptr.numel() == slot_ids.numel() + 1, "punica::", fn,
              ": seg_indptr must have one more entry than slot_ids (", num(seg_indptr.numel()), " vs ",
              num(slot_ids.numel()), ")");
  TORCH_CHECK(slot_ids.numel() <= kMaxSegments, "punica::", fn, ": at most ", num(kMaxSegments),
              " segments per call, got ", num(slot_ids.numel()));
  TORCH_CHECK(ranks.numel() == weights.size(0), "punica::", fn, ": ranks has ", num(ranks.numel()),
              " entries but the weights have ", num(weights.size(0)), " slots");
  TORCH_CHECK(layer >= 0 && layer < weights.size(1), "punica::", fn, ": layer ", num(layer),
              " out of range [0, ", num(weights.size(1)), ")");
  TORCH_CHECK(weights.size(2) <= kMaxRank, "punica::", fn, ": max rank ", num(weights.size(2)),
              " exceeds the supported ", num(kMaxRank));
  TORCH_CHECK(num_rows < (int64_t(1) << 31), "punica::", fn, ": too many rows");
  SegmentArgs s;
  s.seg_indptr = seg_indptr.data_ptr<int32_t>();
  s.slot_ids = slot_ids.data_ptr<int32_t>();
  s.ranks = ranks.data_ptr<int32_t>();
  s.num_seg = int(slot_ids.numel());
  s.num_slots = int(weights.size(0));
  s.num_rows = int(num_rows);
  s.max_rank = int(weights.size(2));
  return s;
}

void check_weights(const char* fn, const at::Tensor& w, const char* name, const at::Tensor& like,
                   const at::Device& dev) {
  check_cuda(fn, w, name, dev);
  TORCH_CHECK(w.scalar_type() == like.scalar_type(), "punica::", fn, ": ", name, " is ",
              w.scalar_type(), " but the activations are ", like.scalar_type());
  TORCH_CHECK(w.dim() == 4, "punica::", fn, ": ", name,
              " must be [slots, layers, max_rank, features], got ", dims(w.sizes()));
  TORCH_CHECK(w.is_contiguous(), "punica::", fn, ": ", name, " must be contiguous");
}

Path path_of(int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2, "punica: path must be 0 (auto), 1 (simt) or 2 (mma)");
  return static_cast<Path>(path);
}

LaunchOptions launch_options(const at::Device& dev, bool vec, bool pdl) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(dev.index());
  LaunchOptions o;
  o.stream = at::cuda::getCurrentCUDAStream(dev.index()).stream();
  o.num_sms = prop->multiProcessorCount;
  o.vec = vec;
  o.pdl = pdl && prop->major >= 9;  // programmatic dependent launch exists from sm_90
  o.sm = prop->major * 10 + prop->minor;
  return o;
}

bool use_mma(Path path, bool vec, int64_t num_rows, int64_t num_seg) {
  if (!vec) return false;  // tensor-core kernels need 16-byte rows; the SIMT ones handle any size
  if (path != Path::kAuto) return path == Path::kMma;
  return num_rows > kMmaMinRowsPerSegment * num_seg;
}

void check_launch(const char* fn, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "punica::", fn, ": kernel launch failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void sgmv_shrink(const at::Tensor& v, const at::Tensor& x, const at::Tensor& a,
                 const at::Tensor& seg_indptr, const at::Tensor& slot_ids, const at::Tensor& ranks,
                 int64_t layer, int64_t path, bool pdl) {
  const char* fn = "sgmv_shrink";
  TORCH_CHECK(x.is_cuda(), "punica::sgmv_shrink: x must be a CUDA tensor, got ", x.device());
  const at::Device dev = x.device();
  check_cuda(fn, v, "v", dev);
  const DType dt = dtype_of(fn, x);
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), "punica::sgmv_shrink: v is ", v.scalar_type(),
              " but x is ", x.scalar_type());
  check_weights(fn, a, "a", x, dev);
  check_rows(fn, x, "x");
  check_rows(fn, v, "v");
  TORCH_CHECK(v.size(0) == x.size(0), "punica::sgmv_shrink: v has ", num(v.size(0)), " rows, x has ",
              num(x.size(0)));
  TORCH_CHECK(a.size(3) == x.size(1), "punica::sgmv_shrink: a has in_features ", num(a.size(3)),
              " but x has ", num(x.size(1)));
  TORCH_CHECK(v.size(1) >= a.size(2), "punica::sgmv_shrink: v has ", num(v.size(1)),
              " columns, fewer than the max rank ", num(a.size(2)));
  const SegmentArgs seg = segment_args(fn, a, seg_indptr, slot_ids, ranks, layer, x.size(0), dev);
  const Path p = path_of(path);
  if (seg.num_seg == 0 || x.size(0) == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  const int64_t K = x.size(1);
  const bool vec = K % 8 == 0 && aligned16(x) && aligned16(a);  // v is written element-wise
  ShrinkParams prm;
  prm.seg = seg;
  prm.v = v.data_ptr();
  prm.v_stride = v.stride(0);
  prm.x = x.data_ptr();
  prm.x_stride = x.stride(0);
  prm.w = static_cast<const char*>(a.data_ptr()) + layer * a.stride(1) * a.element_size();
  prm.w_slot_stride = a.stride(0);
  prm.in_features = int(K);
  prm.ws = nullptr;
  prm.ws_stride = 0;
  prm.ws_plane_stride = 0;
  prm.ws_planes = 0;
  prm.ksplit = 1;
  LaunchOptions o = launch_options(dev, vec, pdl);
  if (!use_mma(p, vec, x.size(0), seg.num_seg)) {
    check_launch(fn, shrink_simt(dt, prm, o));
    return;
  }
  if (shrink_bulk_fits(prm, o)) {
    check_launch(fn, shrink_bulk(dt, prm, o));
    return;
  }
  prm.ksplit = shrink_mma_ksplit(seg.num_rows, prm.in_features, o.num_sms);
  at::Tensor ws;
  if (prm.ksplit > 1) {  // fp32 partial sums of the K-slices; the graph-safe caching allocator
    prm.ws_planes = shrink_mma_ws_planes(prm.ksplit);
    const auto f32 = x.options().dtype(at::kFloat);
    ws = prm.ws_planes > 1 ? at::empty({prm.ws_planes, x.size(0), a.size(2)}, f32)
                           : at::zeros({1, x.size(0), a.size(2)}, f32);
    prm.ws = ws.data_ptr<float>();
    prm.ws_stride = a.size(2);
    prm.ws_plane_stride = x.size(0) * a.size(2);
  }
  check_launch(fn, shrink_mma(dt, prm, o));
}

void sgmv_expand(const at::Tensor& y, const at::Tensor& v, const at::Tensor& b,
                 const at::Tensor& seg_indptr, const at::Tensor& slot_ids, const at::Tensor& ranks,
                 int64_t layer, int64_t col_offset, int64_t path, bool pdl) {
  const char* fn = "sgmv_expand";
  TORCH_CHECK(y.is_cuda(), "punica::sgmv_expand: y must be a CUDA tensor, got ", y.device());
  const at::Device dev = y.device();
  check_cuda(fn, v, "v", dev);
  const DType dt = dtype_of(fn, y);
  TORCH_CHECK(v.scalar_type() == y.scalar_type(), "punica::sgmv_expand: v is ", v.scalar_type(),
              " but y is ", y.scalar_type());
  check_weights(fn, b, "b", y, dev);
  check_rows(fn, y, "y");
  check_rows(fn, v, "v");
  TORCH_CHECK(v.size(0) == y.size(0), "punica::sgmv_expand: v has ", num(v.size(0)), " rows, y has ",
              num(y.size(0)));
  TORCH_CHECK(v.size(1) >= b.size(2), "punica::sgmv_expand: v has ", num(v.size(1)),
              " columns, fewer than the max rank ", num(b.size(2)));
  const int64_t N = b.size(3);
  TORCH_CHECK(col_offset >= 0 && col_offset + N <= y.size(1), "punica::sgmv_expand: columns [",
              num(col_offset), ", ", num(col_offset + N), ") do not fit in y with ", num(y.size(1)), " columns");
  TORCH_CHECK(N < (int64_t(1) << 30), "punica::sgmv_expand: out_features too large");
  const SegmentArgs seg = segment_args(fn, b, seg_indptr, slot_ids, ranks, layer, y.size(0), dev);
  const Path p = path_of(path);
  if (seg.num_seg == 0 || y.size(0) == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  const bool vec = N % 8 == 0 && col_offset % 8 == 0 && aligned16(y) && aligned16(b) &&
                   aligned16(v);
  ExpandParams prm;
  prm.seg = seg;
  prm.y = y.data_ptr();
  prm.y_stride = y.stride(0);
  prm.col_offset = col_offset;
  prm.v = v.data_ptr();
  prm.v_stride = v.stride(0);
  prm.w = static_cast<const char*>(b.data_ptr()) + layer * b.stride(1) * b.element_size();
  prm.w_slot_stride = b.stride(0);
  prm.out_features = int(N);
  LaunchOptions o = launch_options(dev, vec, pdl);
  if (use_mma(p, vec, y.size(0), seg.num_seg))
    check_launch(fn, prefill_pipe(o) ? expand_pipe(dt, prm, o) : expand_mma(dt, prm, o));
  else
    check_launch(fn, expand_simt(dt, prm, o));
}

// Adds the LoRA delta of up to 4 projections that share the input x (q/k/v, gate/up) to their
// column windows of y. Decode-shaped batches on sm_90 run the fused kernel (one launch for all
// projections, v never leaves the chip); otherwise, or when forced, a shrink + expand pair per
// projection through v. path: 0 auto, 1/2 the pair on the simt/mma kernels, 3 the fused kernel,
// 4 / 5 the streamed kernel with bulk copies (TMA) / with cp.async. ctas > 0 (auto path, decode
// batches on sm_90): the streamed kernel (kStreamTma's copies) on that many CTAs, for a launch
// that runs beside a GEMM on the SMs it leaves free.
void add_lora(const at::Tensor& y, const at::Tensor& x, const at::Tensor& v, at::TensorList a,
              at::TensorList b, at::TensorList ranks, c10::IntArrayRef col_offsets,
              const at::Tensor& seg_indptr, const at::Tensor& slot_ids, int64_t layer, int64_t path,
              int64_t cluster, bool pdl, bool accumulate, int64_t ctas, bool x_ready,
              int64_t rank_bound) {
  const char* fn = "add_lora";
  TORCH_CHECK(x.is_cuda(), "punica::add_lora: x must be a CUDA tensor, got ", x.device());
  const at::Device dev = x.device();
  check_cuda(fn, y, "y", dev);
  check_cuda(fn, v, "v", dev);
  const DType dt = dtype_of(fn, x);
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && v.scalar_type() == x.scalar_type(),
              "punica::add_lora: y, v and x must have one dtype, got ", y.scalar_type(), ", ",
              v.scalar_type(), ", ", x.scalar_type());
  const size_t np = a.size();
  TORCH_CHECK(np >= 1 && np <= size_t(kMaxFusedProj), "punica::add_lora: 1 to ",
              num(kMaxFusedProj), " projections per call, got ", num(int64_t(np)));
  TORCH_CHECK(b.size() == np && ranks.size() == np && col_offsets.size() == np,
              "punica::add_lora: a, b, ranks and col_offsets must have one entry per projection "
              "(got ", num(int64_t(np)), ", ", num(int64_t(b.size())), ", ", num(int64_t(ranks.size())),
              ", ", num(int64_t(col_offsets.size())), ")");
  TORCH_CHECK(path >= 0 && path <= 5, "punica::add_lora: path must be 0 (auto), 1 (simt pair), "
              "2 (mma pair), 3 (fused), 4 (streamed, bulk copies) or 5 (streamed, cp.async)");
  TORCH_CHECK(cluster >= 0 && cluster <= 16, "punica::add_lora: cluster must be 0 (auto) .. 16");
  TORCH_CHECK(ctas >= 0 && ctas <= 4096, "punica::add_lora: ctas must be 0 (fused kernel) .. 4096");
  TORCH_CHECK(rank_bound >= 0 && rank_bound <= kMaxRank, "punica::add_lora: rank_bound must be 0 "
              "(the pools' max rank) .. ", num(kMaxRank), ", got ", num(rank_bound));
  check_rows(fn, x, "x");
  check_rows(fn, y, "y");
  check_rows(fn, v, "v");
  TORCH_CHECK(y.size(0) == x.size(0) && v.size(0) == x.size(0), "punica::add_lora: x, y and v "
              "must have the same rows, got ", num(x.size(0)), ", ", num(y.size(0)), ", ", num(v.size(0)));
  const int64_t K = x.size(1);
  bool vec = K % 8 == 0 && aligned16(x) && aligned16(y);
  SegmentArgs seg{};
  FusedParams prm{};
  for (size_t i = 0; i < np; ++i) {
    check_weights(fn, a[i], "a", x, dev);
    check_weights(fn, b[i], "b", x, dev);
    TORCH_CHECK(a[i].size(3) == K, "punica::add_lora: a[", num(int64_t(i)), "] has in_features ",
                num(a[i].size(3)), " but x has ", num(K));
    TORCH_CHECK(b[i].size(0) == a[i].size(0) && b[i].size(1) == a[i].size(1) &&
                b[i].size(2) == a[i].size(2), "punica::add_lora: a[", num(int64_t(i)), "] ",
                dims(a[i].sizes()), " and b ", dims(b[i].sizes()), " disagree on slots, layers or rank");
    TORCH_CHECK(v.size(1) >= a[i].size(2), "punica::add_lora: v has ", num(v.size(1)),
                " columns, fewer than the max rank ", num(a[i].size(2)));
    const int64_t N = b[i].size(3), off = col_offsets[i];
    TORCH_CHECK(off >= 0 && off + N <= y.size(1), "punica::add_lora: columns [", num(off), ", ",
                num(off + N), ") do not fit in y with ", num(y.size(1)), " columns");
    TORCH_CHECK(N < (int64_t(1) << 30), "punica::add_lora: out_features too large");
    seg = segment_args(fn, a[i], seg_indptr, slot_ids, ranks[i], layer, x.size(0), dev);
    vec = vec && N % 8 == 0 && off % 8 == 0 && aligned16(a[i]) && aligned16(b[i]);
    FusedProj& q = prm.proj[i];
    q.a = static_cast<const char*>(a[i].data_ptr()) + layer * a[i].stride(1) * a[i].element_size();
    q.b = static_cast<const char*>(b[i].data_ptr()) + layer * b[i].stride(1) * b[i].element_size();
    q.a_slot_stride = a[i].stride(0);
    q.b_slot_stride = b[i].stride(0);
    q.ranks = ranks[i].data_ptr<int32_t>();
    q.num_slots = int(a[i].size(0));
    q.max_rank = int(a[i].size(2));
    q.out_features = int(N);
    q.col_offset = off;
  }
  const c10::cuda::CUDAGuard guard(dev);
  const auto zero_windows = [&] {
    for (size_t i = 0; i < np; ++i) y.narrow(1, col_offsets[i], b[i].size(3)).zero_();
  };
  if (seg.num_seg == 0 || x.size(0) == 0) {
    if (!accumulate) zero_windows();
    return;
  }

  LaunchOptions o = launch_options(dev, vec, pdl);
  const bool hopper = at::cuda::getDeviceProperties(dev.index())->major >= 9;
  const bool decode = x.size(0) <= kMmaMinRowsPerSegment * seg.num_seg;
  if (path >= 3)
    TORCH_CHECK(hopper && vec, "punica::add_lora: the ", path == 3 ? "fused" : "streamed",
                " kernel needs sm_90 and 16-byte aligned rows (in/out features and column "
                "offsets multiples of 8)");
  const bool streamed = path >= 4 || (path == 0 && ctas > 0 && hopper && vec && decode);
  const bool tma = path == 4 || (path == 0 && kStreamTma);
  if (streamed || path == 3 || (path == 0 && hopper && vec && decode)) {
    prm.seg = seg;
    prm.num_proj = int(np);
    prm.x = x.data_ptr();
    prm.x_stride = x.stride(0);
    prm.in_features = int(K);
    prm.y = y.data_ptr();
    prm.y_stride = y.stride(0);
    prm.cluster = int(cluster);  // 0: the fused kernel picks (the streamed one ignores it)
    prm.accumulate = accumulate;
    prm.x_ready = x_ready;
    prm.rank_bound = int(rank_bound);
    check_launch(fn, streamed ? lora_stream(dt, prm, int(ctas), tma, o) : lora_fused(dt, prm, o));
    return;
  }
  if (!accumulate) zero_windows();  // the pair kernels accumulate
  for (size_t i = 0; i < np; ++i) {
    sgmv_shrink(v, x, a[i], seg_indptr, slot_ids, ranks[i], layer, path, pdl);
    sgmv_expand(y, v, b[i], seg_indptr, slot_ids, ranks[i], layer, col_offsets[i], path, pdl);
  }
}

TORCH_LIBRARY(punica, m) {
  m.def("sgmv_shrink(Tensor(a!) v, Tensor x, Tensor a, Tensor seg_indptr, Tensor slot_ids, "
        "Tensor ranks, int layer, int path=0, bool pdl=True) -> ()");
  m.def("sgmv_expand(Tensor(a!) y, Tensor v, Tensor b, Tensor seg_indptr, Tensor slot_ids, "
        "Tensor ranks, int layer, int col_offset=0, int path=0, bool pdl=True) -> ()");
  m.def("add_lora(Tensor(a!) y, Tensor x, Tensor(b!) v, Tensor[] a, Tensor[] b, Tensor[] ranks, "
        "int[] col_offsets, Tensor seg_indptr, Tensor slot_ids, int layer, int path=0, "
        "int cluster=0, bool pdl=True, bool accumulate=True, int ctas=0, bool x_ready=False, "
        "int rank_bound=0) -> ()");
}

TORCH_LIBRARY_IMPL(punica, CUDA, m) {
  m.impl("sgmv_shrink", &sgmv_shrink);
  m.impl("sgmv_expand", &sgmv_expand);
  m.impl("add_lora", &add_lora);
}

// CPU tensors reach the same functions, whose first check names the tensor that is not on CUDA.
TORCH_LIBRARY_IMPL(punica, CPU, m) {
  m.impl("sgmv_shrink", &sgmv_shrink);
  m.impl("sgmv_expand", &sgmv_expand);
  m.impl("add_lora", &add_lora);
}

}  // namespace punica

// An importable (empty) Python module: `import <name>` loads the library and so registers the ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "punica SGMV kernels (torch.ops.punica)"; }
