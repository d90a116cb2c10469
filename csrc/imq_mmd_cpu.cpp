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
//   its own float64 gradient buffer of (d + 1) x (N [+ M]) entries, coordinate major (O((N + M) d) memory).
//   Buffers are summed in partition order, so results are bitwise reproducible run to run for a given thread
//   count (K follows the thread count and the problem size, never the scheduling).
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
  const T* a;    // N x d, row-major: the rows i
  const T* wa;   // N
  const T* bt;   // d x ldb: the columns j, transposed and zero padded (self: a itself)
  const T* wbp;  // ldb column weights, zero padded
  int64_t N, M, ldb, d;
  int64_t group;  // self only
  bool unbiased;  // self only
  const ImqGroup<T>* groups;
  int ngroups;
  int S;             // bandwidths
  int64_t brow_off;  // first row of the column points in the gradient buffer (self 0, cross N)
  int64_t grows;     // points in the gradient buffer (self N, cross N or N + M)
  double fa, fw;     // gradient factors: self 4 and 2, cross 2 and 1
};

// Per-partition outputs and scratch.
struct ImqCpuPart {
  double* vals;  // 2 S x W float64 lane partials: sums of w w k, then of w w (1 - k)
  double* grad;  // (d + 1) x grows float64, coordinate major (d point coordinates, then the weight), null for
                 // value ops
  void* scratch;
};

}  // namespace gmwae_fast

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// ---- instruction-set variants of the inner kernels ----
// GMW_VBYTES: vector bytes; GMW_NC: vectors per column block; GMW_NR: rows per register tile (4: measured
// against 2 and 8 at N = 4096, d = 10 and 64 on a 2-core Intel Xeon VM with AVX-512, for both the AVX-512 and the
// AVX2 variant).
namespace gmwae_fast {

#define GMW_CPU_NS isa_generic
#define GMW_NR 4
#define GMW_VBYTES 16
#define GMW_NC 8
#include "imq_mmd_cpu_kernel.h"
#undef GMW_CPU_NS
#undef GMW_VBYTES
#undef GMW_NC
#undef GMW_NR

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define GMW_HAVE_X86_VARIANTS 1

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define GMW_CPU_NS isa_avx2
#define GMW_NR 4
#define GMW_VBYTES 32
#define GMW_NC 8
#include "imq_mmd_cpu_kernel.h"
#undef GMW_CPU_NS
#undef GMW_VBYTES
#undef GMW_NC
#undef GMW_NR
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define GMW_CPU_NS isa_avx512
#define GMW_NR 4
#define GMW_VBYTES 64
#define GMW_NC 4
#include "imq_mmd_cpu_kernel.h"
#undef GMW_CPU_NS
#undef GMW_VBYTES
#undef GMW_NC
#undef GMW_NR
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
    if (v == "generic" || v == "default")
      cap = CpuIsa::kGeneric;
    else if (v == "avx2")
      cap = CpuIsa::kAvx2;
    else if (v == "avx512")
      cap = CpuIsa::kAvx512;
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

#define GMW_ISA_FNS(NS, T)                                                                           \
  IsaFns<T> {                                                                                        \
    &NS::scratch_bytes<T>, &NS::lanes<T>, &NS::col_block<T>, &NS::run_rows<T, true, false>,          \
        &NS::run_rows<T, true, true>, &NS::run_rows<T, false, false>, &NS::run_rows<T, false, true>, \
        &NS::run_rows<T, false, true, false>                                                         \
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

// What one call of the core computes.
enum class ImqPass { kValues, kValuesAndGrads };
enum class ImqColumnGrads { kSkip, kCompute };  // cross terms: gradients of the column points b too

struct ImqCpuOpts {
  ImqPass pass = ImqPass::kValues;
  ImqColumnGrads column_grads = ImqColumnGrads::kCompute;  // cross terms only
  int64_t group = 1;                                       // self terms only
  bool unbiased = false;                                   // self terms only

  static ImqCpuOpts self_terms(ImqPass pass, int64_t group, bool unbiased) {
    ImqCpuOpts o;
    o.pass = pass;
    o.group = group;
    o.unbiased = unbiased;
    return o;
  }
  static ImqCpuOpts cross_terms(ImqPass pass, ImqColumnGrads column_grads) {
    ImqCpuOpts o;
    o.pass = pass;
    o.column_grads = column_grads;
    return o;
  }
  bool grad() const { return pass == ImqPass::kValuesAndGrads; }
};

// The inputs in the compute type T (contiguous); b, wb undefined for self terms.
struct ImqInputs {
  at::Tensor a, wa, b, wb;
  std::vector<double> bw;
  std::vector<double> h;  // empty for the value ops
  bool self() const { return !b.defined(); }
};

// The inner kernels' arguments and the buffers they point into.
template <class T>
struct ImqPrepared {
  std::vector<ImqGroup<T>> groups;
  at::Tensor bt, wbp;  // transposed zero-padded columns and their weights
  ImqCpuArgs<T> args;
};

template <class T>
void prepare_args(const ImqInputs& in, const ImqCpuOpts& o, int64_t col_block, int64_t grows, ImqPrepared<T>& P) {
  const bool self = in.self();
  const at::Tensor& b = self ? in.a : in.b;
  const at::Tensor& wb = self ? in.wa : in.wb;
  const int64_t d = in.a.size(1);
  const int64_t M = b.size(0);
  const int S = int(in.bw.size());
  P.groups.resize(size_t(S));
  const int ng = imq_make_groups<T>(in.bw.data(), in.h.empty() ? nullptr : in.h.data(), S, P.groups.data());
  const int64_t ldb = (M + col_block - 1) / col_block * col_block;
  // Filled here, not with tensor ops: at the sizes of a WAE batch the dispatcher calls cost as much as the kernels.
  P.bt = at::empty({std::max<int64_t>(d, 1), ldb}, in.a.options());
  P.wbp = at::empty({ldb}, in.a.options());
  T* bt = P.bt.template data_ptr<T>();
  T* wbp = P.wbp.template data_ptr<T>();
  const T* bsrc = b.template data_ptr<T>();
  const T* wsrc = wb.template data_ptr<T>();
  std::fill(bt, bt + P.bt.numel(), T(0));
  for (int64_t j = 0; j < M; ++j) {
    for (int64_t k = 0; k < d; ++k) bt[k * ldb + j] = bsrc[j * d + k];
  }
  std::copy(wsrc, wsrc + M, wbp);
  std::fill(wbp + M, wbp + ldb, T(0));

  ImqCpuArgs<T>& A = P.args;
  A.a = in.a.data_ptr<T>();
  A.wa = in.wa.data_ptr<T>();
  A.bt = P.bt.template data_ptr<T>();
  A.wbp = P.wbp.template data_ptr<T>();
  A.N = in.a.size(0);
  A.M = M;
  A.ldb = ldb;
  A.d = d;
  A.group = o.group;
  A.unbiased = o.unbiased;
  A.groups = P.groups.data();
  A.ngroups = ng;
  A.S = S;
  A.brow_off = self ? 0 : A.N;
  A.grows = grows;
  A.fa = self ? 4.0 : 2.0;
  A.fw = self ? 2.0 : 1.0;
}

// Work units: row blocks (cross) or pairs of row blocks {u, nrb - 1 - u} (self, balances the triangle), cut into
// K partitions, handed out dynamically to the threads (a thread slowed down by other load delays the op by one
// partition at most).  Results depend on K only, and K on the thread count and the problem size.
struct ImqWorkPlan {
  int64_t nrb;  // row blocks
  int64_t nunits;
  int64_t K;  // partitions
  int64_t nthreads;
};

ImqWorkPlan plan_work(bool self, bool grad, int64_t N, int64_t M, int64_t d, int S, int64_t grows) {
  ImqWorkPlan w;
  w.nrb = (N + kImqRowBlock - 1) / kImqRowBlock;
  w.nunits = self ? (w.nrb + 1) / 2 : w.nrb;
  w.nthreads = std::max<int64_t>(1, at::get_num_threads());
  const double pairs = self ? 0.5 * double(N) * double(M) : double(N) * double(M);
  int64_t K = std::min<int64_t>(kImqPartitionsPerThread * w.nthreads, w.nunits);
  if (grad) {  // each partition has its own ((d + 1) x grows) float64 gradient buffer
    const double bytes = double(grows) * double(d + 1) * sizeof(double);
    const int64_t kmem = int64_t(kImqGradBufferBytes / std::max(bytes, 1.0));
    K = std::min<int64_t>(K, std::max<int64_t>(kmem, w.nthreads));
  }
  K = std::min<int64_t>(K, 1024);
  if (pairs * double(d + S) < 2.0e5) K = 1;  // too little work to be worth a parallel region
  w.K = std::max<int64_t>(K, 1);
  return w;
}

// Runs every partition: fn over its row blocks, into its own value partials and gradient buffer.
template <class T, class Fn>
void run_partitions(const ImqCpuArgs<T>& A, const ImqWorkPlan& w, bool self, Fn fn, double* vals, size_t vals_len,
                    double* gbuf, char* scratch, size_t scratch_len) {
  std::atomic<int64_t> next_part{0};
  const int64_t glen = A.grows * (A.d + 1);
  at::parallel_for(0, std::min<int64_t>(w.nthreads, w.K), 1, [&](int64_t, int64_t) {
    for (int64_t p; (p = next_part.fetch_add(1)) < w.K;) {
      ImqCpuPart P;
      P.vals = vals + size_t(p) * vals_len;
      P.grad = gbuf ? gbuf + p * glen : nullptr;
      P.scratch = scratch + size_t(p) * scratch_len;
      for (int64_t u = p * w.nunits / w.K; u < (p + 1) * w.nunits / w.K; ++u) {
        const int64_t blocks[2] = {u, w.nrb - 1 - u};
        const int nblk = (self && blocks[1] != blocks[0]) ? 2 : 1;
        for (int q = 0; q < nblk; ++q) {
          const int64_t i0 = blocks[q] * kImqRowBlock;
          fn(A, i0, std::min<int64_t>(i0 + kImqRowBlock, A.N), P);
        }
      }
    }
  });
}

// Exact (float64) total weight of the visited pairs: self i < j (outside i's group when unbiased), cross all.
// Self: sum_g s_g (s_0 + ... + s_{g-1}) over the group masses s_g (single points when biased), a sum of
// non-negative terms: (sum w)^2 - sum s_g^2 would cancel when one group holds nearly all the mass.
double pair_weight_total(const ImqInputs& in, const ImqCpuOpts& o) {
  const at::Tensor wa64 = in.wa.to(at::kDouble);
  const double* w = wa64.data_ptr<double>();
  const int64_t N = in.wa.size(0);
  if (!in.self()) {
    const at::Tensor wb64 = in.wb.to(at::kDouble);
    const double* v = wb64.data_ptr<double>();
    double sw = 0.0, sv = 0.0;
    for (int64_t i = 0; i < N; ++i) sw += w[i];
    for (int64_t j = 0; j < in.wb.size(0); ++j) sv += v[j];
    return sw * sv;
  }
  const int64_t group = o.unbiased ? o.group : 1;
  double before = 0.0, pairs = 0.0;
  for (int64_t g0 = 0; g0 < N; g0 += group) {
    double s = 0.0;
    for (int64_t i = g0; i < std::min<int64_t>(g0 + group, N); ++i) s += w[i];
    pairs += s * before;
    before += s;
  }
  return pairs;
}

// Deterministic combination of the value partials: partitions in order, lanes in order.  Each value from its K
// and U sums (imq_pick_value) with the exact total weight of the visited pairs.
void combine_values(const std::vector<double>& vals, int64_t K, int S, int W, double wtot, double scale,
                    std::vector<double>& out) {
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
    out[size_t(s)] = scale * imq_pick_value(kacc, uacc, wtot);
  }
}

// Sums the K per-partition gradient buffers into the first one (partition order: deterministic).
void reduce_grad_buffers(double* g, int64_t K, int64_t len) {
  at::parallel_for(0, len, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t p = 1; p < K; ++p) {
      const double* src = g + p * len;
      for (int64_t e = e0; e < e1; ++e) g[e] += src[e];
    }
  });
}

template <class T>
using ImqKernelFn = void (*)(const ImqCpuArgs<T>&, int64_t, int64_t, const ImqCpuPart&);

template <class T>
ImqKernelFn<T> pick_kernel(const IsaFns<T>& fns, bool self, const ImqCpuOpts& o) {
  if (self) return o.grad() ? fns.self_grad : fns.self_val;
  if (!o.grad()) return fns.cross_val;
  return o.column_grads == ImqColumnGrads::kCompute ? fns.cross_grad : fns.cross_grad_rows;
}

// The core: values (S doubles) and, for gradients, the float64 gradient buffer as a (grows x (d + 1)) view
// (point gradients, then the weight gradient; grows = N, or N + M for cross terms with column gradients).
template <class T>
void imq_cpu_run(const ImqInputs& in, const ImqCpuOpts& o, std::vector<double>& vals_out, at::Tensor* grad_out) {
  const IsaFns<T> fns = isa_fns<T>();
  const bool self = in.self();
  const int64_t N = in.a.size(0);
  const int64_t d = in.a.size(1);
  const int64_t M = self ? N : in.b.size(0);
  const int S = int(in.bw.size());
  const int64_t grows = (self || o.column_grads == ImqColumnGrads::kSkip) ? N : N + M;
  const auto opts = in.a.options().dtype(at::kDouble);

  vals_out.assign(size_t(S), 0.0);
  if (N == 0 || M == 0 || S == 0) {
    if (o.grad()) *grad_out = at::zeros({grows, d + 1}, opts);
    return;
  }

  ImqPrepared<T> prep;
  prepare_args<T>(in, o, fns.col_block(), grows, prep);
  const ImqWorkPlan w = plan_work(self, o.grad(), N, M, d, S, grows);
  const int W = fns.lanes();
  const size_t vals_len = 2 * size_t(S) * size_t(W);
  std::vector<double> vals(size_t(w.K) * vals_len, 0.0);
  const size_t scratch_len = fns.scratch_bytes(d, prep.args.ngroups);
  std::vector<char> scratch(size_t(w.K) * scratch_len);
  at::Tensor gbuf;
  if (o.grad()) gbuf = at::zeros({w.K, d + 1, grows}, opts);
  run_partitions<T>(prep.args, w, self, pick_kernel(fns, self, o), vals.data(), vals_len,
                    o.grad() ? gbuf.data_ptr<double>() : nullptr, scratch.data(), scratch_len);

  // self: each unordered pair stands for (i, j) and (j, i)
  combine_values(vals, w.K, S, W, pair_weight_total(in, o), self ? 2.0 : 1.0, vals_out);
  if (o.grad()) {
    reduce_grad_buffers(gbuf.data_ptr<double>(), w.K, grows * (d + 1));
    *grad_out = gbuf[0].t();
  }
}

struct ImqCpuResult {
  std::vector<double> vals;
  at::Tensor grad;  // rows x (d + 1) float64
};

ImqInputs prepare_inputs(const at::Tensor& a, const at::Tensor& wa, const at::Tensor* b, const at::Tensor* wb,
                         const at::Tensor& bw, const at::Tensor* h) {
  const at::ScalarType ct =
      b ? imq_compute_dtype(a.scalar_type(), b->scalar_type()) : imq_compute_dtype(a.scalar_type());
  ImqInputs in;
  in.a = a.to(ct).contiguous();
  in.wa = wa.to(ct).contiguous();
  if (b) {
    in.b = b->to(ct).contiguous();
    in.wb = wb->to(ct).contiguous();
  }
  in.bw = host_doubles(bw);
  for (double c : in.bw) {
    TORCH_CHECK(c > 0.0 && std::isfinite(c), "gmwae_fast::imq_*: every bandwidth `bw` must be finite and > 0, got ", c);
  }
  if (h) in.h = host_doubles(*h);
  return in;
}

// Biased self terms: the i == j pairs, analytically (k_s(0) = 1; phi(0) = sum_s h_s; no point gradient).
void add_biased_diagonal(const ImqInputs& in, ImqCpuResult& r) {
  const at::Tensor w64 = in.wa.to(at::kDouble).contiguous();
  const double* w = w64.data_ptr<double>();
  double sw2 = 0.0;
  for (int64_t i = 0; i < w64.size(0); ++i) sw2 += w[i] * w[i];
  for (double& v : r.vals) v += sw2;
  if (r.grad.defined()) {
    double hs = 0.0;
    for (double x : in.h) hs += x;
    r.grad.select(1, in.a.size(1)).add_(w64, 2.0 * hs);
  }
}

ImqCpuResult imq_cpu(const ImqCpuOpts& o, const at::Tensor& a, const at::Tensor& wa, const at::Tensor* b,
                     const at::Tensor* wb, const at::Tensor& bw, const at::Tensor* h) {
  const ImqInputs in = prepare_inputs(a, wa, b, wb, bw, h);
  ImqCpuResult r;
  at::Tensor* grad = o.grad() ? &r.grad : nullptr;
  if (in.a.scalar_type() == at::kDouble) {
    imq_cpu_run<double>(in, o, r.vals, grad);
  } else {
    imq_cpu_run<float>(in, o, r.vals, grad);
  }
  if (in.self() && !o.unbiased && in.a.size(0) > 0) add_biased_diagonal(in, r);
  return r;
}

at::Tensor values_tensor(const std::vector<double>& v) {
  at::Tensor t = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(at::kDouble));
  if (!v.empty()) std::memcpy(t.data_ptr<double>(), v.data(), sizeof(double) * v.size());
  return t;
}

// Splits a float64 (rows x (d + 1)) gradient buffer into (point, weight) gradients of the given dtypes.
template <class P, class W>
std::pair<at::Tensor, at::Tensor> split_grad_loop(const at::Tensor& g, int64_t r0, int64_t n, int64_t d,
                                                  at::ScalarType pt, at::ScalarType wt) {
  // g is a (rows x (d + 1)) view of a ((d + 1) x rows) buffer (see imq_cpu_run); one pass, no dispatcher calls
  at::Tensor gp = at::empty({n, d}, at::TensorOptions().dtype(pt));
  at::Tensor gw = at::empty({n}, at::TensorOptions().dtype(wt));
  const double* src = g.data_ptr<double>();
  const int64_t rs = g.stride(0), cs = g.stride(1);
  P* op = gp.data_ptr<P>();
  W* ow = gw.data_ptr<W>();
  for (int64_t i = 0; i < n; ++i) {
    const double* row = src + (r0 + i) * rs;
    for (int64_t k = 0; k < d; ++k) op[i * d + k] = P(row[k * cs]);
    ow[i] = W(row[d * cs]);
  }
  return {gp, gw};
}

std::pair<at::Tensor, at::Tensor> split_grad(const at::Tensor& g, int64_t r0, int64_t n, int64_t d, at::ScalarType pt,
                                             at::ScalarType wt) {
  if (pt == wt && pt == at::kFloat) return split_grad_loop<float, float>(g, r0, n, d, pt, wt);
  if (pt == wt && pt == at::kDouble) return split_grad_loop<double, double>(g, r0, n, d, pt, wt);
  const at::Tensor rows = g.narrow(0, r0, n);
  // Always copies: for one row both pieces would otherwise be views of one buffer, and an op's outputs may not
  // alias each other.
  return {rows.narrow(1, 0, d).to(pt, /*non_blocking=*/false, /*copy=*/true).contiguous(),
          rows.select(1, d).to(wt, /*non_blocking=*/false, /*copy=*/true).contiguous()};
}

at::Tensor imq_self_cpu(const at::Tensor& a, const at::Tensor& wa, const at::Tensor& bw, int64_t group, bool unbiased) {
  imq_check_args("gmwae_fast::imq_self", a, wa, nullptr, nullptr, bw, nullptr, group);
  const ImqCpuResult r =
      imq_cpu(ImqCpuOpts::self_terms(ImqPass::kValues, group, unbiased), a, wa, nullptr, nullptr, bw, nullptr);
  return values_tensor(r.vals);
}

at::Tensor imq_cross_cpu(const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b, const at::Tensor& wb,
                         const at::Tensor& bw) {
  imq_check_args("gmwae_fast::imq_cross", a, wa, &b, &wb, bw, nullptr, 1);
  const ImqCpuResult r =
      imq_cpu(ImqCpuOpts::cross_terms(ImqPass::kValues, ImqColumnGrads::kSkip), a, wa, &b, &wb, bw, nullptr);
  return values_tensor(r.vals);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> imq_self_grad_cpu(const at::Tensor& h, const at::Tensor& a,
                                                                 const at::Tensor& wa, const at::Tensor& bw,
                                                                 int64_t group, bool unbiased) {
  imq_check_args("gmwae_fast::imq_self_grad", a, wa, nullptr, nullptr, bw, &h, group);
  const ImqCpuResult r =
      imq_cpu(ImqCpuOpts::self_terms(ImqPass::kValuesAndGrads, group, unbiased), a, wa, nullptr, nullptr, bw, &h);
  auto ga = split_grad(r.grad, 0, a.size(0), a.size(1), a.scalar_type(), wa.scalar_type());
  return {values_tensor(r.vals), ga.first, ga.second};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> imq_cross_grad_cpu(
    const at::Tensor& h, const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b, const at::Tensor& wb,
    const at::Tensor& bw, bool b_grad) {
  imq_check_args("gmwae_fast::imq_cross_grad", a, wa, &b, &wb, bw, &h, 1);
  const ImqColumnGrads cols = b_grad ? ImqColumnGrads::kCompute : ImqColumnGrads::kSkip;
  const ImqCpuResult r = imq_cpu(ImqCpuOpts::cross_terms(ImqPass::kValuesAndGrads, cols), a, wa, &b, &wb, bw, &h);
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
