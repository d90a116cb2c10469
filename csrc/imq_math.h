// Per-pair math of the inverse multiquadric (IMQ) kernel, in ONE place.
//
// Shared by the CPU kernels (csrc/imq_mmd_cpu*.{cpp,h}, compiled by the host C++ compiler) and the CUDA
// kernels (csrc/imq_mmd_cuda.cu, compiled by nvcc): the grouping, the ranges and the elementary operations are
// common; the CPU kernels evaluate a group with imq_ku1/2/3 (one reciprocal per group), the CUDA kernels with
// imq_band_acc (one reciprocal per bandwidth, one scale for all bandwidths: imq_make_bands), which the CPU
// tests run under the SIMT emulator (csrc/testing/).
// Everything is a template over the lane type `V` (float, double, or a GCC vector of them on the CPU)
// and the scalar type `S` (float or double).
//
// Notation (docs/ARCHITECTURE.md): for a pair at squared distance D and bandwidths C_s,
//   k_s(D) = C_s / (C_s + D)
//   phi(D) = sum_s h_s k_s(D)                       (cotangent-weighted kernel)
//   psi(D) = dphi/dD = -sum_s h_s C_s / (C_s + D)^2 = sum_s q_s k_s(D)^2,   q_s = -h_s / C_s.
//
// On the CPU, division throughput (the x86 divider) bounds this math, so the bandwidths are merged in groups of
// up to three that share ONE reciprocal (on the GPU the special-function unit has ~15x headroom against the
// issue rate: one reciprocal per bandwidth costs fewer instructions, see imq_band_acc):
//   with x = D / R (R = the power of two above the largest C of the group), c_s = C_s / R and t_s = c_s + x,
//   r = 1 / (t0 t1 t2),  k0 = c0 t1 t2 r,  k1 = c1 t0 t2 r,  k2 = c2 t0 t1 r,
// and the complements 1 - k_s = x / t_s from the same reciprocal (accurate where k_s ~ 1, i.e. for the
// bandwidths large against the distances, where MMD^2 is smallest: see imq_pick_value).
// The forward values need every k_s separately (one value per bandwidth), and phi/psi are then a few
// fused multiply-adds per bandwidth on top.  Accuracy in float32: each k_s carries a handful of roundings
// (random in sign), i.e. a few ulp, and no cancellation: all factors are positive.
//
// Range: the host only groups bandwidths whose ratio max/min is <= kImqMaxGroupRatio, so the normalised c_s lie
// in [1/(2 kImqMaxGroupRatio), 1) and t0 t1 t2 >= (2 kImqMaxGroupRatio)^-2 (no underflow).  Far pairs, x above
// ImqRange<S>::near_x (2^40 in float), take the far branch: m_s = 1 / x from the same single reciprocal (c_s / x
// < 2^-40 is below the float rounding), so k_s = c_s / x and psi keep decaying like 1 / D and 1 / D^2 however far
// the pair is (a clamp of x would freeze them, and psi times a huge a - b would swamp the other gradients).
// x itself is capped at ImqRange<S>::far_x (2^126 in float, so 1 / x stays a normal number): D = inf (an
// overflowed float distance) gives k_s ~ 1e-38 c_s, psi = 0 and u_s = 1, never NaN.
#pragma once

#include <cmath>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GMW_HD __host__ __device__
#define GMW_INLINE __forceinline__
#else
#define GMW_HD
#if defined(__GNUC__) || defined(__clang__)
#define GMW_INLINE inline __attribute__((always_inline))
#else
#define GMW_INLINE inline
#endif
#endif

namespace gmwae_fast {

// Largest ratio C_max / C_min merged into one group.
constexpr double kImqMaxGroupRatio = 1.0e4;
// Most bandwidths sharing one reciprocal.
constexpr int kImqGroupMax = 3;

// Limits of x = D / R (powers of two): near_x bounds the shared-reciprocal products ((1 + near_x)^3 is finite and
// c_s / near_x is below the rounding), far_x caps x so that 1 / x is a normal number (flush-to-zero safe).
template <class S>
struct ImqRange;
template <>
struct ImqRange<float> {
  static constexpr float near_x = 0x1p40f;
  static constexpr float far_x = 0x1p126f;
};
template <>
struct ImqRange<double> {
  static constexpr double near_x = 0x1p300;
  static constexpr double far_x = 0x1p1000;
};

// Constants of one group of n (1..3) bandwidths, starting at bandwidth index s0.  Unused slots (s >= n) are
// filled with harmless values (c = 1, h = q = 0) so that code may evaluate all three unconditionally.
template <class S>
struct ImqGroup {
  S inv_ref;           // 1 / R, R = the power of two just above max C_s of the group
  S c[kImqGroupMax];   // C_s / R, in (0, 1)
  S h[kImqGroupMax];   // cotangent h_s (0 where not given)
  S q[kImqGroupMax];   // -h_s / C_s
  S hc[kImqGroupMax];  // h_s c_s  (phi = sum_s hc_s r_s with r_s = 1 / (c_s + x), see imq_band_acc)
  S qr[kImqGroupMax];  // -h_s c_s / R  (psi = sum_s qr_s r_s^2)
  int n;               // number of bandwidths in the group (1..3)
  int s0;              // index of the group's first bandwidth
};

// Host (or one device thread): split bandwidths into consecutive groups (<= 3, ratio <= kImqMaxGroupRatio).
// `bw` (S doubles, > 0) and `h` (S doubles, may be null) -> groups; returns the number of groups (<= S).
template <class S>
GMW_HD inline int imq_make_groups(const double* bw, const double* h, int num_bw, ImqGroup<S>* out) {
  int ng = 0;
  int s = 0;
  while (s < num_bw) {
    double lo = bw[s], hi = bw[s];
    int n = 1;
    while (n < kImqGroupMax && s + n < num_bw) {
      const double c = bw[s + n];
      const double nlo = c < lo ? c : lo;
      const double nhi = c > hi ? c : hi;
      if (nhi > kImqMaxGroupRatio * nlo) break;
      lo = nlo;
      hi = nhi;
      ++n;
    }
    // R = the power of two just above the largest C: x = D / R and c_s = C_s / R are then exact (no rounding
    // of D / R, whose bias would not average out over the pairs: a ~1e-8 relative shift of every k_s).
    int e = 0;
    (void)frexp(hi, &e);  // hi = f 2^e, f in [0.5, 1)
    const double R = ldexp(1.0, e);
    ImqGroup<S>& g = out[ng++];
    g.inv_ref = static_cast<S>(1.0 / R);
    g.n = n;
    g.s0 = s;
    for (int u = 0; u < kImqGroupMax; ++u) {
      if (u < n) {
        const double hs = h ? h[s + u] : 0.0;
        g.c[u] = static_cast<S>(bw[s + u] / R);
        g.h[u] = static_cast<S>(hs);
        g.q[u] = static_cast<S>(-hs / bw[s + u]);
        g.hc[u] = static_cast<S>(hs * (bw[s + u] / R));
        g.qr[u] = static_cast<S>(-hs * (bw[s + u] / R) / R);
      } else {
        g.c[u] = S(1);
        g.h[u] = S(0);
        g.q[u] = S(0);
        g.hc[u] = S(0);
        g.qr[u] = S(0);
      }
    }
    s += n;
  }
  return ng;
}

// ---- elementary operations (overloaded per lane type; the CPU vector types reuse the generic ones) ----

// acc + (a - b)^2, the only way distances are formed (never |a|^2 + |b|^2 - 2ab).
template <class V>
GMW_HD GMW_INLINE V imq_sqdist_step(V acc, V a, V b) {
  const V t = a - b;
  return acc + t * t;
}

// min(x, m) for scalar or vector lanes (the ternary is element-wise for GCC/Clang vectors).  NaN stays NaN
// (a NaN coordinate must give NaN values, as in the reference), hence not fmin.
template <class V, class S>
GMW_HD GMW_INLINE V imq_clamp_hi(V x, S m) {
#if defined(__CUDA_ARCH__)
  return x > m ? V(m) : x;
#else
  return x > m ? m + V{} : x;
#endif
}

// Reciprocal.  Host (and double on the device): correctly rounded division.  float on the device: the
// special-function-unit approximation (|rel err| <= 1 ulp, argument is normal here) refined by one Newton
// step, i.e. one MUFU.RCP + two FMAs instead of the long IEEE division sequence.
GMW_HD GMW_INLINE double imq_rcp(double p) { return 1.0 / p; }
GMW_HD GMW_INLINE float imq_rcp(float p) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(p));
  const float e = __fmaf_rn(-p, r, 1.0f);
  return __fmaf_rn(r, e, r);
#else
  return 1.0f / p;
#endif
}
// GCC/Clang vector lanes (CPU only): element-wise correctly rounded division.
template <class V>
GMW_HD GMW_INLINE V imq_rcp(V p) {
  typedef typename std::remove_cv<typename std::remove_reference<decltype(p[0])>::type>::type E;
  return E(1) / p;
}

// ---- kernel values of one group at squared distance D ----

// Element type of a lane type: V itself for scalars, the element of a GCC/Clang vector.
template <class V, class = void>
struct ImqElem {
  typedef V type;
};
template <class V>
struct ImqElem<V, decltype(void(std::declval<V&>()[0]))> {
  typedef typename std::remove_cv<typename std::remove_reference<decltype(std::declval<V&>()[0])>::type>::type type;
};

// x = D / R capped at far_x (finite; NaN stays NaN).  `inv_ref` may be a scalar or pre-broadcast lanes.
template <class V, class S>
GMW_HD GMW_INLINE V imq_group_x(V D, S inv_ref) {
  return imq_clamp_hi(D * inv_ref, ImqRange<typename ImqElem<V>::type>::far_x);
}

// Element-wise x > near_x ? a : b (false for NaN).
template <class V>
GMW_HD GMW_INLINE V imq_far_select(V x, V a, V b) {
  return x > ImqRange<typename ImqElem<V>::type>::near_x ? a : b;
}

// x capped at near_x: the argument of the shared-reciprocal products (finite for every x).
template <class V>
GMW_HD GMW_INLINE V imq_near_x(V x) {
  return imq_clamp_hi(x, ImqRange<typename ImqElem<V>::type>::near_x);
}

// One reciprocal gives every m_s = 1 / t_s of the group (far pairs: m_s = 1 / x); then k_s = c_s m_s and its
// complement u_s = 1 - k_s = x m_s (computed directly, so it is accurate where k_s is close to 1: the value
// kernels accumulate both sums and keep the better one, see imq_pick_value).

// n = 3: three values (and complements), one reciprocal.
template <class V, class S>
GMW_HD GMW_INLINE void imq_ku3(V D, S inv_ref, S c0, S c1, S c2, V& k0, V& k1, V& k2, V& u0, V& u1, V& u2) {
  const V x = imq_group_x(D, inv_ref);
  const V xn = imq_near_x(x);
  const V t0 = xn + c0;
  const V t1 = xn + c1;
  const V t2 = xn + c2;
  const V t01 = t0 * t1;
  const V r = imq_rcp(imq_far_select(x, x, t01 * t2));
  const V rt2 = r * t2;
  const V m0 = imq_far_select(x, r, t1 * rt2);
  const V m1 = imq_far_select(x, r, t0 * rt2);
  const V m2 = imq_far_select(x, r, t01 * r);
  k0 = m0 * c0;
  k1 = m1 * c1;
  k2 = m2 * c2;
  u0 = x * m0;
  u1 = x * m1;
  u2 = x * m2;
}

// n = 2.
template <class V, class S>
GMW_HD GMW_INLINE void imq_ku2(V D, S inv_ref, S c0, S c1, V& k0, V& k1, V& u0, V& u1) {
  const V x = imq_group_x(D, inv_ref);
  const V xn = imq_near_x(x);
  const V t0 = xn + c0;
  const V t1 = xn + c1;
  const V r = imq_rcp(imq_far_select(x, x, t0 * t1));
  const V m0 = imq_far_select(x, r, t1 * r);
  const V m1 = imq_far_select(x, r, t0 * r);
  k0 = m0 * c0;
  k1 = m1 * c1;
  u0 = x * m0;
  u1 = x * m1;
}

// n = 1 (1 / (x + c0) directly: no product to overflow, x is finite).
template <class V, class S>
GMW_HD GMW_INLINE void imq_ku1(V D, S inv_ref, S c0, V& k0, V& u0) {
  const V x = imq_group_x(D, inv_ref);
  const V m0 = imq_rcp(x + c0);
  k0 = m0 * c0;
  u0 = x * m0;
}

// A value from its two accumulations (float64): K = sum w w k and U = sum w w (1 - k) over pairs of total
// weight W (exact, float64).  Rounding errors are proportional to the accumulated quantity, so the smaller
// of K and U is the accurate one; K = W - U then (no cancellation: U < W / 2).  NaN propagates (U < K false).
GMW_HD GMW_INLINE double imq_pick_value(double K, double U, double W) { return U < K ? W - U : K; }

// ---- cotangent-weighted sums (gradient path) ----

// phi += h k ;  psi += q k^2   for one bandwidth.
template <class V, class S>
GMW_HD GMW_INLINE void imq_phi_psi_acc(V k, S h, S q, V& phi, V& psi) {
  phi = phi + k * h;
  psi = psi + (k * q) * k;
}

// ---- one scale for all bandwidths, one bare reciprocal per bandwidth (the CUDA kernels) ----
//
// The CUDA kernels need no shared reciprocal, hence no grouping: every bandwidth uses x = D / R with ONE power of
// two R just above the largest C (x and c_s = C_s / R stay exact), so x, its cap and w x are formed once per pair
// for all bandwidths.  That holds while C_max / C_min <= kImqMaxScaleRatio (c_s >= 2^-41, every r_s = 1 / (c_s + x)
// <= 2^41 and every term of phi / psi a normal number); wider sets of bandwidths get one R_s per bandwidth (the
// kernel then forms x per bandwidth).
constexpr double kImqMaxScaleRatio = 0x1p40;

// Constants of one bandwidth: c = C / R, hc = h c, qr = -h c / R (see imq_band_acc), inv_ref = 1 / R.
template <class S>
struct ImqBand {
  S c, hc, qr, inv_ref;
};

// Host (or one device thread): the S bandwidths `bw` (> 0) and cotangents `h` (may be null) -> out[S]; returns
// true when every bandwidth shares one scale R (out[s].inv_ref all equal), false when each has its own.
template <class S>
GMW_HD inline bool imq_make_bands(const double* bw, const double* h, int num_bw, ImqBand<S>* out) {
  double lo = num_bw > 0 ? bw[0] : 1.0, hi = lo;
  for (int s = 1; s < num_bw; ++s) {
    lo = bw[s] < lo ? bw[s] : lo;
    hi = bw[s] > hi ? bw[s] : hi;
  }
  const bool one = hi <= kImqMaxScaleRatio * lo;
  for (int s = 0; s < num_bw; ++s) {
    int e = 0;
    (void)frexp(one ? hi : bw[s], &e);  // = f 2^e, f in [0.5, 1): R = 2^e
    const double R = ldexp(1.0, e);
    const double hs = h ? h[s] : 0.0;
    const double c = bw[s] / R;
    out[s].c = static_cast<S>(c);
    out[s].hc = static_cast<S>(hs * c);
    out[s].qr = static_cast<S>(-hs * c / R);
    out[s].inv_ref = static_cast<S>(1.0 / R);
  }
  return one;
}

// Reciprocal in one special-function-unit instruction: float on the device is rcp.approx.ftz.f32 alone (PTX:
// at most 1 ulp from 1 / p, no Newton step); double and the host divide.  The SIMT emulator
// (csrc/testing/cuda_emu.h) defines GMW_RCP_APPROX_MODEL to a pessimistic model of the device instruction
// (the correctly rounded reciprocal moved one ulp in a fixed direction: up to 1.5 ulp, all of one sign).
GMW_HD GMW_INLINE double imq_rcp_approx(double p) { return 1.0 / p; }
GMW_HD GMW_INLINE float imq_rcp_approx(float p) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(p));
  return r;
#elif defined(GMW_RCP_APPROX_MODEL)
  return GMW_RCP_APPROX_MODEL(p);
#else
  return 1.0f / p;
#endif
}

// ---- one reciprocal per bandwidth (the CUDA kernels, where the special-function unit has headroom) ----
//
// With x = D / R (exact: R is a power of two; imq_group_x caps it at far_x) and r_s = 1 / (c_s + x):
//   k_s = c_s r_s,   1 - k_s = x r_s,   h_s k_s = hc_s r_s,   q_s k_s^2 = qr_s r_s^2
// (hc_s = h_s c_s, qr_s = -h_s c_s / R: ImqBand).  So one reciprocal and a few multiply-adds per bandwidth
// accumulate the value sums a += w r (K_s = c_s a: scaled once per partial, not per pair) and b += (w x) r
// (U_s = b, the complement sum of imq_pick_value) and, for the gradients, phi and psi; k_s itself is never
// formed.  Every factor is positive and each term carries a few roundings of random sign, as in imq_ku3.
// Range: x <= far_x gives c_s + x <= far_x (rounded), r_s >= 1 / far_x, a normal number: D = inf adds
// ~1e-38 c_s w to K_s, exactly w to U_s and 0 to psi; NaN propagates.
// The reciprocal is imq_rcp_approx: one MUFU.RCP and six FP32 instructions per pair and bandwidth (values only:
// three) instead of eight (five): no Newton step.  Each r_s carries at most 1 ulp (device) instead of ~0.5 ulp,
// a relative error of <= 1.2e-7 per term, far inside the 1e-5 contract; the SIMT emulator checks the values and
// gradients with a biased 1.5-ulp model of it (csrc/testing/cuda_emu.h).
template <class V, class S, bool GRAD>
GMW_HD GMW_INLINE void imq_band_acc(V x, V w, V wx, S c, S hc, S qr, V& a, V& b, V& phi, V& psi) {
  const V r = imq_rcp_approx(x + c);
  a = a + w * r;
  b = b + wx * r;
  if (GRAD) {
    phi = phi + hc * r;
    psi = psi + (qr * r) * r;
  }
}

}  // namespace gmwae_fast
