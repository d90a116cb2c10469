// Portable float32 math, branch-free (selects, no calls), shared by the CPU and CUDA kernels of gm_reparameterize:
// the CPU loops over blocks auto-vectorise, and CPU and CUDA run the same operations (results equal up to FMA
// contraction). Cephes-style polynomials, ~1 ulp. Used by the normal stream (csrc/philox.h) and the activations
// (csrc/gm_reparam.h).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GMWAE_RP_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
// always_inline: the CPU block loops (csrc/gm_reparam_cpu.cpp) are compiled per instruction set with their own
// options, and GCC only inlines (and so vectorises) callees with other options when told to.
#define GMWAE_RP_HD inline __attribute__((always_inline))
#else
#define GMWAE_RP_HD inline
#endif

namespace gmwae_fast {
namespace f32 {

GMWAE_RP_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

GMWAE_RP_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// Round to nearest even for |v| < 2^22 (the 1.5 * 2^23 trick; exact under the default rounding mode).
GMWAE_RP_HD float round_nearest(float v) { return (v + 12582912.0f) - 12582912.0f; }

// exp(x); 0 below -103.9 (the float subnormal range ends there), inf above 88.72, NaN stays NaN.
GMWAE_RP_HD float exp_f(float x) {
  const float xc = x < -103.9f ? -103.9f : (x > 88.72283f ? 88.72283f : x);
  const float n = round_nearest(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1;  // 2^n as 2^n1 * 2^n2, both normal for n in [-150, 128]
  const int32_t n2 = ni - n1;
  const float out =
      y * bits_to_float(static_cast<uint32_t>(n1 + 127) << 23) * bits_to_float(static_cast<uint32_t>(n2 + 127) << 23);
  return x > 88.72283f ? bits_to_float(0x7f800000u) : (x < -103.9f ? 0.0f : out);
}

// log(x) for a positive normal float x.
GMWAE_RP_HD float log_f(float x) {
  const uint32_t b = float_to_bits(x);
  const int32_t e0 = static_cast<int32_t>((b >> 23) & 0xffu) - 126;  // x = m 2^e0, m in [1/2, 1)
  const float m0 = bits_to_float((b & 0x007fffffu) | 0x3f000000u);
  const bool small = m0 < 0.70710678118654752440f;
  const float e = static_cast<float>(small ? e0 - 1 : e0);
  const float m = small ? m0 + m0 - 1.0f : m0 - 1.0f;  // log(x) = e log 2 + log(1 + m), |m| < 0.42
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + e * 0.693359375f;
}

// sqrt(x) for a positive normal float x: reciprocal square root from the exponent trick, three Newton steps, then
// one Newton step on the square root with the residual x - s^2 (<= 1 ulp). Written out rather than sqrtf because
// sqrtf sets errno, which stops GCC from vectorising the CPU loops unless the whole build uses -fno-math-errno.
GMWAE_RP_HD float sqrt_f(float x) {
  float y = bits_to_float(0x5f375a86u - (float_to_bits(x) >> 1));
  const float hx = 0.5f * x;
  y = y * (1.5f - hx * y * y);
  y = y * (1.5f - hx * y * y);
  y = y * (1.5f - hx * y * y);
  const float s = x * y;
  return s + 0.5f * y * (x - s * s);
}

// log(1 + t) for t in [0, inf): log of u = 1 + t, corrected by the rounding error of u.
GMWAE_RP_HD float log1p_f(float t) {
  const float u = 1.0f + t;
  return log_f(u) - ((u - 1.0f) - t) / u;
}

// sin(2 pi u) and cos(2 pi u) for |u| < 2^20: exact reduction to a quarter turn q and |f| <= 1/8.
GMWAE_RP_HD void sincos_2pi(float u, float& s, float& c) {
  const float q = round_nearest(4.0f * u);
  const float f = u - 0.25f * q;  // exact
  const float a = f * 6.28318530717958647692f;
  const float z = a * a;
  const float sp = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * a + a;
  const float cp =
      ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const int32_t quadrant = static_cast<int32_t>(q) & 3;
  s = quadrant == 0 ? sp : (quadrant == 1 ? cp : (quadrant == 2 ? -sp : -cp));
  c = quadrant == 0 ? cp : (quadrant == 1 ? -sp : (quadrant == 2 ? -cp : sp));
}

}  // namespace f32
}  // namespace gmwae_fast
