// CUDA kernels of the gm_reparam op family (contract: csrc/gm_reparam.h, gmwae_fast/ops/gm_reparam.py).
//
// One launch per direction. Thread t (grid-stride) handles Philox counter t, i.e. the 4 contiguous elements
// 4t .. 4t + 3 (one Philox4x32-10 call, two Box-Muller pairs, csrc/philox.h), and, if t < B, softmax row t
// (K is small for a mixture encoder; the row is read three times from L1/L2). The seed is read from device memory
// by each thread when it is a tensor on the GPU (no host sync, CUDA-graph safe) or passed by value when it is a
// CPU tensor. Math is float32 (float64 for float64 tensors); the noise is generated in float32 with the same
// operations as the CPU kernels, so both backends give the same stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <limits>

#include "gm_reparam.h"

namespace gmwae_fast {
namespace reparam {
namespace {

constexpr int kThreads = 256;

struct SeedArg {
  const int64_t* ptr;  // device pointer, or nullptr
  uint64_t value;      // used when ptr is nullptr
};

__device__ __forceinline__ uint64_t load_seed(SeedArg s) {
  return s.ptr != nullptr ? static_cast<uint64_t>(*s.ptr) : s.value;
}

// Elementwise part of one counter: forward out = x + act(sr) * eps, backward (kGrad) out = x * eps * act'(sr).
template <typename scalar_t, bool kGrad>
__device__ __forceinline__ void counter_part(const scalar_t* __restrict__ x, const scalar_t* __restrict__ sr,
                                             const scalar_t* __restrict__ noise, scalar_t* __restrict__ out, int64_t n,
                                             int64_t c, uint64_t seed, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  philox::F32x4 nrm;
  if (noise == nullptr) nrm = philox::normal4(seed, static_cast<uint64_t>(c));
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const int64_t i = 4 * c + l;
    if (i < n) {
      const acc_t eps = noise != nullptr ? static_cast<acc_t>(noise[i]) : static_cast<acc_t>(nrm.v[l]);
      const acc_t s = static_cast<acc_t>(sr[i]);
      const acc_t xi = static_cast<acc_t>(x[i]);
      out[i] = kGrad ? static_cast<scalar_t>(xi * eps * activation_grad(s, act))
                     : static_cast<scalar_t>(xi + activation(s, act) * eps);
    }
  }
}

// Softmax part of row b: pi = softmax(logits[b]) (forward), or d_logits = pi * (g - <g, pi>) (kGrad).
template <typename lscalar_t, bool kGrad>
__device__ __forceinline__ void row_part(const lscalar_t* __restrict__ logits, const lscalar_t* __restrict__ grad_pi,
                                         lscalar_t* __restrict__ out, int64_t b, int64_t K) {
  using acc_t = at::opmath_type<lscalar_t>;
  const lscalar_t* l = logits + b * K;
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < K; ++k) mx = max(mx, static_cast<acc_t>(l[k]));
  if (mx == -std::numeric_limits<acc_t>::infinity()) mx = acc_t(0);  // all -inf: 0/0 = nan like torch
  acc_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += exp_(static_cast<acc_t>(l[k]) - mx);
  const acc_t inv = acc_t(1) / sum;
  if (!kGrad) {
    for (int64_t k = 0; k < K; ++k) out[b * K + k] = static_cast<lscalar_t>(exp_(static_cast<acc_t>(l[k]) - mx) * inv);
  } else {
    const lscalar_t* g = grad_pi + b * K;
    acc_t dot = 0;
    for (int64_t k = 0; k < K; ++k) dot += exp_(static_cast<acc_t>(l[k]) - mx) * inv * static_cast<acc_t>(g[k]);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t p = exp_(static_cast<acc_t>(l[k]) - mx) * inv;
      out[b * K + k] = static_cast<lscalar_t>(p * (static_cast<acc_t>(g[k]) - dot));
    }
  }
}

template <typename scalar_t, typename lscalar_t, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    gm_reparam_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ sr,
                      const scalar_t* __restrict__ noise, scalar_t* __restrict__ out,
                      const lscalar_t* __restrict__ logits, const lscalar_t* __restrict__ grad_pi,
                      lscalar_t* __restrict__ lout, SeedArg seed_arg, int64_t n, int64_t B, int64_t K, int act) {
  const uint64_t seed = noise == nullptr ? load_seed(seed_arg) : 0;
  const int64_t counters = (n + 3) / 4;
  const int64_t total = counters > B ? counters : B;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    if (t < counters) counter_part<scalar_t, kGrad>(x, sr, noise, out, n, t, seed, act);
    if (t < B) row_part<lscalar_t, kGrad>(logits, grad_pi, lout, t, K);
  }
}

SeedArg seed_arg(const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& noise) {
  if (noise.has_value()) return {nullptr, 0};
  if (seed->device().is_cuda()) return {seed->const_data_ptr<int64_t>(), 0};
  return {nullptr, static_cast<uint64_t>(seed->reshape({}).item<int64_t>())};  // a CPU tensor: no GPU sync
}

template <bool kGrad>
void launch(const at::Tensor& x, const at::Tensor& sr, const std::optional<at::Tensor>& noise, at::Tensor& out,
            const at::Tensor& logits, const at::Tensor* grad_pi, at::Tensor& lout, SeedArg sa, int act) {
  const int64_t n = x.numel();
  const int64_t B = logits.size(0), K = logits.size(1);
  const int64_t total = std::max<int64_t>((n + 3) / 4, B);
  if (total == 0) return;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gm_reparam_cuda", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gm_reparam_cuda_softmax", [&] {
      using l_t = scalar_t;
      gm_reparam_kernel<x_t, l_t, kGrad><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x.const_data_ptr<x_t>(), sr.const_data_ptr<x_t>(), noise.has_value() ? noise->const_data_ptr<x_t>() : nullptr,
          out.mutable_data_ptr<x_t>(), logits.const_data_ptr<l_t>(),
          grad_pi != nullptr ? grad_pi->const_data_ptr<l_t>() : nullptr, lout.mutable_data_ptr<l_t>(), sa, n, B, K,
          act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> gm_reparam_cuda(const at::Tensor& mu, const at::Tensor& sigma_raw,
                                                   const at::Tensor& logits, const std::optional<at::Tensor>& seed,
                                                   const std::optional<at::Tensor>& noise,
                                                   c10::string_view activation) {
  const int act = check_inputs("gm_reparam", mu, sigma_raw, logits, seed, noise, std::string(activation));
  TORCH_CHECK_VALUE(mu.is_cuda(), "gm_reparam (CUDA): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor z = at::empty_like(mu, at::MemoryFormat::Contiguous);
  at::Tensor pi = at::empty_like(logits, at::MemoryFormat::Contiguous);
  launch<false>(mu, sigma_raw, noise, z, logits, nullptr, pi, seed_arg(seed, noise), act);
  return {z, pi};
}

std::tuple<at::Tensor, at::Tensor> gm_reparam_backward_cuda(const at::Tensor& grad_z, const at::Tensor& grad_pi,
                                                            const at::Tensor& sigma_raw, const at::Tensor& logits,
                                                            const std::optional<at::Tensor>& seed,
                                                            const std::optional<at::Tensor>& noise,
                                                            c10::string_view activation) {
  const int act =
      check_inputs("gm_reparam_backward", sigma_raw, sigma_raw, logits, seed, noise, std::string(activation));
  TORCH_CHECK_VALUE(sigma_raw.is_cuda(), "gm_reparam_backward (CUDA): expected CUDA tensors");
  TORCH_CHECK_VALUE(grad_z.sizes() == sigma_raw.sizes() && grad_z.device() == sigma_raw.device(),
                    "gm_reparam_backward: grad_z must have the shape of sigma_raw");
  TORCH_CHECK_VALUE(grad_pi.sizes() == logits.sizes() && grad_pi.device() == logits.device(),
                    "gm_reparam_backward: grad_pi must have the shape of logits");
  const c10::cuda::CUDAGuard guard(sigma_raw.device());
  const at::Tensor gz = grad_z.to(sigma_raw.scalar_type()).contiguous();
  const at::Tensor gpi = grad_pi.to(logits.scalar_type()).contiguous();
  at::Tensor dsr = at::empty_like(sigma_raw, at::MemoryFormat::Contiguous);
  at::Tensor dl = at::empty_like(logits, at::MemoryFormat::Contiguous);
  launch<true>(gz, sigma_raw, noise, dsr, logits, &gpi, dl, seed_arg(seed, noise), act);
  return {dsr, dl};
}

}  // namespace
}  // namespace reparam
}  // namespace gmwae_fast

TORCH_LIBRARY_IMPL(gmwae_fast, CUDA, m) {
  m.impl("gm_reparam", &gmwae_fast::reparam::gm_reparam_cuda);
  m.impl("gm_reparam_backward", &gmwae_fast::reparam::gm_reparam_backward_cuda);
}
