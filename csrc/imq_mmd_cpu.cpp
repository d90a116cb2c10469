// Fused CPU kernels of the imq_mmd ops (schemas in csrc/ops.cpp, contract in docs/ARCHITECTURE.md).
//
// * One pass over the pairs computes the S kernel values and, for the *_grad ops, every gradient; nothing of
//   size N x M is materialised.  Self terms visit each unordered pair once (j > i, outside i's group when
//   unbiased); the i == j terms of the biased estimator are added analytically (k_s(0) = 1, phi(0) = sum h).
// * Per-pair math: csrc/imq_math.h (shared with the CUDA kernels), float32 for float32/float16/bfloat16 input
//   (half types are converted to float32 once, O(N d) memory), float64 for float64 input.
// * Vectorisation: the inner kernels (csrc/imq_mmd_cpu_kernel.h) are compiled three times from the same
//   source: generic (baseline ISA, 16-byte vectors), AVX2+FMA (32-byte) and AVX-512F (64-byte), the last two
//   under `#pragma GCC target`, so the translation unit itself is compiled for the baseline ISA and the binary
//   runs on any x86-64 CPU.  The variant is chosen once at run time from CPUID (`__builtin_cpu_supports`);
//   the environment variable GMWAE_FAST_CPU_ISA=generic|avx2|avx512 caps the choice (testing, debugging).
//   Non-GCC compilers and non-x86 targets get the generic variant only.
// * Threads: K = min(4 x at::get_num_threads(), work units) partitions (fewer for gradients if their buffers
//   would pass 256 MB, but at least one per thread), handed out dynamically to the threads of one
//   at::parallel_for region.  Each partition owns fixed work units (row blocks; for self terms pairs of row
//   blocks {u, last - u} so that the triangle is balanced), its own float64 value partials and, for gradients,
//   its own float64 gradient buffer of (N [+ M]) x (d + 1) entries (O((N + M) d) memory).  Buffers are summed
//   in partition order, so results are bitwise reproducible run to run for a given thread count (K follows
//   the thread count and the problem size, never the scheduling).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "imq_math.h"
#include "imq_mmd_common.h"

namespace gmwae_fast {

// Rows per row block (the column-side float32 lanes sum at most this many terms).
constexpr int64_t kImqRowBlock = 16;
// Column blocks between two float64 flushes of the row-side gradient lanes.
constexpr int64_t kImqRowFlush = 8;
// Work partitions per thread, and the memory the per-partition gradient buffers may take beyond one per thread.
constexpr int64_t kImqPartitionsPerThread = 4;
constexpr double kImqGradBufferBytes = 256.0 * 1024 * 1024;

// Arguments of the inner kernels, all in the compute type T (float or double).
template <class T>
struct ImqCpuArgs {
  const T* a;  // N x d, row-major: the rows i
  const T* wa;  // N
  const T* bt;  // d x ldb: the columns j, transposed and zero padded (self: a itself)
  const T* wbp;  // ldb column weights, zero padded
  int64_t N, M, ldb, d;
  int64_t group;  // self only
  bool unbiased;  // self only
  const ImqGroup<T>* groups;
  int ngroups;
  int S;  // bandwidths
  int64_t brow_off;  // first row of the column points in the gradient buffer (self 0, cross N)
  double fa, fw;  // gradient factors: self 4 and 2, cross 2 and 1
};

// Per-partition outputs and scratch.
struct ImqCpuPart {
  double* vals;  // 2 S x W float64 lane partials: sums of w w k, then of w w (1 - k)
  double* grad;  // rows x (d + 1) float64 (point gradients, then the weight gradient), null for value ops
  void* scratch;
};

}  // namespace gmwae_fast

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// ---- instruction-set variants of the inner kernels ----
namespace gmwae_fast {

#define GMW_CPU_NS isa_generic
#define GMW_VBYTES 16
#define GMW_NC 8
#include "imq_mmd_cpu_kernel.h"
#undef GMW_CPU_NS
#undef GMW_VBYTES
#undef GMW_NC

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define GMW_HAVE_X86_VARIANTS 1

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define GMW_CPU_NS isa_avx2
#define GMW_VBYTES 32
#define GMW_NC 8
#include "imq_mmd_cpu_kernel.h"
#undef GMW_CPU_NS
#undef GMW_VBYTES
#undef GMW_NC
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define GMW_CPU_NS isa_avx512
#define GMW_VBYTES 64
#define GMW_NC 4
#include "imq_mmd_cpu_kernel.h"
#undef GMW_CPU_NS
#undef GMW_VBYTES
#undef GMW_NC
#pragma GCC pop_options

#endif

}  // namespace gmwae_fast

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

namespace gmwae_fast {
namespace {

enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

CpuIsa detect_isa() {
  CpuIsa best = CpuIsa::kGeneric;
#if defined(GMW_HAVE_X86_VARIANTS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::kAvx2;
  if (best == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f")) best = CpuIsa::kAvx512;
#endif
  if (const char* env = std::getenv("GMWAE_FAST_CPU_ISA")) {
    const std::string v(env);
    CpuIsa cap = best;
    if (v == "generic" || v == "default") cap = CpuIsa::kGeneric;
    else if (v == "avx2") cap = CpuIsa::kAvx2;
    else if (v == "avx512") cap = CpuIsa::kAvx512;
    if (int(cap) < int(best)) best = cap;
  }
  return best;
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_isa();
  return isa;
}

template <class T>
struct IsaFns {
  size_t (*scratch_bytes)(int64_t, int);
  int (*lanes)();
  int (*col_block)();
  void (*self_val)(const ImqCpuArgs<T>&, int64_t, int64_t, const ImqCpuPart&);
  void (*self_grad)(const ImqCpuArgs<T>&, int64_t, int64_t, const ImqCpuPart&);
  void (*cross_val)(const ImqCpuArgs<T>&, int64_t, int64_t, const ImqCpuPart&);
  void (*cross_grad)(const ImqCpuArgs<T>&, int64_t, int64_t, const ImqCpuPart&);
  void (*cross_grad_rows)(const ImqCpuArgs<T>&, int64_t, int64_t, const ImqCpuPart&);  // no column side
};

#define GMW_ISA_FNS(NS, T)                                                                              \
  IsaFns<T> {                                                                                           \
    &NS::scratch_bytes<T>, &NS::lanes<T>, &NS::col_block<T>, &NS::run_rows<T, true, false>,            \
        &NS::run_rows<T, true, true>, &NS::run_rows<T, false, false>, &NS::run_rows<T, false, true>,   \
        &NS::run_rows<T, false, true, false>                                                            \
  }

template <class T>
IsaFns<T> isa_fns() {
#if defined(GMW_HAVE_X86_VARIANTS)
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return GMW_ISA_FNS(isa_avx512, T);
    case CpuIsa::kAvx2:
      return GMW_ISA_FNS(isa_avx2, T);
    default:
      break;
  }
#endif
  return GMW_ISA_FNS(isa_generic, T);
}

// bw / h as float64 host vectors (validated).
std::vector<double> host_doubles(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// The core: values (S doubles) and, when grad, the (rows x (d + 1)) float64 gradient buffer.
//   a: N x d and b: M x d in the compute type T (contiguous); b undefined for self.
//   b_grad (cross only): also the gradients of the column points b (rows = N + M), else rows = N.
template <class T>
void imq_cpu_run(bool self, bool grad, bool b_grad, const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b,
                 const at::Tensor& wb, const std::vector<double>& bw, const std::vector<double>* h,
                 int64_t group, bool unbiased, std::vector<double>& vals_out, at::Tensor* grad_out) {
  const IsaFns<T> fns = isa_fns<T>();
  const int64_t N = a.size(0);
  const int64_t d = a.size(1);
  const at::Tensor& bb = self ? a : b;
  const at::Tensor& wbb = self ? wa : wb;
  const int64_t M = bb.size(0);
  const int S = int(bw.size());
  const int64_t rows = (self || !b_grad) ? N : N + M;
  const auto opts = a.options().dtype(at::kDouble);

  vals_out.assign(size_t(S), 0.0);
  if (grad) *grad_out = at::zeros({rows, d + 1}, opts);
  if (N == 0 || M == 0 || S == 0) return;

  std::vector<ImqGroup<T>> groups(static_cast<size_t>(S));
  const int ng = imq_make_groups<T>(bw.data(), h ? h->data() : nullptr, S, groups.data());

  // Transposed, zero-padded columns and their weights.
  const int64_t JB = fns.col_block();
  const int64_t ldb = (M + JB - 1) / JB * JB;
  at::Tensor bt = at::zeros({std::max<int64_t>(d, 1), ldb}, a.options());
  if (d > 0) bt.narrow(1, 0, M).copy_(bb.t());
  at::Tensor wbp = at::zeros({ldb}, a.options());
  wbp.narrow(0, 0, M).copy_(wbb);

  ImqCpuArgs<T> A;
  A.a = a.data_ptr<T>();
  A.wa = wa.data_ptr<T>();
  A.bt = bt.data_ptr<T>();
  A.wbp = wbp.data_ptr<T>();
  A.N = N;
  A.M = M;
  A.ldb = ldb;
  A.d = d;
  A.group = group;
  A.unbiased = unbiased;
  A.groups = groups.data();
  A.ngroups = ng;
  A.S = S;
  A.brow_off = self ? 0 : N;
  A.fa = self ? 4.0 : 2.0;
  A.fw = self ? 2.0 : 1.0;

  // Work units: row blocks (cross) or pairs of row blocks {u, nrb - 1 - u} (self, balances the triangle).
  const int64_t nrb = (N + kImqRowBlock - 1) / kImqRowBlock;
  const int64_t nunits = self ? (nrb + 1) / 2 : nrb;
  const double pairs = self ? 0.5 * double(N) * double(N) : double(N) * double(M);
  // K partitions, handed out dynamically to the threads (a thread slowed down by other load delays the op by
  // one partition at most).  Results depend on K only, and K on the thread count and the problem size.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t K = std::min<int64_t>(kImqPartitionsPerThread * nthreads, nunits);
  if (grad) {  // each partition has its own (rows x (d + 1)) float64 gradient buffer
    const double bytes = double(rows) * double(d + 1) * sizeof(double);
    const int64_t kmem = int64_t(kImqGradBufferBytes / std::max(bytes, 1.0));
    K = std::min<int64_t>(K, std::max<int64_t>(kmem, nthreads));
  }
  K = std::min<int64_t>(K, 1024);
  if (pairs * double(d + S) < 2.0e5) K = 1;  // too little work to be worth a parallel region
  K = std::max<int64_t>(K, 1);

  const int W = fns.lanes();
  const size_t scratch = fns.scratch_bytes(d, ng);
  std::vector<double> vals(size_t(K) * 2 * size_t(S) * size_t(W), 0.0);
  std::vector<char> scr(size_t(K) * scratch);
  at::Tensor gbuf;
  if (grad) gbuf = at::zeros({K, rows, d + 1}, opts);
  auto fn = self ? (grad ? fns.self_grad : fns.self_val)
                 : (grad ? (b_grad ? fns.cross_grad : fns.cross_grad_rows) : fns.cross_val);

  std::atomic<int64_t> next_part{0};
  at::parallel_for(0, std::min<int64_t>(nthreads, K), 1, [&](int64_t, int64_t) {
    for (int64_t p; (p = next_part.fetch_add(1)) < K;) {
      ImqCpuPart P;
      P.vals = vals.data() + size_t(p) * 2 * size_t(S) * size_t(W);
      P.grad = grad ? gbuf.data_ptr<double>() + p * rows * (d + 1) : nullptr;
      P.scratch = scr.data() + size_t(p) * scratch;
      const int64_t u0 = p * nunits / K;
      const int64_t u1 = (p + 1) * nunits / K;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t blocks[2] = {u, nrb - 1 - u};
        const int nblk = (self && blocks[1] != blocks[0]) ? 2 : 1;
        for (int q = 0; q < nblk; ++q) {
          const int64_t i0 = blocks[q] * kImqRowBlock;
          const int64_t i1 = std::min<int64_t>(i0 + kImqRowBlock, N);
          fn(A, i0, i1, P);
        }
      }
    }
  });

  // Deterministic combination: partitions in order, lanes in order.  Each value from its K and U sums
  // (imq_pick_value) with the exact total weight of the visited pairs.
  double wtot = 0.0;
  {
    const at::Tensor wa64 = wa.to(at::kDouble);
    const double* w = wa64.data_ptr<double>();
    double sw = 0.0, sw2 = 0.0;
    for (int64_t i = 0; i < N; ++i) {
      sw += w[i];
      sw2 += w[i] * w[i];
    }
    if (!self) {
      const at::Tensor wb64 = wb.to(at::kDouble);
      const double* v = wb64.data_ptr<double>();
      double sv = 0.0;
      for (int64_t j = 0; j < M; ++j) sv += v[j];
      wtot = sw * sv;
    } else if (unbiased) {  // pairs i < j in different groups
      double sg = 0.0;
      for (int64_t g0 = 0; g0 < N; g0 += group) {
        double s = 0.0;
        for (int64_t i = g0; i < std::min<int64_t>(g0 + group, N); ++i) s += w[i];
        sg += s * s;
      }
      wtot = 0.5 * (sw * sw - sg);
    } else {  // pairs i < j
      wtot = 0.5 * (sw * sw - sw2);
    }
  }
  const double vscale = self ? 2.0 : 1.0;  // self: each unordered pair stands for (i, j) and (j, i)
  for (int s = 0; s < S; ++s) {
    double kacc = 0.0, uacc = 0.0;
    for (int64_t p = 0; p < K; ++p) {
      const double* v = vals.data() + (size_t(p) * 2 * size_t(S) + size_t(s)) * size_t(W);
      const double* u = v + size_t(S) * size_t(W);
      for (int l = 0; l < W; ++l) {
        kacc += v[l];
        uacc += u[l];
      }
    }
    vals_out[size_t(s)] = vscale * imq_pick_value(kacc, uacc, wtot);
  }
  if (grad) {
    double* g = gbuf.data_ptr<double>();
    const int64_t len = rows * (d + 1);
    at::parallel_for(0, len, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t p = 1; p < K; ++p) {
        const double* src = g + p * len;
        for (int64_t e = e0; e < e1; ++e) g[e] += src[e];
      }
    });
    *grad_out = gbuf[0];
  }
}

struct ImqCpuResult {
  std::vector<double> vals;
  at::Tensor grad;  // rows x (d + 1) float64
};

ImqCpuResult imq_cpu(bool grad, bool b_grad, const at::Tensor& a_in, const at::Tensor& wa_in, const at::Tensor* b_in,
                     const at::Tensor* wb_in, const at::Tensor& bw_in, const at::Tensor* h_in, int64_t group,
                     bool unbiased) {
  const at::ScalarType ct =
      b_in ? imq_compute_dtype(a_in.scalar_type(), b_in->scalar_type()) : imq_compute_dtype(a_in.scalar_type());
  const at::Tensor a = a_in.to(ct).contiguous();
  const at::Tensor wa = wa_in.to(ct).contiguous();
  at::Tensor b, wb;
  if (b_in) {
    b = b_in->to(ct).contiguous();
    wb = wb_in->to(ct).contiguous();
  }
  const std::vector<double> bw = host_doubles(bw_in);
  for (double c : bw) {
    TORCH_CHECK(c > 0.0 && std::isfinite(c), "gmwae_fast::imq_*: every bandwidth `bw` must be finite and > 0, got ",
                c);
  }
  std::vector<double> h;
  if (h_in) h = host_doubles(*h_in);

  ImqCpuResult r;
  if (ct == at::kDouble) {
    imq_cpu_run<double>(!b_in, grad, b_grad, a, wa, b, wb, bw, h_in ? &h : nullptr, group, unbiased, r.vals,
                        grad ? &r.grad : nullptr);
  } else {
    imq_cpu_run<float>(!b_in, grad, b_grad, a, wa, b, wb, bw, h_in ? &h : nullptr, group, unbiased, r.vals,
                       grad ? &r.grad : nullptr);
  }

  // Biased self terms: the i == j pairs, analytically (k_s(0) = 1; phi(0) = sum_s h_s; no point gradient).
  if (!b_in && !unbiased && a.size(0) > 0) {
    const at::Tensor w64 = wa.to(at::kDouble);
    const double* w = w64.data_ptr<double>();
    double sw2 = 0.0;
    for (int64_t i = 0; i < a.size(0); ++i) sw2 += w[i] * w[i];
    for (double& v : r.vals) v += sw2;
    if (grad) {
      double hs = 0.0;
      for (double x : h) hs += x;
      double* g = r.grad.data_ptr<double>();
      const int64_t d = a.size(1);
      for (int64_t i = 0; i < a.size(0); ++i) g[i * (d + 1) + d] += 2.0 * w[i] * hs;
    }
  }
  return r;
}

at::Tensor values_tensor(const std::vector<double>& v) {
  at::Tensor t = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(at::kDouble));
  if (!v.empty()) std::memcpy(t.data_ptr<double>(), v.data(), sizeof(double) * v.size());
  return t;
}

// Splits a float64 (rows x (d + 1)) gradient buffer into (point, weight) gradients of the given dtypes.
std::pair<at::Tensor, at::Tensor> split_grad(const at::Tensor& g, int64_t r0, int64_t n, int64_t d,
                                             at::ScalarType pt, at::ScalarType wt) {
  const at::Tensor rows = g.narrow(0, r0, n);
  // Always copies: for one row both pieces would otherwise be views of one buffer, and an op's outputs may not
  // alias each other.
  return {rows.narrow(1, 0, d).to(pt, /*non_blocking=*/false, /*copy=*/true).contiguous(),
          rows.select(1, d).to(wt, /*non_blocking=*/false, /*copy=*/true).contiguous()};
}

at::Tensor imq_self_cpu(const at::Tensor& a, const at::Tensor& wa, const at::Tensor& bw, int64_t group,
                        bool unbiased) {
  imq_check_args("gmwae_fast::imq_self", a, wa, nullptr, nullptr, bw, nullptr, group);
  const ImqCpuResult r = imq_cpu(false, true, a, wa, nullptr, nullptr, bw, nullptr, group, unbiased);
  return values_tensor(r.vals);
}

at::Tensor imq_cross_cpu(const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b, const at::Tensor& wb,
                         const at::Tensor& bw) {
  imq_check_args("gmwae_fast::imq_cross", a, wa, &b, &wb, bw, nullptr, 1);
  const ImqCpuResult r = imq_cpu(false, true, a, wa, &b, &wb, bw, nullptr, 1, false);
  return values_tensor(r.vals);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> imq_self_grad_cpu(const at::Tensor& h, const at::Tensor& a,
                                                                 const at::Tensor& wa, const at::Tensor& bw,
                                                                 int64_t group, bool unbiased) {
  imq_check_args("gmwae_fast::imq_self_grad", a, wa, nullptr, nullptr, bw, &h, group);
  const ImqCpuResult r = imq_cpu(true, true, a, wa, nullptr, nullptr, bw, &h, group, unbiased);
  auto ga = split_grad(r.grad, 0, a.size(0), a.size(1), a.scalar_type(), wa.scalar_type());
  return {values_tensor(r.vals), ga.first, ga.second};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> imq_cross_grad_cpu(
    const at::Tensor& h, const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b, const at::Tensor& wb,
    const at::Tensor& bw, bool b_grad) {
  imq_check_args("gmwae_fast::imq_cross_grad", a, wa, &b, &wb, bw, &h, 1);
  const ImqCpuResult r = imq_cpu(true, b_grad, a, wa, &b, &wb, bw, &h, 1, false);
  auto ga = split_grad(r.grad, 0, a.size(0), a.size(1), a.scalar_type(), wa.scalar_type());
  if (!b_grad) {  // the column side was skipped: zeros, as the contract says
    return {values_tensor(r.vals), ga.first, ga.second, at::zeros(b.sizes(), b.options()),
            at::zeros(wb.sizes(), wb.options())};
  }
  auto gb = split_grad(r.grad, a.size(0), b.size(0), b.size(1), b.scalar_type(), wb.scalar_type());
  return {values_tensor(r.vals), ga.first, ga.second, gb.first, gb.second};
}

}  // namespace

const char* imq_cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

}  // namespace gmwae_fast

TORCH_LIBRARY_IMPL(gmwae_fast, CPU, m) {
  m.impl("imq_self", &gmwae_fast::imq_self_cpu);
  m.impl("imq_cross", &gmwae_fast::imq_cross_cpu);
  m.impl("imq_self_grad", &gmwae_fast::imq_self_grad_cpu);
  m.impl("imq_cross_grad", &gmwae_fast::imq_cross_grad_cpu);
}
