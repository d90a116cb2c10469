// Runs the CUDA kernels of csrc/imq_mmd_cuda_kernels.cuh on the CPU (csrc/testing/cuda_emu.h) and checks values
// and gradients against a float64 brute force.  No torch, no GPU:
//
//   g++ -std=c++20 -O1 -pthread -Icsrc csrc/testing/imq_cuda_emu_test.cpp -o /tmp/imq_emu && /tmp/imq_emu
//
// tests/test_cpu_kernels.py builds and runs it (quick case list).  Exit status 0 when every case passes.
// The cases are chosen to exercise the index math: several panels per side with PS > 1 tiles per panel
// (small SM counts), partial last tiles, diagonal tiles, groups straddling tile borders, several coordinate
// chunks (d > 64 in float32, d > 32 in float64), empty columns, a large common offset, float32 and float64.
#include "cuda_emu.h"
#include "../imq_mmd_cuda_kernels.cuh"
#include "../philox.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace gmwae_fast;
using namespace gmwae_fast::imq_cuda;

namespace {

struct Case {
  const char* name;
  bool self;
  int64_t N, M, d;
  int64_t group;
  bool unbiased;
  int sms;  // sizes the gradient fold's grid only (the plan takes no device property)
  double offset;
  std::vector<double> bw;
  bool dbl;
  double budget = kSlotBudgetBytes;  // slot budget of the plan (small: several waves)
  double outlier = 0.0;              // != 0: row 0 of a is moved to this value in every coordinate
  int sms2 = 0;                      // != 0: the gradient op again with this SM count must give the same bits
  double conc = 0.0;                 // != 0: point 0 of a (and of b) carries this share of its side's total weight
  int tc = 0;  // tile pairs expected on the tensor-core route (float, 32 <= d <= 64): 0 none, 1 all, 2 some
};

bool g_allow_tensor_cores = true;  // false: the float kernels as on a device without the instruction

struct Outs {
  std::vector<double> vals, da, dwa, db, dwb;
};

Outs reference(const Case& c, const std::vector<double>& a, const std::vector<double>& wa, const std::vector<double>& b,
               const std::vector<double>& wb, const std::vector<double>& h) {
  const int S = int(c.bw.size());
  const int64_t N = c.N, M = c.self ? c.N : c.M, d = c.d;
  const std::vector<double>& B = c.self ? a : b;
  const std::vector<double>& WB = c.self ? wa : wb;
  Outs r;
  r.vals.assign(S, 0.0);
  r.da.assign(N * d, 0.0);
  r.dwa.assign(N, 0.0);
  r.db.assign(M * d, 0.0);
  r.dwb.assign(M, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < M; ++j) {
      if (c.self && c.unbiased && i / c.group == j / c.group) continue;
      double D = 0.0;
      for (int64_t k = 0; k < d; ++k) {
        const double t = a[i * d + k] - B[j * d + k];
        D += t * t;
      }
      double phi = 0.0, psi = 0.0;
      for (int s = 0; s < S; ++s) {
        const double C = c.bw[s];
        r.vals[s] += wa[i] * WB[j] * C / (C + D);
        phi += h[s] * C / (C + D);
        psi -= h[s] * C / ((C + D) * (C + D));
      }
      if (c.self) {  // ordered pairs: dL/dw_i = 2 sum_j w_j phi, dL/da_i = 4 w_i sum_j w_j psi (a_i - a_j)
        r.dwa[i] += 2.0 * WB[j] * phi;
        for (int64_t k = 0; k < d; ++k) r.da[i * d + k] += 4.0 * wa[i] * WB[j] * psi * (a[i * d + k] - B[j * d + k]);
      } else {
        r.dwa[i] += WB[j] * phi;
        r.dwb[j] += wa[i] * phi;
        for (int64_t k = 0; k < d; ++k) {
          const double g = 2.0 * wa[i] * WB[j] * psi * (a[i * d + k] - B[j * d + k]);
          r.da[i * d + k] += g;
          r.db[j * d + k] -= g;
        }
      }
    }
  }
  return r;
}

template <class T, bool SELF, bool GRAD>
Outs run_emulated(const Case& c, const std::vector<double>& a64, const std::vector<double>& wa64,
                  const std::vector<double>& b64, const std::vector<double>& wb64, const std::vector<double>& h,
                  bool b_grad = true, int sms = -1, bool verbose = true) {
  if (sms < 0) sms = c.sms;
  const int S = int(c.bw.size());
  const int64_t M = SELF ? c.N : c.M;
  std::vector<T> a(a64.begin(), a64.end()), wa(wa64.begin(), wa64.end());
  std::vector<T> b(b64.begin(), b64.end()), wb(wb64.begin(), wb64.end());
  TileArgs<T> A;
  A.a = a.data();
  A.wa = wa.data();
  A.b = SELF ? a.data() : b.data();
  A.wb = SELF ? wa.data() : wb.data();
  A.bw = c.bw.data();
  A.h = GRAD ? h.data() : nullptr;
  A.N = c.N;
  A.M = M;
  A.d = c.d;
  A.S = S;
  A.group = c.group;
  A.unbiased = c.unbiased;
  A.b_grad = SELF || b_grad;
  A.tensor_cores = tensor_core_route(c.d, sizeof(T), g_allow_tensor_cores);  // as the host does
  A.vec4 = sizeof(T) == 4 && c.d % 4 == 0 && reinterpret_cast<uintptr_t>(A.a) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(A.b) % 16 == 0;
  const TilePlan plan = plan_tiles(A, SELF, GRAD, c.budget);
  const std::vector<Wave> waves = plan_waves(A, SELF, plan);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> si, sj;
  std::vector<double> acc;
  A.slot_i = nullptr;
  A.slot_j = nullptr;
  if (GRAD) {
    int64_t ni = 0, nj = 0;
    slot_sizes(A, plan, ni, nj);
    si.assign(ni, nan);  // like at::empty: a read before the first store would poison the result
    sj.assign(nj, nan);
    A.slot_i = si.data();
    A.slot_j = sj.data();
    if (waves.size() > 1) acc.assign(size_t((c.N + (SELF ? 0 : M)) * (c.d + 1)), 0.0);
  }
  std::vector<double> block_vals(size_t(plan.wave_blocks) * 2 * S, std::numeric_limits<double>::quiet_NaN());
  std::vector<double> vacc(2 * S, std::numeric_limits<double>::quiet_NaN());
  A.block_vals = block_vals.data();
  if (verbose) {
    std::printf("    %s %s grad=%d%s: panels %dx%d (tiles/panel %d,%d), %lld blocks in %zu wave(s)\n",
                SELF ? "self" : "cross", sizeof(T) == 4 ? "f32" : "f64", int(GRAD), A.b_grad ? "" : " (no column side)",
                A.PI, A.PJ, A.PSI, A.PSJ, (long long)plan.blocks, waves.size());
  }
  Outs r;
  r.vals.assign(S, std::numeric_limits<double>::quiet_NaN());
  const bool diag = SELF && !c.unbiased;
  // Like the host: without b_grad db, dwb are allocated as zeros and the kernels must leave them alone.
  const T bfill = A.b_grad ? nan : T(0);
  std::vector<T> da(c.N * c.d, nan), dwa(c.N, nan), db(M * c.d, bfill), dwb(M, bfill);
  for (const Wave& w : waves) {
    A.block0 = w.b0;
    const int64_t nb = w.b1 - w.b0;
    std::fill(block_vals.begin(), block_vals.end(), std::numeric_limits<double>::quiet_NaN());
    if (A.tensor_cores)
      gmw_emu::launch(imq_tiles_kernel<T, SELF, GRAD, true>, unsigned(nb), unsigned(kThreads),
                      smem_layout<T>(S, GRAD, true).bytes, A);
    else
      gmw_emu::launch(imq_tiles_kernel<T, SELF, GRAD>, unsigned(nb), unsigned(kThreads), smem_layout<T>(S, GRAD).bytes,
                      A);
    gmw_emu::launch(imq_values_finalize_kernel<T>, 1u, 256u, 0, (const double*)block_vals.data(), int(nb), S, SELF,
                    c.unbiased, c.group, (const T*)A.wa, c.N, (const T*)A.wb, M, vacc.data(), w.first, w.last,
                    r.vals.data());
    if (GRAD) {
      const int fb = grad_finalize_blocks(w, c.d, sms);
      gmw_emu::launch(imq_grad_finalize_kernel<T>, unsigned(fb), 256u, 0, A, w, SELF, SELF ? 4.0 : 2.0,
                      SELF ? 2.0 : 1.0, diag, acc.empty() ? (double*)nullptr : acc.data(), da.data(), dwa.data(),
                      SELF ? (T*)nullptr : db.data(), SELF ? (T*)nullptr : dwb.data());
    }
  }
  if (GRAD) {
    r.da.assign(da.begin(), da.end());
    r.dwa.assign(dwa.begin(), dwa.end());
    if (!SELF) {
      r.db.assign(db.begin(), db.end());
      r.dwb.assign(dwb.begin(), dwb.end());
    }
  }
  return r;
}

// max |got - ref| / max |ref| (NaN counts as a failure).
double rel_err(const std::vector<double>& got, const std::vector<double>& ref) {
  if (got.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double scale = 0.0, err = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) scale = std::max(scale, std::fabs(ref[i]));
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::fabs(got[i] - ref[i]);
    if (!(e == e)) return std::numeric_limits<double>::infinity();
    err = std::max(err, e);
  }
  return scale > 0 ? err / scale : err;
}

// max_s |got_s - ref_s| / |ref_s|.
double rel_err_each(const std::vector<double>& got, const std::vector<double>& ref) {
  double err = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::fabs(got[i] - ref[i]) / std::max(std::fabs(ref[i]), 1e-300);
    if (!(e == e)) return std::numeric_limits<double>::infinity();
    err = std::max(err, e);
  }
  return err;
}

template <class T, bool SELF>
bool check_case(const Case& c) {
  std::mt19937_64 rng(1234 + c.N * 7 + c.M * 13 + c.d);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.2, 1.2);
  const int64_t M = SELF ? c.N : c.M;
  std::vector<double> a(c.N * c.d), b(M * c.d), wa(c.N), wb(M), h(c.bw.size());
  for (auto& x : a) x = c.offset + nd(rng);
  if (c.outlier != 0.0) {
    for (int64_t k = 0; k < c.d; ++k) a[k] = c.outlier;
  }
  for (auto& x : b) x = c.offset + 0.3 + 1.2 * nd(rng);
  double sa = 0, sb = 0;
  for (auto& x : wa) sa += (x = ud(rng));
  for (auto& x : wb) sb += (x = ud(rng));
  for (auto& x : wa) x /= sa;
  for (auto& x : wb) x /= sb;
  if (c.conc != 0.0) {  // concentrated weights: the other points share 1 - conc
    for (auto& x : wa) x *= (1.0 - c.conc) / (1.0 - wa[0]);
    for (auto& x : wb) x *= (1.0 - c.conc) / (1.0 - wb[0]);
    wa[0] = c.conc;
    wb[0] = c.conc;
  }
  if (!SELF && M > 2) wb[1] = 0.0;  // a zero weight still has a weight gradient
  for (auto& x : h) x = 2.0 * nd(rng);
  // Round the inputs to T first so that the reference sees the same numbers.
  auto round_t = [](std::vector<double>& v) {
    for (auto& x : v) x = double(T(x));
  };
  round_t(a);
  round_t(b);
  round_t(wa);
  round_t(wb);

  const Outs ref = reference(c, a, wa, b, wb, h);
  gmw_emu::tc_tiles = 0;
  gmw_emu::all_tiles = 0;
  const Outs got = run_emulated<T, SELF, true>(c, a, wa, b, wb, h);
  const long long tc_tiles = gmw_emu::tc_tiles, all_tiles = gmw_emu::all_tiles;
  const Outs val = run_emulated<T, SELF, false>(c, a, wa, b, wb, h);
  const bool f64 = sizeof(T) == 8;
  const double tv = f64 ? 1e-12 : 2e-6, tg = f64 ? 1e-11 : 2e-5;
  const double e_val = rel_err_each(got.vals, ref.vals), e_val2 = rel_err_each(val.vals, ref.vals);
  const double e_da = rel_err(got.da, ref.da), e_dwa = rel_err(got.dwa, ref.dwa);
  double e_db = 0.0, e_dwb = 0.0;
  if (!SELF) {
    e_db = rel_err(got.db, ref.db);
    e_dwb = rel_err(got.dwb, ref.dwb);
  }
  const bool route_ok =
      c.tc == 0 ? tc_tiles == 0 : (c.tc == 1 ? tc_tiles == all_tiles : tc_tiles > 0 && tc_tiles < all_tiles);
  bool ok = e_val <= tv && e_val2 <= tv && e_da <= tg && e_dwa <= tg && e_db <= tg && e_dwb <= tg && route_ok;
  std::string name = c.name;
  if (c.outlier != 0.0) {
    char buf[32];
    std::snprintf(buf, sizeof buf, " %.0e", c.outlier);
    name += buf;
  }
  if (c.conc != 0.0) {
    char buf[48];
    std::snprintf(buf, sizeof buf, " weight %.4g on point 0", c.conc);
    name += buf;
  }
  std::printf("  %-44s %s  values %.1e/%.1e  da %.1e  dwa %.1e  db %.1e  dwb %.1e  tensor-core tiles %lld/%lld\n",
              name.c_str(), ok ? "ok  " : "FAIL", e_val, e_val2, e_da, e_dwa, e_db, e_dwb, tc_tiles, all_tiles);
  if (c.sms2 != 0) {
    // The plan takes no device property: another SM count gives the same bits.
    const Outs other = run_emulated<T, SELF, true>(c, a, wa, b, wb, h, true, c.sms2, false);
    const bool same = other.vals == got.vals && other.da == got.da && other.dwa == got.dwa && other.db == got.db &&
                      other.dwb == got.dwb;
    std::printf("  %-44s %s  bitwise equal with %d SMs instead of %d: %d\n", "  ... another SM count",
                same ? "ok  " : "FAIL", c.sms2, c.sms, int(same));
    ok = ok && same;
  }
  if (!SELF) {
    // b_grad = false: the same values and row side, bit for bit (same plan, same order); db, dwb untouched zeros.
    const Outs row = run_emulated<T, SELF, true>(c, a, wa, b, wb, h, false);
    const bool same = row.vals == got.vals && row.da == got.da && row.dwa == got.dwa;
    bool zeros = row.db.size() == size_t(M * c.d) && row.dwb.size() == size_t(M);
    for (double x : row.db) zeros = zeros && x == 0.0;
    for (double x : row.dwb) zeros = zeros && x == 0.0;
    std::printf("  %-44s %s  row side identical %d, db/dwb zero %d\n", "  ... without the column side",
                same && zeros ? "ok  " : "FAIL", int(same), int(zeros));
    ok = ok && same && zeros;
  }
  return ok;
}

// MMD^2 of float inputs from the emulated value kernels (self x, self y, cross; unbiased, weights summing to 1)
// against the same formula from the float64 brute force.  x: a tight cluster N(0, spread^2 I) whose row 0 is moved
// to `far` in every coordinate with weight 0 (legal, and the centre of the tensor-core route's first tile); y: the
// cluster shifted by `shift`.  The near pairs' 1 - k then carries the MMD^2: a distance error that is absolute
// (the expanded form of the tensor-core route) shows here, not in the per-bandwidth sums.
bool check_mmd(const char* name, int64_t N, int64_t M, int64_t d, double spread, double shift, double far,
               const std::vector<double>& bw, int tc) {
  std::mt19937_64 rng(77 + N + d);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> a(N * d), b(M * d), wa(N, 1.0 / double(N - 1)), wb(M, 1.0 / double(M));
  for (auto& x : a) x = double(float(spread * nd(rng)));
  for (auto& x : b) x = double(float(shift + spread * nd(rng)));
  for (int64_t k = 0; k < d; ++k) a[k] = far;
  wa[0] = 0.0;
  const std::vector<double> h(bw.size(), 1.0);
  auto mmd = [&](const std::vector<double>& sx, const std::vector<double>& sy, const std::vector<double>& cr) {
    double sw2a = 0.0, sw2b = 0.0, total = 0.0;
    for (double w : wa) sw2a += w * w;
    for (double w : wb) sw2b += w * w;
    for (size_t s = 0; s < bw.size(); ++s) total += sx[s] / (1.0 - sw2a) + sy[s] / (1.0 - sw2b) - 2.0 * cr[s];
    return total;
  };
  const Case cx = {name, true, N, 0, d, 1, true, 1, 0.0, bw, false};
  const Case cy = {name, true, M, 0, d, 1, true, 1, 0.0, bw, false};
  const Case cxy = {name, false, N, M, d, 1, false, 1, 0.0, bw, false};
  const double ref = mmd(reference(cx, a, wa, a, wa, h).vals, reference(cy, b, wb, b, wb, h).vals,
                         reference(cxy, a, wa, b, wb, h).vals);
  gmw_emu::tc_tiles = 0;
  gmw_emu::all_tiles = 0;
  const double got = mmd(run_emulated<float, true, false>(cx, a, wa, a, wa, h, true, -1, false).vals,
                         run_emulated<float, true, false>(cy, b, wb, b, wb, h, true, -1, false).vals,
                         run_emulated<float, false, false>(cxy, a, wa, b, wb, h, true, -1, false).vals);
  const long long tc_tiles = gmw_emu::tc_tiles, all_tiles = gmw_emu::all_tiles;
  g_allow_tensor_cores = false;
  const double simt = mmd(run_emulated<float, true, false>(cx, a, wa, a, wa, h, true, -1, false).vals,
                          run_emulated<float, true, false>(cy, b, wb, b, wb, h, true, -1, false).vals,
                          run_emulated<float, false, false>(cxy, a, wa, b, wb, h, true, -1, false).vals);
  g_allow_tensor_cores = true;
  // U: the complement sums sum w w (1 - k) of the three terms, the scale the float32 bound is stated in
  auto usum = [&](const std::vector<double>& p, const std::vector<double>& wp, int64_t np, const std::vector<double>& q,
                  const std::vector<double>& wq, int64_t nq, bool self) {
    double u = 0.0;
    for (int64_t i = 0; i < np; ++i)
      for (int64_t j = 0; j < nq; ++j) {
        if (self && i == j) continue;
        double D = 0.0;
        for (int64_t k = 0; k < d; ++k) D += (p[i * d + k] - q[j * d + k]) * (p[i * d + k] - q[j * d + k]);
        for (double C : bw) u += wp[i] * wq[j] * D / (C + D);
      }
    return u;
  };
  double sw2a = 0.0, sw2b = 0.0;
  for (double w : wa) sw2a += w * w;
  for (double w : wb) sw2b += w * w;
  const double U = usum(a, wa, N, a, wa, N, true) / (1.0 - sw2a) + usum(b, wb, M, b, wb, M, true) / (1.0 - sw2b) +
                   2.0 * usum(a, wa, N, b, wb, M, false);
  const double err = std::fabs(got - ref), err_simt = std::fabs(simt - ref);
  const bool route_ok =
      tc == 0 ? tc_tiles == 0 : (tc == 1 ? tc_tiles == all_tiles : tc_tiles > 0 && tc_tiles < all_tiles);
  const bool ok = err <= 1e-5 * std::fabs(ref) + 8.0 * 0x1p-24 * U && route_ok;
  std::printf(
      "  %-44s %s  MMD^2 %.3e U %.2e  error/|MMD^2| %.1e (CUDA cores %.1e), error/(u U) %.2f (%.2f)  "
      "tensor-core tiles %lld/%lld\n",
      name, ok ? "ok  " : "FAIL", ref, U, err / std::fabs(ref), err_simt / std::fabs(ref), err / (0x1p-24 * U),
      err_simt / (0x1p-24 * U), tc_tiles, all_tiles);
  return ok;
}

bool run(const Case& c) {
  if (c.self) return c.dbl ? check_case<double, true>(c) : check_case<float, true>(c);
  return c.dbl ? check_case<double, false>(c) : check_case<float, false>(c);
}

}  // namespace

// One warp: the m16n8k8 model (sm_90's single instruction, from its documented fragments) against the kernels'
// sm_80 form, four m8n8k4 (dmma16x8x8_as_884): the same bits, and both equal to a plain float64 product.
void mma_check_kernel(const double* a, const double* b, double* out16, double* out884) {
  const int l = threadIdx.x;
  const double fa[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]}, fb[2] = {b[2 * l], b[2 * l + 1]};
  double c[4] = {0.5, -0.25, 1.0, 2.0}, c884[4] = {0.5, -0.25, 1.0, 2.0};
  dmma16x8x8(c, fa, fb);
  dmma16x8x8_as_884(c884, fa, fb);
  for (int i = 0; i < 4; ++i) {
    out16[4 * l + i] = c[i];
    out884[4 * l + i] = c884[i];
  }
}

bool check_mma() {
  std::mt19937_64 rng(99);
  std::uniform_int_distribution<int> small(-8, 8);  // small integers: every sum exact, any order
  std::vector<double> a(128), b(64), o16(128), o884(128);
  for (auto& x : a) x = small(rng);
  for (auto& x : b) x = small(rng);
  gmw_emu::launch(mma_check_kernel, 1u, 32u, 0, (const double*)a.data(), (const double*)b.data(), o16.data(),
                  o884.data());
  // The documented layout, spelled out: A[row][k] and B[k][col] from their lanes, C[row][col] on lane 4 g + t.
  bool ok = o16 == o884;
  const double c0[4] = {0.5, -0.25, 1.0, 2.0};
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 2; ++e) {
        double ref = c0[2 * h + e];
        for (int k = 0; k < 8; ++k) {
          const int row = g + 8 * h, col = 2 * t + e;
          ref += a[4 * (4 * (row % 8) + k % 4) + (row >= 8) + 2 * (k >= 4)] * b[2 * (4 * col + k % 4) + (k >= 4)];
        }
        ok = ok && o16[4 * l + 2 * h + e] == ref;
      }
  }
  std::printf("  %-44s %s  m16n8k8 model == four m8n8k4 == float64 product: %d\n", "float64 mma fragments",
              ok ? "ok  " : "FAIL", int(ok));
  return ok;
}

// csrc/philox.h's uniform: (0, 1], the top value exactly 1.0 (log 0: a (0, 0) pair of normals, never NaN).
bool check_uniform_range() {
  using namespace gmwae_fast::philox;
  float n0 = 1.0f, n1 = 1.0f;
  box_muller(uniform_open(0xFFFFFFFFu), 0.3f, n0, n1);
  const bool ok = uniform_open(0xFFFFFFFFu) == 1.0f && uniform_open(0xFFFFFEFFu) < 1.0f &&
                  uniform_open(0u) == 0x1p-25f && uniform_open(0x7FFFFFFFu) == 0.5f - 0x1p-25f && n0 == 0.0f &&
                  n1 == 0.0f;
  std::printf("  %-44s %s  top %.9g, bottom %.9g\n", "philox uniform_open range", ok ? "ok  " : "FAIL",
              double(uniform_open(0xFFFFFFFFu)), double(uniform_open(0u)));
  return ok;
}

int main(int argc, char** argv) {
  // Arguments: [quick | approx] [rcp=up|down|exact]: the quick case list, or the cases most sensitive to the
  // reciprocal; the emulated rcp.approx (gmw_emu::rcp_approx: one ulp up, one ulp down, exact; default up).
  bool quick = false, approx = false, mmd_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "quick") {
      quick = true;
    } else if (arg == "approx") {
      approx = true;
    } else if (arg == "mmd") {
      mmd_only = true;
    } else if (arg == "rcp=up" || arg == "rcp=down" || arg == "rcp=exact") {
      gmw_emu::rcp_bias = arg == "rcp=up" ? 1 : (arg == "rcp=down" ? -1 : 0);
    } else {
      std::fprintf(stderr, "unknown argument %s (expected quick, approx, rcp=up, rcp=down or rcp=exact)\n", argv[i]);
      return 2;
    }
  }
  std::printf("emulated rcp.approx: %s\n",
              gmw_emu::rcp_bias > 0 ? "one ulp up" : (gmw_emu::rcp_bias < 0 ? "one ulp down" : "exact"));
  const std::vector<double> bw7 = {0.02, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0};  // groups 3, 3, 1
  const std::vector<double> bw5 = {1e-3, 50.0, 1e5, 3.0, 4.0};            // isolated bandwidths: groups 1, 1, 1, 2
  const std::vector<double> bw3 = {1e-8, 0.5, 1e5};  // ratio 1e13 > kImqMaxScaleRatio: one scale per bandwidth
  auto waves = [](Case c, double budget) {
    c.budget = budget;
    return c;
  };
  auto outlier = [](Case c, double x) {
    c.outlier = x;
    return c;
  };
  auto sms2 = [](Case c, int s) {
    c.sms2 = s;
    return c;
  };
  auto conc = [](Case c, double w) {
    c.conc = w;
    return c;
  };
  auto tc = [](Case c, int route) {
    c.tc = route;
    return c;
  };
  const Case self40 = {"self f32 N=40 d=5 outlier", true, 40, 0, 5, 1, true, 1, 0.0, bw7, false};
  const Case cross40 = {"cross f32 N=40 M=30 d=5 outlier", false, 40, 30, 5, 1, false, 1, 0.0, bw7, false};
  std::vector<Case> cases = {
      // name, self, N, M, d, group, unbiased, sms, offset, bw, double
      {"self f32 N=300 d=10 unbiased (5 panels)", true, 300, 0, 10, 1, true, 1, 0.0, bw7, false},
      {"self f64 N=195 G=3 d=40 (2 chunks)", true, 195, 0, 40, 3, true, 1, 0.0, bw7, true},
      {"cross f32 N=150 M=260 d=3 (3x5 panels)", false, 150, 260, 3, 1, false, 1, 0.0, bw7, false},
      {"self f32 N=130 d=70 biased (2 chunks)", true, 130, 0, 70, 1, false, 2, 0.0, bw5, false},
      {"cross f64 N=70 M=1 d=17", false, 70, 1, 17, 1, false, 4, 0.0, bw5, true},
      {"self f32 N=100 d=5 offset 1000", true, 100, 0, 5, 1, true, 1, 1000.0, bw7, false},
      {"self f32 N=6 d=0 biased", true, 6, 0, 0, 1, false, 1, 0.0, bw7, false},
      tc({"cross f32 N=1 M=129 d=64", false, 1, 129, 64, 1, false, 1, 0.0, bw7, false}, 1),
      {"self f32 N=300 G=100 d=7 unbiased", true, 300, 0, 7, 100, true, 1, 0.0, bw7, false},
      // several waves (tiny slot budget): chunks of long grid rows, packs of short ones, float64 running sums
      sms2(waves({"self f32 N=300 d=10 unbiased, 7 waves", true, 300, 0, 10, 1, true, 1, 0.0, bw7, false}, 2e4), 5),
      waves({"self f64 N=195 G=3 d=40 biased, waves", true, 195, 0, 40, 3, false, 1, 0.0, bw7, true}, 1e5),
      sms2(waves({"cross f32 N=150 M=260 d=3, waves", false, 150, 260, 3, 1, false, 3, 0.0, bw7, false}, 5e3), 132),
      // one far outlier (row 0): the other points' gradients must not feel it (issue: psi frozen by a clamp)
      outlier(self40, 1e6),
      outlier(self40, 1e23),
      outlier(self40, 1e30),
      outlier(self40, 3e38),
      outlier(self40, -3e38),
      outlier(cross40, 1e30),
      outlier(cross40, -3e38),
      outlier({"self f64 N=40 d=5 outlier", true, 40, 0, 5, 1, true, 1, 0.0, bw7, true}, 1e200),
      // concentrated weights: nearly all the mass on one point (the other pairs' terms are ~1e-6 of the total)
      conc({"self f32 N=90 d=6 biased", true, 90, 0, 6, 1, false, 1, 0.0, bw7, false}, 0.999),
      conc({"cross f32 N=70 M=90 d=6", false, 70, 90, 6, 1, false, 1, 0.0, bw5, false}, 0.999),
      // bandwidths too far apart for one scale: the kernels' per-bandwidth-scale path
      {"cross f32 N=70 M=90 d=4 bw 1e-8..1e5", false, 70, 90, 4, 1, false, 1, 0.0, bw3, false},
      {"self f32 N=100 d=4 bw 1e-8..1e5 unbiased", true, 100, 0, 4, 1, true, 1, 0.0, bw3, false},
      // the tensor-core route (float, 32 <= d <= 64): float64 mma on centred tiles where the error gate allows
      tc({"self f32 N=200 d=64 biased (tensor cores)", true, 200, 0, 64, 1, false, 1, 0.0, bw7, false}, 1),
      tc({"cross f32 N=150 M=97 d=48 (tensor cores)", false, 150, 97, 48, 1, false, 1, 0.0, bw7, false}, 1),
      tc({"self f32 N=130 G=5 d=33 unbiased", true, 130, 0, 33, 5, true, 1, 0.0, bw7, false}, 1),
      tc({"self f32 N=100 d=40 offset 1000", true, 100, 0, 40, 1, true, 1, 1000.0, bw7, false}, 1),
      tc(sms2(waves({"self f32 N=200 d=64 unbiased, waves", true, 200, 0, 64, 1, true, 1, 0.0, bw7, false}, 4e4), 7),
         1),
      // a far outlier leaves its tiles on the CUDA cores (gate), the others on tensor cores
      tc(outlier({"self f32 N=100 d=40 outlier", true, 100, 0, 40, 1, false, 1, 0.0, bw7, false}, 1e6), 2),
      tc(outlier({"cross f32 N=100 M=70 d=64 outlier", false, 100, 70, 64, 1, false, 1, 0.0, bw7, false}, -3e38), 2),
      tc(conc({"cross f32 N=70 M=90 d=64", false, 70, 90, 64, 1, false, 1, 0.0, bw7, false}, 0.999), 1),
      // a bandwidth of 1e-8: the gate keeps every tile on the CUDA cores
      {"cross f32 N=70 M=90 d=40 bw 1e-8..1e5", false, 70, 90, 40, 1, false, 1, 0.0, bw3, false},
  };
  if (quick) {
    cases = {cases[0],  cases[1],  cases[2],  cases[3],  cases[6],  cases[7],  cases[8],  cases[9],  cases[10],
             cases[11], cases[14], cases[15], cases[17], cases[19], cases[20], cases[21], cases[22], cases[23],
             cases[24], cases[25], cases[26], cases[27], cases[29], cases[30], cases[32]};
  } else if (approx) {  // the cases most sensitive to the reciprocal's error, for both directions of its bias
    cases = {cases[0],  cases[2],  cases[3],  cases[14], cases[17], cases[20],
             cases[21], cases[22], cases[23], cases[24], cases[30], cases[31]};
  }
  if (mmd_only) cases.clear();
  bool ok = check_uniform_range();
  ok = check_mma() && ok;
  for (const Case& c : cases) ok = run(c) && ok;
  // MMD^2 level: a far row of weight 0 at the head of a tile of near pairs (the tensor-core route's centre)
  std::vector<double> wae64;
  for (double s : {0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0}) wae64.push_back(2.0 * 64 * s);
  // (the tensor-core route before the direct recomputation of unresolved pairs: up to 1e3 u U, 16% of MMD^2)
  struct MmdCase {
    double spread, shift, far;
    int tc;
  };
  std::vector<MmdCase> mmd_cases = {
      {1e-4, 1e-5, 0.0, 1}, {1e-4, 1e-5, 70.0, 1}, {3e-5, 0.0, 70.0, 1}, {3e-5, 1e-5, 30.0, 1}, {1e-4, 0.0, 3000.0, 2}};
  if (!quick && !approx) {
    for (double spread : {1e-4, 3e-5})
      for (double shift : {3e-5, 1e-5, 0.0})
        for (double far : {0.0, 30.0, 70.0}) mmd_cases.push_back({spread, shift, far, 1});
  }
  if (approx) mmd_cases.clear();
  for (const MmdCase& m : mmd_cases) {
    char nm[96];
    std::snprintf(nm, sizeof nm, "MMD^2 f32 d=64 s=%.0e shift=%.0e far row %.0f", m.spread, m.shift, m.far);
    ok = check_mmd(nm, 100, 90, 64, m.spread, m.shift, m.far, wae64, m.tc) && ok;
  }
  std::printf(ok ? "ALL PASSED\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
