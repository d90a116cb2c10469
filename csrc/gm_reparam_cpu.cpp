// CPU kernels of the gm_reparam op family (contract: csrc/gm_reparam.h, gmwae_fast/ops/gm_reparam.py).
//
// The elementwise part runs over Philox counters (4 elements each; csrc/philox.h) in parallel chunks, the softmax
// part over rows of logits. Math is float32 (float64 for float64 tensors); the noise is generated in float32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "gm_reparam.h"

namespace gmwae_fast {
namespace reparam {
namespace {

constexpr int64_t kGrainCounters = 2048;  // counters (8192 elements) per parallel task at least
constexpr int kBlockC = 64;               // counters per block (the unit of the vectorised loops)
constexpr int kBlock = 4 * kBlockC;       // elements per block

uint64_t seed_value(const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& noise) {
  if (noise.has_value()) return 0;
  return static_cast<uint64_t>(seed->reshape({}).item<int64_t>());
}

// The block functions are plain loops over float arrays of branch-free math (philox.h), which GCC auto-vectorises;
// on x86-64 Linux they are compiled twice (AVX2 + FMA, and baseline SSE2) and picked at load time by the CPU.
// no-trapping-math lets GCC turn the selects of the math into blends (nothing here reads the FP exception flags).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GMWAE_RP_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GMWAE_RP_CLONES
#endif

// eps[0, 4 nc) = elements [4 c0, 4 (c0 + nc)) of the stream of seed.
GMWAE_RP_CLONES void normals_block(uint64_t seed, int64_t c0, int nc, float* __restrict eps) {
  uint32_t x0[kBlockC], x1[kBlockC], x2[kBlockC], x3[kBlockC];
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int j = 0; j < nc; ++j) {
    const uint64_t c = static_cast<uint64_t>(c0 + j);
    const philox::U32x4 x =
        philox::philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u, k0, k1);
    x0[j] = x.v[0];
    x1[j] = x.v[1];
    x2[j] = x.v[2];
    x3[j] = x.v[3];
  }
  for (int j = 0; j < nc; ++j) {
    float n0, n1, n2, n3;
    philox::box_muller(philox::uniform_open(x0[j]), philox::uniform_open(x1[j]), n0, n1);
    philox::box_muller(philox::uniform_open(x2[j]), philox::uniform_open(x3[j]), n2, n3);
    eps[4 * j] = n0;
    eps[4 * j + 1] = n1;
    eps[4 * j + 2] = n2;
    eps[4 * j + 3] = n3;
  }
}

// z = mu + act(sr) * eps
GMWAE_RP_CLONES void forward_block(const float* __restrict mu, const float* __restrict sr, const float* __restrict eps,
                                   float* __restrict z, int n, int act) {
  if (act == kExp) {
    for (int i = 0; i < n; ++i) z[i] = mu[i] + exp_(sr[i]) * eps[i];
  } else {
    for (int i = 0; i < n; ++i) z[i] = mu[i] + softplus(sr[i]) * eps[i];
  }
}

// d_sr = gz * eps * act'(sr)
GMWAE_RP_CLONES void backward_block(const float* __restrict gz, const float* __restrict sr, const float* __restrict eps,
                                    float* __restrict out, int n, int act) {
  if (act == kExp) {
    for (int i = 0; i < n; ++i) out[i] = gz[i] * eps[i] * exp_(sr[i]);
  } else {
    for (int i = 0; i < n; ++i) out[i] = gz[i] * eps[i] * activation_grad(sr[i], kSoftplus);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Elements [4 c0, 4 c1) (clipped to n) of: out = x + act(sr) * eps (forward, x = mu) or
// out = x * eps * act'(sr) (kGrad, x = grad_z).
template <typename scalar_t, bool kGrad>
void elementwise(const scalar_t* x, const scalar_t* sr, const scalar_t* noise, scalar_t* out, int64_t n, int64_t c0,
                 int64_t c1, uint64_t seed, int act) {
  alignas(64) float eps[kBlock];
  alignas(64) float xb[kBlock];
  alignas(64) float sb[kBlock];
  alignas(64) float ob[kBlock];
  for (int64_t cb = c0; cb < c1; cb += kBlockC) {
    const int nc = static_cast<int>(std::min<int64_t>(kBlockC, c1 - cb));
    const int64_t i0 = 4 * cb;
    const int len = static_cast<int>(std::min<int64_t>(4 * nc, n - i0));
    if (noise == nullptr) normals_block(seed, cb, nc, eps);
    if constexpr (std::is_same<scalar_t, double>::value) {
      for (int k = 0; k < len; ++k) {
        const int64_t i = i0 + k;
        const double e = noise != nullptr ? noise[i] : static_cast<double>(eps[k]);
        out[i] = kGrad ? x[i] * e * activation_grad(sr[i], act) : x[i] + activation(sr[i], act) * e;
      }
    } else if constexpr (std::is_same<scalar_t, float>::value) {
      const float* e = noise != nullptr ? noise + i0 : eps;
      if (kGrad) {
        backward_block(x + i0, sr + i0, e, out + i0, len, act);
      } else {
        forward_block(x + i0, sr + i0, e, out + i0, len, act);
      }
    } else {  // half, bfloat16: through float buffers
      for (int k = 0; k < len; ++k) {
        xb[k] = static_cast<float>(x[i0 + k]);
        sb[k] = static_cast<float>(sr[i0 + k]);
      }
      if (noise != nullptr) {
        for (int k = 0; k < len; ++k) eps[k] = static_cast<float>(noise[i0 + k]);
      }
      if (kGrad) {
        backward_block(xb, sb, eps, ob, len, act);
      } else {
        forward_block(xb, sb, eps, ob, len, act);
      }
      for (int k = 0; k < len; ++k) out[i0 + k] = static_cast<scalar_t>(ob[k]);
    }
  }
}

template <typename scalar_t, bool kGrad>
void elementwise_parallel(const at::Tensor& x, const at::Tensor& sr, const std::optional<at::Tensor>& noise,
                          at::Tensor& out, uint64_t seed, int act) {
  const int64_t n = x.numel();
  const int64_t counters = (n + 3) / 4;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* sp = sr.const_data_ptr<scalar_t>();
  const scalar_t* np = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, counters, kGrainCounters,
                   [&](int64_t c0, int64_t c1) { elementwise<scalar_t, kGrad>(xp, sp, np, op, n, c0, c1, seed, act); });
}

// pi = softmax(logits) per row (forward), or d_logits = pi * (g - <g, pi>) (backward, g = grad_pi).
template <typename scalar_t, bool kGrad>
void softmax_rows(const at::Tensor& logits, const at::Tensor* grad_pi, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), K = logits.size(1);
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const scalar_t* gp = kGrad ? grad_pi->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* l = lp + b * K;
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t k = 0; k < K; ++k) mx = std::max(mx, static_cast<acc_t>(l[k]));
      if (mx == -std::numeric_limits<acc_t>::infinity()) mx = acc_t(0);  // all -inf: 0/0 = nan like torch
      acc_t sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += exp_(static_cast<acc_t>(l[k]) - mx);
      const acc_t inv = acc_t(1) / sum;
      if (!kGrad) {
        for (int64_t k = 0; k < K; ++k) {
          op[b * K + k] = static_cast<scalar_t>(exp_(static_cast<acc_t>(l[k]) - mx) * inv);
        }
      } else {
        const scalar_t* g = gp + b * K;
        acc_t dot = 0;
        for (int64_t k = 0; k < K; ++k) dot += exp_(static_cast<acc_t>(l[k]) - mx) * inv * static_cast<acc_t>(g[k]);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t p = exp_(static_cast<acc_t>(l[k]) - mx) * inv;
          op[b * K + k] = static_cast<scalar_t>(p * (static_cast<acc_t>(g[k]) - dot));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gm_reparam_cpu(const at::Tensor& mu, const at::Tensor& sigma_raw,
                                                  const at::Tensor& logits, const std::optional<at::Tensor>& seed,
                                                  const std::optional<at::Tensor>& noise, c10::string_view activation) {
  const int act = check_inputs("gm_reparam", mu, sigma_raw, logits, seed, noise, std::string(activation));
  TORCH_CHECK_VALUE(mu.device().is_cpu(), "gm_reparam (CPU): expected CPU tensors");
  at::Tensor z = at::empty_like(mu, at::MemoryFormat::Contiguous);
  at::Tensor pi = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const uint64_t seed_v = seed_value(seed, noise);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "gm_reparam_cpu",
                                  [&] { elementwise_parallel<scalar_t, false>(mu, sigma_raw, noise, z, seed_v, act); });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gm_reparam_cpu_softmax",
                                  [&] { softmax_rows<scalar_t, false>(logits, nullptr, pi); });
  return {z, pi};
}

std::tuple<at::Tensor, at::Tensor> gm_reparam_backward_cpu(const at::Tensor& grad_z, const at::Tensor& grad_pi,
                                                           const at::Tensor& sigma_raw, const at::Tensor& logits,
                                                           const std::optional<at::Tensor>& seed,
                                                           const std::optional<at::Tensor>& noise,
                                                           c10::string_view activation) {
  const int act =
      check_inputs("gm_reparam_backward", sigma_raw, sigma_raw, logits, seed, noise, std::string(activation));
  TORCH_CHECK_VALUE(sigma_raw.device().is_cpu(), "gm_reparam_backward (CPU): expected CPU tensors");
  TORCH_CHECK_VALUE(grad_z.sizes() == sigma_raw.sizes() && grad_z.device() == sigma_raw.device(),
                    "gm_reparam_backward: grad_z must have the shape of sigma_raw");
  TORCH_CHECK_VALUE(grad_pi.sizes() == logits.sizes() && grad_pi.device() == logits.device(),
                    "gm_reparam_backward: grad_pi must have the shape of logits");
  const at::Tensor gz = grad_z.to(sigma_raw.scalar_type()).contiguous();
  const at::Tensor gpi = grad_pi.to(logits.scalar_type()).contiguous();
  at::Tensor dsr = at::empty_like(sigma_raw, at::MemoryFormat::Contiguous);
  at::Tensor dl = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const uint64_t seed_v = seed_value(seed, noise);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sigma_raw.scalar_type(), "gm_reparam_backward_cpu", [&] {
    elementwise_parallel<scalar_t, true>(gz, sigma_raw, noise, dsr, seed_v, act);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gm_reparam_backward_cpu_softmax",
                                  [&] { softmax_rows<scalar_t, true>(logits, &gpi, dl); });
  return {dsr, dl};
}

}  // namespace
}  // namespace reparam
}  // namespace gmwae_fast

TORCH_LIBRARY_IMPL(gmwae_fast, CPU, m) {
  m.impl("gm_reparam", &gmwae_fast::reparam::gm_reparam_cpu);
  m.impl("gm_reparam_backward", &gmwae_fast::reparam::gm_reparam_backward_cpu);
}
