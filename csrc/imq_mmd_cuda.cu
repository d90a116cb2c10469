// Fused CUDA kernels of the imq_mmd ops (schemas in csrc/ops.cpp, contract in docs/ARCHITECTURE.md).
//
// Decomposition
// -------------
// Points are cut into tiles of kBT = 64 rows; a thread block of 256 threads computes one 64 x 64 tile of pairs
// at a time.  Tiles are grouped into *panels* of PS consecutive tiles, and one block owns one panel pair
// (p, q): all tiles (I, J) with I in panel p and J in panel q (self terms: the upper triangle only, p <= q and
// J >= I when p == q).  The number of panels is chosen from the SM count, so that small N still gives every SM
// work (the reduction dimension is split across blocks), and capped so that the gradient slots below stay small.
//
// Per tile:
//   D phase   the tile's coordinates (shifted by the origin a[0], converted to the compute type) go through
//             shared memory k-major; each thread accumulates a 4 x 4 register tile of squared distances
//             sum_k (a_ik - b_jk)^2 (direct differences, never the |a|^2 + |b|^2 - 2ab expansion).
//   K phase   per-pair kernel values through csrc/imq_math.h (the CPU kernels use the same functions), value
//             partials per bandwidth, both of w w k and of w w (1 - k) (the finalize keeps the more accurate
//             one, imq_pick_value): 16 pairs per thread in registers, warp shuffle tree, per-warp slots in
//             shared memory, added per tile in float64 into per-block accumulators (fixed order).
//             Gradient ops also form P_ij = w_i w_j psi(D_ij) and Phi_ij = phi(D_ij) (masked) in shared memory.
//   L phase   row/column sums of P and of the weighted Phi (one line per thread).
//   G phase   gradients as two small GEMMs out of shared memory:
//                 row side  g_i = a~_i sum_j P_ij - sum_j P_ij b~_j = sum_j P_ij (a_i - b_j)
//                 col side  g_j = b~_j sum_i P_ij - sum_i P_ij a~_i = sum_i P_ij (b_j - a_i)
//             (a~ = a - a[0]: the shift removes the cancellation of a large common offset).
//             Weight gradients are the weighted Phi line sums.
//
// Determinism (no float atomics anywhere)
// ---------------------------------------
// Gradients: every block writes its row-side partial of tile I into slot (q, rows of I) and its column-side
// partial of tile J into slot (p, rows of J) of two float buffers; a slot region is written by one block
// only (first visit stores, later visits of the same block add, in program order), so the slot contents are
// reproducible.  A second kernel sums the slots of every row in a fixed order in float64 and applies the
// factors (self 4 and 2, cross 2 and 1) and the analytic diagonal.  Values: per-block float64 partials,
// summed in a fixed order by a one-block kernel.  Memory: O(panels x (N + M) x (d + 1)), capped.
//
// Self terms visit each unordered pair once (i < j, outside i's group when unbiased); the i == j terms of
// the biased estimator are added analytically (k_s(0) = 1, phi(0) = sum_s h_s, no point gradient).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "imq_mmd_common.h"
#include "imq_mmd_cuda_kernels.cuh"

namespace gmwae_fast {
namespace {

using namespace imq_cuda;

// A device attribute, cached per (attribute, device) (avoids ATen/cuda/CUDAContext.h, which needs the
// cuSPARSE/cuBLAS headers).  Each call site passes one fixed attribute, so one cache per template instance.
template <cudaDeviceAttr ATTR>
int cached_device_attribute(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, ATTR, device));
  if (device >= 0 && device < 64) cache[device] = value;
  return value;
}

// SM count of a device.
int multiprocessor_count(int device) {
  return cached_device_attribute<cudaDevAttrMultiProcessorCount>(device);
}

struct CudaResult {
  at::Tensor vals;  // (S,) float64
  at::Tensor da, dwa, db, dwb;  // compute dtype
};

// Largest dynamic shared memory a block may opt in to on a device.
int max_smem_optin(int device) {
  return cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device);
}

template <class T, bool SELF, bool GRAD>
void launch_tiles(const TileArgs<T>& A, int nblocks, size_t smem, cudaStream_t stream, int device) {
  const int limit = max_smem_optin(device);
  TORCH_CHECK(smem <= size_t(limit), "gmwae_fast::imq_*: the CUDA kernel needs ", smem,
              " bytes of shared memory per block, the device allows ", limit,
              " (compute capability 8.0 or newer is required; float64 with many bandwidths needs the most)");
  auto kernel = imq_tiles_kernel<T, SELF, GRAD>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<nblocks, kThreads, smem, stream>>>(A);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
CudaResult imq_cuda_run(bool self, bool grad, const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b,
                        const at::Tensor& wb, const at::Tensor& bw, const at::Tensor& h, int64_t group,
                        bool unbiased, bool b_grad) {
  const int64_t N = a.size(0);
  const int64_t d = a.size(1);
  const at::Tensor& bb = self ? a : b;
  const at::Tensor& wbb = self ? wa : wb;
  const int64_t M = bb.size(0);
  const int S = int(bw.size(0));
  const auto dev = a.options();
  // Outputs: written completely by the finalize kernels, zero when there is nothing to compute.
  const bool empty = N == 0 || M == 0 || S == 0;
  auto alloc = [&](at::IntArrayRef shape, at::TensorOptions o) { return empty ? at::zeros(shape, o) : at::empty(shape, o); };
  CudaResult R;
  R.vals = alloc({S}, dev.dtype(at::kDouble));
  if (grad) {
    R.da = alloc({N, d}, dev);
    R.dwa = alloc({N}, dev);
    if (!self) {
      // Without b_grad the kernels never touch the column side: its gradients are the contract's zeros.
      R.db = b_grad ? alloc({M, d}, dev) : at::zeros({M, d}, dev);
      R.dwb = b_grad ? alloc({M}, dev) : at::zeros({M}, dev);
    }
  }
  if (empty) return R;  // (self: M == N, so a biased self term with N > 0 and S > 0 is never empty)

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int sms = multiprocessor_count(a.get_device());
  TileArgs<T> A;
  A.a = a.data_ptr<T>();
  A.wa = wa.data_ptr<T>();
  A.b = bb.data_ptr<T>();
  A.wb = wbb.data_ptr<T>();
  A.bw = bw.data_ptr<double>();
  A.h = grad ? h.data_ptr<double>() : nullptr;
  A.N = N;
  A.M = M;
  A.d = d;
  A.S = S;
  A.group = group;
  A.unbiased = unbiased;
  A.b_grad = self || b_grad;
  const int nblocks = plan_tiles(A, self, grad, sms);
  at::Tensor slot_i, slot_j;
  A.slot_i = nullptr;
  A.slot_j = nullptr;
  if (grad) {
    // Not zeroed: every slot entry the finalize kernel reads is first stored by exactly one block.
    int64_t ni = 0, nj = 0;
    slot_sizes(A, ni, nj);
    slot_i = at::empty({ni}, dev);
    slot_j = at::empty({nj}, dev);
    A.slot_i = slot_i.data_ptr<T>();
    A.slot_j = slot_j.data_ptr<T>();
  }
  at::Tensor block_vals = at::empty({int64_t(nblocks) * 2 * S}, dev.dtype(at::kDouble));
  A.block_vals = block_vals.data_ptr<double>();

  const size_t smem = smem_layout<T>(S, grad).bytes;
  if (self) {
    if (grad) launch_tiles<T, true, true>(A, nblocks, smem, stream, a.get_device());
    else launch_tiles<T, true, false>(A, nblocks, smem, stream, a.get_device());
  } else {
    if (grad) launch_tiles<T, false, true>(A, nblocks, smem, stream, a.get_device());
    else launch_tiles<T, false, false>(A, nblocks, smem, stream, a.get_device());
  }
  const bool diag = self && !unbiased;
  imq_values_finalize_kernel<T><<<1, 256, 0, stream>>>(A.block_vals, nblocks, S, self, unbiased, group, A.wa, N,
                                                       A.wb, M, R.vals.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (grad) {
    const int fblocks = grad_finalize_blocks(A, self, sms);
    imq_grad_finalize_kernel<T><<<fblocks, 256, 0, stream>>>(
        A, self, self ? 4.0 : 2.0, self ? 2.0 : 1.0, diag, R.da.data_ptr<T>(), R.dwa.data_ptr<T>(),
        self ? nullptr : R.db.data_ptr<T>(), self ? nullptr : R.dwb.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return R;
}

CudaResult imq_cuda(bool grad, const at::Tensor& a_in, const at::Tensor& wa_in, const at::Tensor* b_in,
                    const at::Tensor* wb_in, const at::Tensor& bw_in, const at::Tensor* h_in, int64_t group,
                    bool unbiased, const char* op, bool b_grad = true) {
  TORCH_CHECK(a_in.is_cuda(), op, ": expected CUDA tensors, got ", a_in.device());
  TORCH_CHECK(bw_in.size(0) <= kImqMaxBandwidthsCuda, op, ": the CUDA kernels take at most ",
              kImqMaxBandwidthsCuda, " bandwidths, got ", bw_in.size(0));
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::ScalarType ct =
      b_in ? imq_compute_dtype(a_in.scalar_type(), b_in->scalar_type()) : imq_compute_dtype(a_in.scalar_type());
  const at::Tensor a = a_in.to(ct).contiguous();
  const at::Tensor wa = wa_in.to(ct).contiguous();
  at::Tensor b, wb;
  if (b_in) {
    b = b_in->to(ct).contiguous();
    wb = wb_in->to(ct).contiguous();
  }
  const at::Tensor bw = bw_in.to(at::kDouble).contiguous();
  at::Tensor h;
  if (h_in) h = h_in->to(at::kDouble).contiguous();
  if (ct == at::kDouble) return imq_cuda_run<double>(!b_in, grad, a, wa, b, wb, bw, h, group, unbiased, b_grad);
  return imq_cuda_run<float>(!b_in, grad, a, wa, b, wb, bw, h, group, unbiased, b_grad);
}

at::Tensor imq_self_cuda(const at::Tensor& a, const at::Tensor& wa, const at::Tensor& bw, int64_t group,
                         bool unbiased) {
  const char* op = "gmwae_fast::imq_self";
  imq_check_args(op, a, wa, nullptr, nullptr, bw, nullptr, group);
  return imq_cuda(false, a, wa, nullptr, nullptr, bw, nullptr, group, unbiased, op).vals;
}

at::Tensor imq_cross_cuda(const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b, const at::Tensor& wb,
                          const at::Tensor& bw) {
  const char* op = "gmwae_fast::imq_cross";
  imq_check_args(op, a, wa, &b, &wb, bw, nullptr, 1);
  return imq_cuda(false, a, wa, &b, &wb, bw, nullptr, 1, false, op).vals;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> imq_self_grad_cuda(const at::Tensor& h, const at::Tensor& a,
                                                                  const at::Tensor& wa, const at::Tensor& bw,
                                                                  int64_t group, bool unbiased) {
  const char* op = "gmwae_fast::imq_self_grad";
  imq_check_args(op, a, wa, nullptr, nullptr, bw, &h, group);
  CudaResult r = imq_cuda(true, a, wa, nullptr, nullptr, bw, &h, group, unbiased, op);
  return {r.vals, r.da.to(a.scalar_type()), r.dwa.to(wa.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> imq_cross_grad_cuda(
    const at::Tensor& h, const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b, const at::Tensor& wb,
    const at::Tensor& bw, bool b_grad) {
  const char* op = "gmwae_fast::imq_cross_grad";
  imq_check_args(op, a, wa, &b, &wb, bw, &h, 1);
  // Without b_grad the tile kernel skips the column-side L and G work and db, dwb are zeros.
  CudaResult r = imq_cuda(true, a, wa, &b, &wb, bw, &h, 1, false, op, b_grad);
  return {r.vals, r.da.to(a.scalar_type()), r.dwa.to(wa.scalar_type()), r.db.to(b.scalar_type()),
          r.dwb.to(wb.scalar_type())};
}

}  // namespace
}  // namespace gmwae_fast

TORCH_LIBRARY_IMPL(gmwae_fast, CUDA, m) {
  m.impl("imq_self", &gmwae_fast::imq_self_cuda);
  m.impl("imq_cross", &gmwae_fast::imq_cross_cuda);
  m.impl("imq_self_grad", &gmwae_fast::imq_self_grad_cuda);
  m.impl("imq_cross_grad", &gmwae_fast::imq_cross_grad_cuda);
}
