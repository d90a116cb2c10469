// gm_reparam op family: activation math (host + device) and the input checks shared by the CPU and CUDA kernels.
//
// Ops (schemas in csrc/ops.cpp; contract in gmwae_fast/ops/gm_reparam.py):
//   gm_reparam(mu, sigma_raw, logits, seed?, noise?, activation) -> (z, pi)
//     z = mu + act(sigma_raw) * eps, eps = noise or the Philox stream of seed (csrc/philox.h); pi = softmax(logits)
//   gm_reparam_backward(grad_z, grad_pi, sigma_raw, logits, seed?, noise?, activation) -> (d_sigma_raw, d_logits)
//     d_sigma_raw = grad_z * eps * act'(sigma_raw), d_logits = pi * (grad_pi - <grad_pi, pi>), pi from logits
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "f32_math.h"
#include "philox.h"

namespace gmwae_fast {
namespace reparam {

enum Act : int { kSoftplus = 0, kExp = 1 };

// float: the portable polynomials of f32_math.h (vectorisable on the CPU, identical on CUDA); double: libm.
GMWAE_RP_HD float exp_(float x) { return f32::exp_f(x); }
GMWAE_RP_HD double exp_(double x) { return ::exp(x); }
GMWAE_RP_HD float log1p_(float x) { return f32::log1p_f(x); }
GMWAE_RP_HD double log1p_(double x) { return ::log1p(x); }

// softplus like torch.nn.functional.softplus (beta 1, threshold 20: identity above 20), branch-free:
// max(x, 0) + log1p(exp(-|x|)).
template <typename T>
GMWAE_RP_HD T softplus(T x) {
  const T ax = x > T(0) ? x : -x;
  const T sp = (x > T(0) ? x : T(0)) + log1p_(exp_(-ax));
  return x > T(20) ? x : sp;
}

template <typename T>
GMWAE_RP_HD T activation(T x, int act) {
  return act == kExp ? exp_(x) : softplus(x);
}

// d act / dx: exp(x), or sigmoid(x) (1 above the softplus threshold), from e = exp(-|x|) (never overflows).
template <typename T>
GMWAE_RP_HD T activation_grad(T x, int act) {
  if (act == kExp) return exp_(x);
  const T e = exp_(x > T(0) ? -x : x);
  const T sig = x > T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
  return x > T(20) ? T(1) : sig;
}

inline int parse_activation(const std::string& name) {
  if (name == "softplus") return kSoftplus;
  if (name == "exp") return kExp;
  TORCH_CHECK_VALUE(false, "gm_reparam: unknown activation '", name, "'; expected 'softplus' or 'exp'");
  return kSoftplus;
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Checks the op contract; `x` is mu (forward) or sigma_raw (backward). Returns the activation code.
inline int check_inputs(const char* op, const at::Tensor& x, const at::Tensor& sigma_raw, const at::Tensor& logits,
                        const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& noise,
                        const std::string& activation) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": expected (B, K, d) tensors, got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_float_type(x.scalar_type()), op, ": expected a floating dtype, got ", x.scalar_type());
  TORCH_CHECK_VALUE(sigma_raw.sizes() == x.sizes() && sigma_raw.scalar_type() == x.scalar_type(), op,
                    ": sigma_raw must match (shape ", x.sizes(), ", dtype ", x.scalar_type(), "), got ",
                    sigma_raw.sizes(), " ", sigma_raw.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(0) == x.size(0) && logits.size(1) == x.size(1), op,
                    ": logits must be (B, K) = (", x.size(0), ", ", x.size(1), "), got ", logits.sizes());
  TORCH_CHECK_TYPE(is_float_type(logits.scalar_type()), op, ": logits must be floating, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(sigma_raw.device() == x.device() && logits.device() == x.device(), op,
                    ": all tensors must be on one device");
  TORCH_CHECK_VALUE(x.is_contiguous() && sigma_raw.is_contiguous() && logits.is_contiguous(), op,
                    ": inputs must be contiguous");
  if (noise.has_value()) {
    const at::Tensor& n = *noise;
    TORCH_CHECK_VALUE(
        n.sizes() == x.sizes() && n.scalar_type() == x.scalar_type() && n.device() == x.device() && n.is_contiguous(),
        op, ": noise must be a contiguous tensor like sigma_raw (shape ", x.sizes(), ", dtype ", x.scalar_type(), ")");
  } else {
    TORCH_CHECK_VALUE(seed.has_value(), op, ": give seed or noise");
    const at::Tensor& s = *seed;
    TORCH_CHECK_VALUE(s.scalar_type() == at::kLong && s.numel() == 1, op,
                      ": seed must be an int64 tensor with one element, got ", s.scalar_type(), " ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == x.device() || s.device().is_cpu(), op,
                      ": seed must be on the inputs' device or on the CPU");
  }
  return parse_activation(activation);
}

}  // namespace reparam
}  // namespace gmwae_fast
