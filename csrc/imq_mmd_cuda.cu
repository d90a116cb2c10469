// Fused CUDA kernels of the imq_mmd ops (schemas in csrc/ops.cpp, contract in docs/ARCHITECTURE.md).
//
// Decomposition
// -------------
// Points are cut into tiles of kBT = 64 rows; a thread block of 256 threads computes one 64 x 64 tile of pairs
// at a time.  Tiles are grouped into *panels* of PS consecutive tiles, and one block owns one panel pair
// (p, q): all tiles (I, J) with I in panel p and J in panel q (self terms: the upper triangle only, p <= q and
// J >= I when p == q).  The panels depend only on (N, M, d, dtype), never on the device: about kTargetBlocks =
// 1024 panel pairs (when there are that many tile pairs), enough for every SM of any GPU; the reduction
// dimension is split across blocks.  Gradient ops run the blocks in waves (launches) whose slots fit a 512 MiB
// budget, panels shrinking (down to one tile) as N d grows so that a wave still holds >= kTargetBlocks blocks.
//
// Per tile:
//   D phase   the tile's coordinates (in the compute type, unshifted) go through
//             shared memory k-major (the row tile stays there for all the column tiles of a row when d fits one
//             chunk; 16-byte loads when d % 4 == 0); each thread accumulates a 4 x 4 register tile of squared
//             distances sum_k (a_ik - b_jk)^2 (direct differences, never the |a|^2 + |b|^2 - 2ab expansion in
//             float32).  Tensor-core instantiation (float, 32 <= d <= 64, TC = true): per tile pair an error gate
//             (tc_route_ok) and, when it passes, the distances |a'|^2 + |b'|^2 - 2 a'.b' as a float64 GEMM on the
//             FP64 tensor cores (mma m16n8k8 on sm_90, 4 x m8n8k4 on sm_80) on coordinates centred at the tile
//             pair's first row; the G phase then likewise (a'_i sum_j P_ij - (P B')_i).
//   K phase   per-pair kernel values through csrc/imq_math.h (imq_band_acc_approx: one bare rcp.approx per
//             pair and bandwidth, the special-function unit has headroom here; the CPU kernels share one
//             reciprocal per group of three, imq_ku3, because the x86 divider is their bottleneck).  One
//             power-of-two scale for all bandwidths (imq_make_bands), so x = D / R, its cap and w x are formed
//             once per pair.  Value partials per bandwidth, both of w w k and of w w (1 - k) (the finalize keeps
//             the more accurate one, imq_pick_value): 16 pairs per thread in registers, 1 level of warp
//             shuffles, 16 lane partials per warp in shared memory, added per tile in float64 into per-block
//             accumulators (fixed order).  Pair masks (partial, diagonal, same-group
//             tiles) are formed only on the tiles that need them.
//             Gradient ops also form P_ij = w_i w_j psi(D_ij) and Phi_ij = phi(D_ij) (masked) in shared memory.
//   L phase   row/column sums of the weighted Phi (one line per thread): the weight gradients.
//   G phase   point gradients out of shared memory, every difference formed directly (no GEMM expansion
//             a_i sum_j P_ij - sum_j P_ij b_j, whose cancellation a common offset or one outlier would expose):
//                 row side  g_i = sum_j P_ij (a_i - b_j),   col side  g_j = sum_i P_ij (b_j - a_i),
//             over the ceil(kc / 16) slices of 16 coordinates the chunk holds (g_side: d = 10 runs 1 of 4),
//             coordinate-major across the warps so that the warps holding only padding sit out (d = 10: 3 of 8).
//
// Determinism (no float atomics anywhere)
// ---------------------------------------
// Gradients: every block of a wave owns two slot regions, the rows of its row panel and of its column panel
// (first visit stores, later visits of the same block add, in program order), so the slot contents are
// reproducible.  After each wave a fold kernel sums, for every row, the slots of the wave's blocks in a fixed
// order in float64 and adds them to running float64 sums ((N + M) (d + 1), only with several waves); the last
// fold applies the factors (self 4 and 2, cross 2 and 1) and the analytic diagonal.  Values: per-block float64
// partials, summed per wave in a fixed order by a one-block kernel.  Slot memory <= 512 MiB whatever N and d.
// The plan depends on no device property, so the bits are the same on every GPU.
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
#include <cstdlib>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "imq_mmd_common.h"
#include "imq_mmd_cuda_kernels.cuh"

namespace gmwae_fast {
namespace {

using namespace imq_cuda;

// A device attribute, cached per (attribute, device) under a mutex (avoids ATen/cuda/CUDAContext.h, which needs
// the cuSPARSE/cuBLAS headers).  Each call site passes one fixed attribute, so one cache per template instance.
template <cudaDeviceAttr ATTR>
int cached_device_attribute(int device) {
  static std::mutex mu;
  static std::unordered_map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, ATTR, device));
  cache.emplace(device, value);
  return value;
}

// SM count of a device (sizes the grid of the gradient fold only; the results do not depend on it).
int multiprocessor_count(int device) { return cached_device_attribute<cudaDevAttrMultiProcessorCount>(device); }

struct CudaResult {
  at::Tensor vals;              // (S,) float64
  at::Tensor da, dwa, db, dwb;  // compute dtype
};

// Largest dynamic shared memory a block may opt in to on a device.
int max_smem_optin(int device) { return cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }

// Opts a tile kernel instantiation in to the device's largest dynamic shared memory, once per (device,
// instantiation), under a mutex (host threads launching with different bandwidth counts never race on it).
template <class T, bool SELF, bool GRAD, bool TC>
void opt_in_smem(int device) {
  static std::mutex mu;
  static std::unordered_set<int> done;
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(device)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(imq_tiles_kernel<T, SELF, GRAD, TC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      max_smem_optin(device)));
  done.insert(device);
}

template <class T, bool SELF, bool GRAD, bool TC>
void launch_tiles(const TileArgs<T>& A, int64_t nblocks, size_t smem, cudaStream_t stream, int device) {
  const int limit = max_smem_optin(device);
  TORCH_CHECK(smem <= size_t(limit), "gmwae_fast::imq_*: the CUDA kernel needs ", smem,
              " bytes of shared memory per block, the device allows ", limit,
              " (compute capability 8.0 or newer is required; float64 with many bandwidths needs the most)");
  opt_in_smem<T, SELF, GRAD, TC>(device);
  imq_tiles_kernel<T, SELF, GRAD, TC><<<unsigned(nblocks), kThreads, smem, stream>>>(A);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, bool TC>
void launch_tiles_any(bool self, bool grad, const TileArgs<T>& A, int64_t nblocks, size_t smem, cudaStream_t stream,
                      int device) {
  if (self) {
    if (grad)
      launch_tiles<T, true, true, TC>(A, nblocks, smem, stream, device);
    else
      launch_tiles<T, true, false, TC>(A, nblocks, smem, stream, device);
  } else {
    if (grad)
      launch_tiles<T, false, true, TC>(A, nblocks, smem, stream, device);
    else
      launch_tiles<T, false, false, TC>(A, nblocks, smem, stream, device);
  }
}

// Whether the float kernels of a device take the tensor-core route (tensor_core_route decides by d): the devices
// with full-rate float64 tensor cores (compute capability 8.0: A100, A30; 9.x: H100, H200, GH200), unless
// GMWAE_FAST_CUDA_TENSOR_CORES=0 (read at every launch: A/B benchmarks, and gmwae_fast.guard turns the route
// off in a process where it fails its first-use check).  Consumer parts (8.6, 8.9, 12.x) run the
// float64 mma at their scalar float64 rate, far below their float32 one: the CUDA-core route is faster there.
inline bool tensor_cores_allowed(int device) {
  const char* v = std::getenv("GMWAE_FAST_CUDA_TENSOR_CORES");
  const bool env_allows = !(v && std::string(v) == "0");
  const int major = cached_device_attribute<cudaDevAttrComputeCapabilityMajor>(device);
  const int minor = cached_device_attribute<cudaDevAttrComputeCapabilityMinor>(device);
  return env_allows && ((major == 8 && minor == 0) || major == 9);
}

template <class T>
CudaResult imq_cuda_run(bool self, bool grad, const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b,
                        const at::Tensor& wb, const at::Tensor& bw, const at::Tensor& h, int64_t group, bool unbiased,
                        bool b_grad) {
  const int64_t N = a.size(0);
  const int64_t d = a.size(1);
  const at::Tensor& bb = self ? a : b;
  const at::Tensor& wbb = self ? wa : wb;
  const int64_t M = bb.size(0);
  const int S = int(bw.size(0));
  const auto dev = a.options();
  // Outputs: written completely by the finalize kernels, zero when there is nothing to compute.
  const bool empty = N == 0 || M == 0 || S == 0;
  auto alloc = [&](at::IntArrayRef shape, at::TensorOptions o) {
    return empty ? at::zeros(shape, o) : at::empty(shape, o);
  };
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
  const TilePlan plan = plan_tiles(A, self, grad);
  const std::vector<Wave> waves = plan_waves(A, self, plan);
  at::Tensor slot_i, slot_j, acc;
  A.slot_i = nullptr;
  A.slot_j = nullptr;
  double* accp = nullptr;
  if (grad) {
    // Not zeroed: every slot entry a fold reads is first stored by exactly one block of the wave.
    int64_t ni = 0, nj = 0;
    slot_sizes(A, plan, ni, nj);
    slot_i = at::empty({ni}, dev);
    slot_j = at::empty({nj}, dev);
    A.slot_i = slot_i.data_ptr<T>();
    A.slot_j = slot_j.data_ptr<T>();
    if (waves.size() > 1) {  // running float64 sums between waves (zeroed: a row may first be folded in any wave)
      acc = at::zeros({(N + (self ? 0 : M)) * (d + 1)}, dev.dtype(at::kDouble));
      accp = acc.data_ptr<double>();
    }
  }
  at::Tensor block_vals = at::empty({plan.wave_blocks * 2 * S}, dev.dtype(at::kDouble));
  at::Tensor vacc = at::empty({2 * S}, dev.dtype(at::kDouble));
  A.block_vals = block_vals.data_ptr<double>();

  A.tensor_cores = tensor_core_route(d, sizeof(T), tensor_cores_allowed(a.get_device()));
  A.vec4 = sizeof(T) == 4 && d % 4 == 0 && reinterpret_cast<uintptr_t>(A.a) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(A.b) % 16 == 0;
  const size_t smem = smem_layout<T>(S, grad, A.tensor_cores).bytes;
  const bool diag = self && !unbiased;
  for (const Wave& w : waves) {
    A.block0 = w.b0;
    const int64_t nb = w.b1 - w.b0;
    if (A.tensor_cores)
      launch_tiles_any<T, true>(self, grad, A, nb, smem, stream, a.get_device());
    else
      launch_tiles_any<T, false>(self, grad, A, nb, smem, stream, a.get_device());
    imq_values_finalize_kernel<T><<<1, 256, 0, stream>>>(A.block_vals, int(nb), S, self, unbiased, group, A.wa, N, A.wb,
                                                         M, vacc.data_ptr<double>(), w.first, w.last,
                                                         R.vals.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grad) {
      imq_grad_finalize_kernel<T><<<grad_finalize_blocks(w, d, sms), 256, 0, stream>>>(
          A, w, self, self ? 4.0 : 2.0, self ? 2.0 : 1.0, diag, accp, R.da.data_ptr<T>(), R.dwa.data_ptr<T>(),
          self ? nullptr : R.db.data_ptr<T>(), self ? nullptr : R.dwb.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return R;
}

CudaResult imq_cuda(bool grad, const at::Tensor& a_in, const at::Tensor& wa_in, const at::Tensor* b_in,
                    const at::Tensor* wb_in, const at::Tensor& bw_in, const at::Tensor* h_in, int64_t group,
                    bool unbiased, const char* op, bool b_grad = true) {
  TORCH_CHECK(a_in.is_cuda(), op, ": expected CUDA tensors, got ", a_in.device());
  TORCH_CHECK(bw_in.size(0) <= kImqMaxBandwidthsCuda, op, ": the CUDA kernels take at most ", kImqMaxBandwidthsCuda,
              " bandwidths, got ", bw_in.size(0));
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
