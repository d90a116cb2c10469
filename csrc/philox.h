// Philox4x32-10 counter-based generator and the standard-normal stream of gm_reparameterize.
//
// Shared by the CPU (csrc/gm_reparam_cpu.cpp) and CUDA (csrc/gm_reparam_cuda.cu) kernels, so both produce the same
// stream; the Triton kernels (kernels/gm_reparam.py) implement the same definition with tl.philox:
//
//   element i (row-major flat index) -> counter c = i / 4, lane i % 4
//   (x0, x1, x2, x3) = Philox4x32-10(counter = (c mod 2^32, c >> 32, 0, 0), key = (seed mod 2^32, seed >> 32))
//   u_j = float32((x_j >> 8) + 1/2) * 2^-24              in (0, 1] (see uniform_open)
//   lanes 0, 1 = r cos t, r sin t with r = sqrt(-2 ln u0), t = 2 pi u1    (Box-Muller, float32)
//   lanes 2, 3 = the same from (u2, u3)
//
// The Philox bits are identical everywhere. CPU and CUDA evaluate log / sincos with the same branch-free float32
// polynomials of csrc/f32_math.h (so their normals agree to the last bit up to FMA contraction, ~1 ulp); Triton uses
// tl.log / tl.cos / tl.sin of t = 2 pi u1 rounded to float32 (agreement ~1e-6 absolute).
// Philox4x32-10 is Salmon et al. (SC'11); the output matches Random123's known-answer
// vectors (checked in tests/test_gm_reparam.py against an independent NumPy implementation).
#pragma once

#include <cstdint>

#include "f32_math.h"

namespace gmwae_fast {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

struct U32x4 {
  uint32_t v[4];
};

struct F32x4 {
  float v[4];
};

GMWAE_RP_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds of Philox4x32 on counter (c0, c1, c2, c3) with key (k0, k1).
GMWAE_RP_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kMul0, c0);
    const uint32_t lo0 = kMul0 * c0;
    const uint32_t hi1 = mulhi32(kMul1, c2);
    const uint32_t lo1 = kMul1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  U32x4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// The normal stream.
// ---------------------------------------------------------------------------------------------------------------

// The top 24 bits of x as a float in (0, 1]: never 0 (log is finite).  Exact below 1/2; from 1/2 up the half step
// needs a 25th bit and float32 rounds it to even, and the top value (2^24 - 1/2) 2^-24 rounds to exactly 1.0, whose
// log is 0: that element's pair of normals is (0, 0), a probability-2^-24 event the Triton kernels reproduce.
GMWAE_RP_HD float uniform_open(uint32_t x) { return (static_cast<float>(x >> 8) + 0.5f) * 5.9604644775390625e-08f; }

// Box-Muller: (r cos 2 pi u1, r sin 2 pi u1), r = sqrt(-2 ln u0).
GMWAE_RP_HD void box_muller(float u0, float u1, float& n0, float& n1) {
  const float r = f32::sqrt_f(-2.0f * f32::log_f(u0));
  float s, c;
  f32::sincos_2pi(u1, s, c);
  n0 = r * c;
  n1 = r * s;
}

// The four normals of counter c (elements 4c .. 4c + 3 of the stream of seed).
GMWAE_RP_HD F32x4 normal4(uint64_t seed, uint64_t c) {
  const U32x4 x = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u,
                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  F32x4 n;
  box_muller(uniform_open(x.v[0]), uniform_open(x.v[1]), n.v[0], n.v[1]);
  box_muller(uniform_open(x.v[2]), uniform_open(x.v[3]), n.v[2], n.v[3]);
  return n;
}

}  // namespace philox
}  // namespace gmwae_fast
