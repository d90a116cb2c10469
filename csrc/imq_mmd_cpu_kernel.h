// CPU inner kernels of the imq_mmd ops, written once and compiled once per instruction set.
//
// This file is textually included by csrc/imq_mmd_cpu.cpp several times (no include guard), each time
// inside a different namespace GMW_CPU_NS and, for the AVX2/AVX-512 variants, inside a region where the
// compiler targets that instruction set (`#pragma GCC target` / `#pragma clang attribute`).  The lane type is
// a GCC/Clang vector of GMW_VBYTES bytes; GMW_NC such vectors of consecutive columns form one column block.
// Everything it needs (ATen, <cstring>, imq_math.h, ImqCpuArgs, ...) is included/declared before.
//
// Work decomposition (see imq_mmd_cpu.cpp): rows of `a` are cut into blocks of kImqRowBlock rows; for one row
// block and one column block the rows are processed one by one, vectorised over the columns.  Per row and
// column block the kernel values are accumulated in float32 lanes over GMW_NC vectors only, then added in
// float64 (lane partials, one per bandwidth and lane), so partial sums stay short.  Gradients:
//   * row side: float32 lanes over at most kImqRowFlush column blocks, then reduced and added in float64;
//   * column side: float32 lanes over the rows of one row block (<= kImqRowBlock terms), then added in
//     float64 into the partition's gradient buffer.

namespace GMW_CPU_NS {

template <class T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(GMW_VBYTES)));
  typedef double dtype __attribute__((vector_size(2 * GMW_VBYTES)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(GMW_VBYTES)));
  typedef double dtype __attribute__((vector_size(GMW_VBYTES)));
};

template <class V, class T>
GMW_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V, class T>
GMW_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <class V, class T>
GMW_INLINE V vbcast(T x) {
  V v;
  for (int l = 0; l < int(sizeof(V) / sizeof(T)); ++l) v[l] = x;
  return v;
}
template <class V, class T>
GMW_INLINE T vhsum(const V& v) {
  T s = v[0];
  for (int l = 1; l < int(sizeof(V) / sizeof(T)); ++l) s += v[l];
  return s;
}

// COLG: accumulate the column-side gradients too (always for self terms; cross terms skip them when the
// column points need no gradient, e.g. the prior samples of a WAE).
template <class T, bool SELF, bool GRAD, bool COLG = true>
struct ImqRows {
  static_assert(COLG || (GRAD && !SELF), "only cross gradient kernels can skip the column side");
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::dtype VD;
  static constexpr int W = GMW_VBYTES / int(sizeof(T));
  static constexpr int NC = GMW_NC;
  static constexpr int JB = W * NC;

  // Per-group constants broadcast to lanes once per call (memory operands in the hot loop).
  struct GroupV {
    V inv, c0, c1, c2, h0, h1, h2, q0, q1, q2;
  };

  // Per-partition scratch, carved out of one buffer (sizes in bytes, all multiples of 64).
  static size_t scratch_bytes(int64_t d, int ngroups) {
    auto r64 = [](size_t x) { return (x + 63) / 64 * 64; };
    return r64(sizeof(T) * size_t(d + 1) * JB) + r64(sizeof(double) * size_t(kImqRowBlock) * size_t(d + 1)) +
           r64(sizeof(T) * size_t(kImqRowBlock) * size_t(d + 1) * W) + 2 * r64(sizeof(T) * JB) +
           r64(sizeof(GroupV) * size_t(ngroups > 0 ? ngroups : 1)) + 64;
  }

  // One row against one column block.  `wj`: JB column weights (masked / zero padded), `gj`: (d+1) x JB
  // column-side float lanes, `gl`: (d+1) x W row-side float lanes (flushed into float64 every kImqRowFlush
  // column blocks), `vals`: 2 S x W float64 lane partials (sums of w w k, then of w w (1 - k)).
  static GMW_INLINE void row(const ImqCpuArgs<T>& A, const GroupV* gv, int64_t i, int64_t j0, const T* wj,
                             const T* mk, T* gj, T* gl, double* vals) {
    const int64_t d = A.d;
    const int64_t ldb = A.ldb;
    const T* ai = A.a + i * d;
    const T* bt = A.bt + j0;

    V D[NC];
    for (int c = 0; c < NC; ++c) D[c] = V{};
    for (int64_t k = 0; k < d; ++k) {
      const V ak = vbcast<V>(ai[k]);
      const T* bk = bt + k * ldb;
      for (int c = 0; c < NC; ++c) D[c] = imq_sqdist_step(D[c], ak, vload<V>(bk + c * W));
    }
    V wv[NC];
    for (int c = 0; c < NC; ++c) wv[c] = vload<V>(wj + c * W);
    V phi[NC], psi[NC];
    if (GRAD) {
      for (int c = 0; c < NC; ++c) {
        phi[c] = V{};
        psi[c] = V{};
      }
    }
    const double wi = double(A.wa[i]);

    // Values: K lanes at vals[s W], complement (U) lanes at vals[(S + s) W].
    for (int g = 0; g < A.ngroups; ++g) {
      const ImqGroup<T>& G = A.groups[g];
      const GroupV& Gv = gv[g];
      double* vs = vals + int64_t(G.s0) * W;
      double* us = vals + int64_t(A.S + G.s0) * W;
      if (G.n == 3) {
        V a0 = V{}, a1 = V{}, a2 = V{}, b0 = V{}, b1 = V{}, b2 = V{};
        for (int c = 0; c < NC; ++c) {
          V k0, k1, k2, u0, u1, u2;
          imq_ku3(D[c], Gv.inv, Gv.c0, Gv.c1, Gv.c2, k0, k1, k2, u0, u1, u2);
          a0 += wv[c] * k0;
          a1 += wv[c] * k1;
          a2 += wv[c] * k2;
          b0 += wv[c] * u0;
          b1 += wv[c] * u1;
          b2 += wv[c] * u2;
          if (GRAD) {
            imq_phi_psi_acc(k0, Gv.h0, Gv.q0, phi[c], psi[c]);
            imq_phi_psi_acc(k1, Gv.h1, Gv.q1, phi[c], psi[c]);
            imq_phi_psi_acc(k2, Gv.h2, Gv.q2, phi[c], psi[c]);
          }
        }
        add_lanes(vs, a0, wi);
        add_lanes(vs + W, a1, wi);
        add_lanes(vs + 2 * W, a2, wi);
        add_lanes(us, b0, wi);
        add_lanes(us + W, b1, wi);
        add_lanes(us + 2 * W, b2, wi);
      } else if (G.n == 2) {
        V a0 = V{}, a1 = V{}, b0 = V{}, b1 = V{};
        for (int c = 0; c < NC; ++c) {
          V k0, k1, u0, u1;
          imq_ku2(D[c], Gv.inv, Gv.c0, Gv.c1, k0, k1, u0, u1);
          a0 += wv[c] * k0;
          a1 += wv[c] * k1;
          b0 += wv[c] * u0;
          b1 += wv[c] * u1;
          if (GRAD) {
            imq_phi_psi_acc(k0, Gv.h0, Gv.q0, phi[c], psi[c]);
            imq_phi_psi_acc(k1, Gv.h1, Gv.q1, phi[c], psi[c]);
          }
        }
        add_lanes(vs, a0, wi);
        add_lanes(vs + W, a1, wi);
        add_lanes(us, b0, wi);
        add_lanes(us + W, b1, wi);
      } else {
        V a0 = V{}, b0 = V{};
        for (int c = 0; c < NC; ++c) {
          V k0, u0;
          imq_ku1(D[c], Gv.inv, Gv.c0, k0, u0);
          a0 += wv[c] * k0;
          b0 += wv[c] * u0;
          if (GRAD) imq_phi_psi_acc(k0, Gv.h0, Gv.q0, phi[c], psi[c]);
        }
        add_lanes(vs, a0, wi);
        add_lanes(us, b0, wi);
      }
    }
    if (!GRAD) return;

    // Weight gradients: row side sum_j w_j phi, column side w_i phi.  The row side is masked through the
    // (masked) weights w_j, the column side needs the explicit lane mask `mk` (null: every lane allowed).
    V wiv = vbcast<V>(A.wa[i]);
    V Pi[NC], Pj[NC];
    V dwi = V{};
    T* gjd = gj + d * JB;
    for (int c = 0; c < NC; ++c) {
      Pi[c] = wv[c] * psi[c];
      dwi += wv[c] * phi[c];
      if (COLG) {
        const V wim = mk ? wiv * vload<V>(mk + c * W) : wiv;
        Pj[c] = wim * psi[c];
        vstore(gjd + c * W, vload<V>(gjd + c * W) + wim * phi[c]);
      }
    }
    vstore(gl + d * W, vload<V>(gl + d * W) + dwi);
    // Point gradients, direct form: sum_j (w_j psi_ij) (a_i - b_j) and -(w_i psi_ij) (a_i - b_j).
    for (int64_t k = 0; k < d; ++k) {
      const V ak = vbcast<V>(ai[k]);
      const T* bk = bt + k * ldb;
      T* gk = gj + k * JB;
      V s = V{};
      for (int c = 0; c < NC; ++c) {
        const V t = ak - vload<V>(bk + c * W);
        s += Pi[c] * t;
        if (COLG) vstore(gk + c * W, vload<V>(gk + c * W) - Pj[c] * t);
      }
      vstore(gl + k * W, vload<V>(gl + k * W) + s);
    }
  }

  // vs[l] += w * acc[l] in float64.
  static GMW_INLINE void add_lanes(double* vs, const V& acc, double w) {
    const VD ad = __builtin_convertvector(acc, VD);
    vstore(vs, vload<VD>(vs) + ad * w);
  }

  // First allowed column of row i (self ops): j > i, and outside i's group when unbiased.
  static GMW_INLINE int64_t jstart(const ImqCpuArgs<T>& A, int64_t i) {
    return A.unbiased ? (i / A.group + 1) * A.group : i + 1;
  }

  // Rows [i0, i1) (i1 - i0 <= kImqRowBlock) against all their columns.
  static void rows(const ImqCpuArgs<T>& A, int64_t i0, int64_t i1, const ImqCpuPart& P) {
    const int64_t d = A.d;
    auto r64 = [](size_t x) { return (x + 63) / 64 * 64; };
    char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(P.scratch) + 63) / 64 * 64);
    T* gj = reinterpret_cast<T*>(base);
    base += r64(sizeof(T) * size_t(d + 1) * JB);
    double* gi = reinterpret_cast<double*>(base);
    base += r64(sizeof(double) * size_t(kImqRowBlock) * size_t(d + 1));
    T* gl = reinterpret_cast<T*>(base);
    base += r64(sizeof(T) * size_t(kImqRowBlock) * size_t(d + 1) * W);
    T* wm = reinterpret_cast<T*>(base);
    base += r64(sizeof(T) * JB);
    T* mm = reinterpret_cast<T*>(base);
    base += r64(sizeof(T) * JB);
    GroupV* gv = reinterpret_cast<GroupV*>(base);
    for (int g = 0; g < A.ngroups; ++g) {
      const ImqGroup<T>& G = A.groups[g];
      gv[g].inv = vbcast<V>(G.inv_ref);
      gv[g].c0 = vbcast<V>(G.c[0]);
      gv[g].c1 = vbcast<V>(G.c[1]);
      gv[g].c2 = vbcast<V>(G.c[2]);
      gv[g].h0 = vbcast<V>(G.h[0]);
      gv[g].h1 = vbcast<V>(G.h[1]);
      gv[g].h2 = vbcast<V>(G.h[2]);
      gv[g].q0 = vbcast<V>(G.q[0]);
      gv[g].q1 = vbcast<V>(G.q[1]);
      gv[g].q2 = vbcast<V>(G.q[2]);
    }
    const size_t gl_row = size_t(d + 1) * W;
    if (GRAD) {
      std::memset(gi, 0, sizeof(double) * size_t(i1 - i0) * size_t(d + 1));
      std::memset(gl, 0, sizeof(T) * size_t(i1 - i0) * gl_row);
    }
    // Row-side float lanes -> float64 (every kImqRowFlush column blocks and at the end).
    auto flush_rows = [&]() {
      for (int64_t r = 0; r < i1 - i0; ++r) {
        T* l = gl + size_t(r) * gl_row;
        double* g = gi + r * (d + 1);
        for (int64_t k = 0; k <= d; ++k) g[k] += double(vhsum<V, T>(vload<V>(l + k * W)));
        std::memset(l, 0, sizeof(T) * gl_row);
      }
    };
    int64_t since_flush = 0;

    const int64_t nb = A.ldb / JB;
    const int64_t jb_first = SELF ? jstart(A, i0) / JB : 0;
    for (int64_t jb = jb_first; jb < nb; ++jb) {
      const int64_t j0 = jb * JB;
      if (GRAD && COLG) std::memset(gj, 0, sizeof(T) * size_t(d + 1) * JB);
      bool touched = false;
      for (int64_t i = i0; i < i1; ++i) {
        const T* wj = A.wbp + j0;
        const T* mk = nullptr;
        if (SELF) {
          const int64_t js = jstart(A, i);
          if (js >= j0 + JB || js >= A.M) break;  // jstart is nondecreasing in i
          if (js > j0) {
            for (int jj = 0; jj < JB; ++jj) {
              const bool on = j0 + jj >= js;
              wm[jj] = on ? wj[jj] : T(0);
              mm[jj] = on ? T(1) : T(0);
            }
            wj = wm;
            mk = mm;
          }
        }
        row(A, gv, i, j0, wj, mk, gj, gl + size_t(i - i0) * gl_row, P.vals);
        touched = true;
      }
      if (GRAD && touched && ++since_flush == kImqRowFlush) {
        flush_rows();
        since_flush = 0;
      }
      if (GRAD && COLG && touched) {
        const int64_t jn = std::min<int64_t>(JB, A.M - j0);
        for (int64_t jj = 0; jj < jn; ++jj) {
          const int64_t j = j0 + jj;
          double* g = P.grad + (A.brow_off + j) * (d + 1);
          const double s = A.fa * double(A.wbp[j]);
          for (int64_t k = 0; k < d; ++k) g[k] += s * double(gj[k * JB + jj]);
          g[d] += A.fw * double(gj[d * JB + jj]);
        }
      }
    }
    if (GRAD) {
      flush_rows();
      for (int64_t i = i0; i < i1; ++i) {
        const double* s = gi + (i - i0) * (d + 1);
        double* g = P.grad + i * (d + 1);
        const double f = A.fa * double(A.wa[i]);
        for (int64_t k = 0; k < d; ++k) g[k] += f * s[k];
        g[d] += A.fw * s[d];
      }
    }
  }
};

// Entry points called (non-inlined, through pointers to plain structs) from the generic dispatcher.
template <class T>
size_t scratch_bytes(int64_t d, int ngroups) {
  return ImqRows<T, true, true>::scratch_bytes(d, ngroups);
}
template <class T>
int lanes() {
  return ImqRows<T, true, true>::W;
}
template <class T>
int col_block() {
  return ImqRows<T, true, true>::JB;
}
template <class T, bool SELF, bool GRAD, bool COLG = true>
void run_rows(const ImqCpuArgs<T>& A, int64_t i0, int64_t i1, const ImqCpuPart& P) {
  ImqRows<T, SELF, GRAD, COLG>::rows(A, i0, i1, P);
}

}  // namespace GMW_CPU_NS
