// Host-side argument checks shared by the CPU and CUDA implementations of the imq_mmd ops, so that both
// backends reject bad input with the same RuntimeError messages.  Not included by device code.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace gmwae_fast {

// Upper bound on the number of bandwidths of the CUDA kernels (they stage the bandwidth groups in shared
// memory); the CPU kernels accept any number.
constexpr int64_t kImqMaxBandwidthsCuda = 256;

inline bool imq_is_point_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float64 points compute in float64, everything else in float32 (a float64 `a` or `b` makes both float64).
inline at::ScalarType imq_compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
inline at::ScalarType imq_compute_dtype(at::ScalarType ta, at::ScalarType tb) {
  return (ta == at::kDouble || tb == at::kDouble) ? at::kDouble : at::kFloat;
}

inline void imq_check_points(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.defined(), op, ": `", name, "` is undefined");
  TORCH_CHECK(x.dim() == 2, op, ": `", name, "` must be 2-D (N, d), got shape ", x.sizes());
  TORCH_CHECK(imq_is_point_dtype(x.scalar_type()), op, ": `", name,
              "` must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
}

inline void imq_check_vector(const char* op, const char* name, const at::Tensor& v, int64_t n, const at::Device& dev) {
  TORCH_CHECK(v.defined(), op, ": `", name, "` is undefined");
  TORCH_CHECK(v.dim() == 1, op, ": `", name, "` must be 1-D, got shape ", v.sizes());
  if (n >= 0) {
    TORCH_CHECK(v.size(0) == n, op, ": `", name, "` must have ", n, " entries, got ", v.size(0));
  }
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), op, ": `", name, "` must be a floating tensor, got ",
              v.scalar_type());
  TORCH_CHECK(v.device() == dev, op, ": `", name, "` is on ", v.device(), " but the points are on ", dev,
              " (all arguments must be on one device)");
}

// Checks shared by the four ops.  `b`/`wb` undefined for the self ops, `h` undefined for the value ops.
inline void imq_check_args(const char* op, const at::Tensor& a, const at::Tensor& wa, const at::Tensor* b,
                           const at::Tensor* wb, const at::Tensor& bw, const at::Tensor* h, int64_t group) {
  imq_check_points(op, "a", a);
  const at::Device dev = a.device();
  imq_check_vector(op, "wa", wa, a.size(0), dev);
  if (b) {
    imq_check_points(op, "b", *b);
    TORCH_CHECK(b->device() == dev, op, ": `b` is on ", b->device(), " but `a` is on ", dev,
                " (all arguments must be on one device)");
    TORCH_CHECK(b->size(1) == a.size(1), op, ": `a` and `b` must have the same number of columns, got ", a.size(1),
                " and ", b->size(1));
    imq_check_vector(op, "wb", *wb, b->size(0), dev);
  }
  imq_check_vector(op, "bw", bw, -1, dev);
  if (h) {
    imq_check_vector(op, "h", *h, bw.size(0), dev);
  }
  TORCH_CHECK(group >= 1, op, ": `group` must be >= 1, got ", group);
  TORCH_CHECK(a.size(0) % group == 0, op, ": the number of points N = ", a.size(0),
              " must be divisible by `group` = ", group);
}

}  // namespace gmwae_fast
