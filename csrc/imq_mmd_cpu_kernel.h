// CPU inner kernels of the imq_mmd ops, written once and compiled once per instruction set.
//
// This file is textually included by csrc/imq_mmd_cpu.cpp several times (no include guard), each time
// inside a different namespace GMW_CPU_NS and, for the AVX2/AVX-512 variants, inside a region where the
// compiler targets that instruction set (`#pragma GCC target`).  The lane type is
// a GCC/Clang vector of GMW_VBYTES bytes; GMW_NC such vectors of consecutive columns form one column block.
// Everything it needs (ATen, <cstring>, imq_math.h, ImqCpuArgs, ...) is included/declared before.
//
// Work decomposition (see imq_mmd_cpu.cpp): rows of `a` are cut into blocks of kImqRowBlock rows; for one row
// block and one column block the rows are processed in register tiles of GMW_NR rows (each column vector loaded
// and each column-gradient lane read-modify-written then serves GMW_NR rows), vectorised over the columns.  Rows
// whose allowed columns start inside the block (self terms: the diagonal, or the row's own group when unbiased)
// and the rows left over at the end of a block go one by one.  Distances and point-gradient differences are
// always formed directly, (a_i - b_j) per coordinate.  Per row and column block the kernel values are
// accumulated in float32 lanes over GMW_NC vectors only, then added in float64 (lane partials, one per bandwidth
// and lane), so partial sums stay short.  Gradients:
//   * row side: float32 lanes over at most kImqRowFlush column blocks, then reduced and added in float64;
//   * column side: float32 lanes over the rows of one row block (<= kImqRowBlock terms), then added in
//     float64 into the partition's gradient buffer (coordinate major, so that this add is vectorised).

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
// x in every lane, as one initializer list (GCC emits a single broadcast; a per-lane store loop became a chain of
// masked inserts).
template <class V, class T, size_t... L>
GMW_INLINE V vbcast_lanes(T x, std::index_sequence<L...>) {
  return V{((void)L, x)...};
}
template <class V, class T>
GMW_INLINE V vbcast(T x) {
  return vbcast_lanes<V>(x, std::make_index_sequence<sizeof(V) / sizeof(T)>());
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
  static constexpr int NR = GMW_NR;  // rows per register tile
  // Column vectors per sweep of the distance accumulation: NR x CC accumulators, at most half of the vector
  // registers (16 of AVX-512's 32, 8 of the 16 of SSE/AVX2).
  static constexpr int CC_MAX = (GMW_VBYTES >= 64 ? 16 : 8) / NR > 0 ? (GMW_VBYTES >= 64 ? 16 : 8) / NR : 1;
  static constexpr int CC = NC < CC_MAX ? NC : CC_MAX;
  static_assert(NC % CC == 0 && NR >= 1, "bad tile shape");

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

  // ---- one register tile: R consecutive rows against one column block ----
  //
  // `wj`: JB column weights (masked / zero padded), `mk`: the JB-lane column mask (null: every lane allowed; only
  // single-row tiles are masked), `gj`: (d + 1) x JB column-side float lanes, `gl`: R x (d + 1) x W row-side float
  // lanes (`gl_row` apart, flushed into float64 every kImqRowFlush column blocks), `vals`: 2 S x W float64 lane
  // partials (sums of w w k, then of w w (1 - k)).  Each column vector loaded (distances and point gradients)
  // and each column-gradient lane read-modify-written serves R rows; the per-pair arithmetic is that of a single
  // row, in the same order.
  template <int R>
  static GMW_INLINE void tile(const ImqCpuArgs<T>& A, const GroupV* gv, int64_t i, int64_t j0, const T* wj, const T* mk,
                              T* gj, T* gl, size_t gl_row, double* vals) {
    V D[R][NC];
    distances<R>(A, i, j0, D);
    V wv[NC];
    for (int c = 0; c < NC; ++c) wv[c] = vload<V>(wj + c * W);
    V phi[R][NC], psi[R][NC];
    for (int r = 0; r < R; ++r) pair_terms(A, gv, D[r], wv, double(A.wa[i + r]), vals, phi[r], psi[r]);
    if (GRAD) gradients<R>(A, i, j0, wv, mk, phi, psi, gj, gl, gl_row);
  }

  // D[r][c] = lanes of |a_{i+r} - b_j|^2 (direct differences), CC column vectors per sweep over the coordinates
  // (R x CC accumulators stay in registers).
  template <int R>
  static GMW_INLINE void distances(const ImqCpuArgs<T>& A, int64_t i, int64_t j0, V (&D)[R][NC]) {
    const int64_t d = A.d;
    const T* ai = A.a + i * d;
    const T* bt = A.bt + j0;
    for (int c0 = 0; c0 < NC; c0 += CC) {
      V acc[R][CC];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < CC; ++c) acc[r][c] = V{};
      for (int64_t k = 0; k < d; ++k) {
        const T* bk = bt + k * A.ldb + c0 * W;
        V b[CC];
        for (int c = 0; c < CC; ++c) b[c] = vload<V>(bk + c * W);
        for (int r = 0; r < R; ++r) {
          const V ak = vbcast<V>(ai[r * d + k]);
          for (int c = 0; c < CC; ++c) acc[r][c] = imq_sqdist_step(acc[r][c], ak, b[c]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < CC; ++c) D[r][c0 + c] = acc[r][c];
    }
  }

  // One row's kernel values (added to `vals` with the row weight wi in float64) and, for gradients, its lanes of
  // phi and psi.
  static GMW_INLINE void pair_terms(const ImqCpuArgs<T>& A, const GroupV* gv, const V* D, const V* wv, double wi,
                                    double* vals, V* phi, V* psi) {
    if (GRAD) {
      for (int c = 0; c < NC; ++c) {
        phi[c] = V{};
        psi[c] = V{};
      }
    }
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
  }

  // Gradients of R rows against one column block.  Weights: row side sum_j w_j phi, column side w_i phi (the row
  // side is masked through the masked weights w_j, the column side by the explicit lane mask `mk`).  Points,
  // direct form: row side sum_j (w_j psi_ij) (a_i - b_j), column side -sum_i (w_i psi_ij) (a_i - b_j), the
  // column lanes summed over the R rows in registers (row order) before one store.
  template <int R>
  static GMW_INLINE void gradients(const ImqCpuArgs<T>& A, int64_t i, int64_t j0, const V* wv, const T* mk,
                                   const V (&phi)[R][NC], const V (&psi)[R][NC], T* gj, T* gl, size_t gl_row) {
    const int64_t d = A.d;
    const T* ai = A.a + i * d;
    const T* bt = A.bt + j0;
    V Pi[R][NC], Pj[R][NC];
    T* gjd = gj + d * JB;
    V cw[NC];
    if (COLG) {
      for (int c = 0; c < NC; ++c) cw[c] = vload<V>(gjd + c * W);
    }
    for (int r = 0; r < R; ++r) {
      const V wiv = vbcast<V>(A.wa[i + r]);
      V dwi = V{};
      for (int c = 0; c < NC; ++c) {
        Pi[r][c] = wv[c] * psi[r][c];
        dwi += wv[c] * phi[r][c];
        if (COLG) {
          const V wim = mk ? wiv * vload<V>(mk + c * W) : wiv;
          Pj[r][c] = wim * psi[r][c];
          cw[c] += wim * phi[r][c];
        }
      }
      T* glr = gl + size_t(r) * gl_row;
      vstore(glr + d * W, vload<V>(glr + d * W) + dwi);
    }
    if (COLG) {
      for (int c = 0; c < NC; ++c) vstore(gjd + c * W, cw[c]);
    }
    for (int64_t k = 0; k < d; ++k) {
      const T* bk = bt + k * A.ldb;
      T* gk = gj + k * JB;
      V ak[R], s[R];
      for (int r = 0; r < R; ++r) {
        ak[r] = vbcast<V>(ai[r * d + k]);
        s[r] = V{};
      }
      for (int c = 0; c < NC; ++c) {
        const V b = vload<V>(bk + c * W);
        V col = COLG ? vload<V>(gk + c * W) : V{};
        for (int r = 0; r < R; ++r) {
          const V t = ak[r] - b;
          s[r] += Pi[r][c] * t;
          if (COLG) col -= Pj[r][c] * t;
        }
        if (COLG) vstore(gk + c * W, col);
      }
      for (int r = 0; r < R; ++r) {
        T* g = gl + size_t(r) * gl_row + k * W;
        vstore(g, vload<V>(g) + s[r]);
      }
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

  // Rows [i0, i1) against the column block at j0, in tiles of NR rows; the rows whose allowed columns start
  // inside the block (self terms: the diagonal, or the own group when unbiased) one by one with a lane mask, the
  // NR - 1 or fewer rows left at the end one by one.  `wm`, `mm`: JB-lane scratch for the masked weights and mask.
  // False when no row has a column here.
  static GMW_INLINE bool column_block(const ImqCpuArgs<T>& A, const GroupV* gv, int64_t i0, int64_t i1, int64_t j0,
                                      T* wm, T* mm, T* gj, T* gl, size_t gl_row, double* vals) {
    const T* wj = A.wbp + j0;
    int64_t i = i0;
    while (i < i1) {
      T* gli = gl + size_t(i - i0) * gl_row;
      if (SELF) {
        const int64_t js = jstart(A, i);
        if (js >= j0 + JB || js >= A.M) break;  // jstart is nondecreasing in i
        if (js > j0) {
          for (int jj = 0; jj < JB; ++jj) {
            const bool on = j0 + jj >= js;
            wm[jj] = on ? wj[jj] : T(0);
            mm[jj] = on ? T(1) : T(0);
          }
          tile<1>(A, gv, i, j0, wm, mm, gj, gli, gl_row, vals);
          ++i;
          continue;
        }
      }
      if (NR > 1 && i + NR <= i1 && (!SELF || jstart(A, i + NR - 1) <= j0)) {
        tile<NR>(A, gv, i, j0, wj, nullptr, gj, gli, gl_row, vals);
        i += NR;
      } else {
        tile<1>(A, gv, i, j0, wj, nullptr, gj, gli, gl_row, vals);
        ++i;
      }
    }
    return i > i0;
  }

  // Per-partition scratch (see scratch_bytes), 64-byte aligned pieces.
  struct Scratch {
    T* gj;       // (d + 1) x JB column-side float lanes
    double* gi;  // kImqRowBlock x (d + 1) row-side float64 sums
    T* gl;       // kImqRowBlock x (d + 1) x W row-side float lanes
    T* wm;       // JB masked column weights
    T* mm;       // JB column mask
    GroupV* gv;  // ngroups broadcast group constants
  };

  static Scratch carve(void* scratch, int64_t d) {
    auto r64 = [](size_t x) { return (x + 63) / 64 * 64; };
    char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(scratch) + 63) / 64 * 64);
    Scratch S;
    S.gj = reinterpret_cast<T*>(base);
    base += r64(sizeof(T) * size_t(d + 1) * JB);
    S.gi = reinterpret_cast<double*>(base);
    base += r64(sizeof(double) * size_t(kImqRowBlock) * size_t(d + 1));
    S.gl = reinterpret_cast<T*>(base);
    base += r64(sizeof(T) * size_t(kImqRowBlock) * size_t(d + 1) * W);
    S.wm = reinterpret_cast<T*>(base);
    base += r64(sizeof(T) * JB);
    S.mm = reinterpret_cast<T*>(base);
    base += r64(sizeof(T) * JB);
    S.gv = reinterpret_cast<GroupV*>(base);
    return S;
  }

  static void broadcast_groups(const ImqCpuArgs<T>& A, GroupV* gv) {
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
  }

  // Row-side float lanes of n rows -> their float64 sums (then zeroed).
  static void flush_row_lanes(int64_t n, int64_t d, T* gl, double* gi) {
    const size_t gl_row = size_t(d + 1) * W;
    for (int64_t r = 0; r < n; ++r) {
      T* l = gl + size_t(r) * gl_row;
      double* g = gi + r * (d + 1);
      for (int64_t k = 0; k <= d; ++k) g[k] += double(vhsum<V, T>(vload<V>(l + k * W)));
      std::memset(l, 0, sizeof(T) * gl_row);
    }
  }

  // Column-side float lanes of the block at j0 -> the partition's float64 buffer ((d + 1) x grows, coordinate
  // major, so that this runs along contiguous columns).
  static void flush_columns(const ImqCpuArgs<T>& A, int64_t j0, const T* gj, double* grad) {
    const int64_t jn = std::min<int64_t>(JB, A.M - j0);
    const T* wb = A.wbp + j0;
    double* base = grad + A.brow_off + j0;
    for (int64_t k = 0; k < A.d; ++k) {
      double* g = base + k * A.grows;
      const T* s = gj + k * JB;
      for (int64_t jj = 0; jj < jn; ++jj) g[jj] += (A.fa * double(wb[jj])) * double(s[jj]);
    }
    double* g = base + A.d * A.grows;
    const T* s = gj + A.d * JB;
    for (int64_t jj = 0; jj < jn; ++jj) g[jj] += A.fw * double(s[jj]);
  }

  // Float64 row sums of rows [i0, i1) -> the partition's buffer.
  static void finish_rows(const ImqCpuArgs<T>& A, int64_t i0, int64_t i1, const double* gi, double* grad) {
    const int64_t d = A.d;
    for (int64_t i = i0; i < i1; ++i) {
      const double* s = gi + (i - i0) * (d + 1);
      const double f = A.fa * double(A.wa[i]);
      for (int64_t k = 0; k < d; ++k) grad[k * A.grows + i] += f * s[k];
      grad[d * A.grows + i] += A.fw * s[d];
    }
  }

  // Rows [i0, i1) (i1 - i0 <= kImqRowBlock) against all their columns.
  static void rows(const ImqCpuArgs<T>& A, int64_t i0, int64_t i1, const ImqCpuPart& P) {
    const int64_t d = A.d;
    const Scratch S = carve(P.scratch, d);
    broadcast_groups(A, S.gv);
    const size_t gl_row = size_t(d + 1) * W;
    if (GRAD) {
      std::memset(S.gi, 0, sizeof(double) * size_t(i1 - i0) * size_t(d + 1));
      std::memset(S.gl, 0, sizeof(T) * size_t(i1 - i0) * gl_row);
    }
    int64_t since_flush = 0;  // row-side float lanes -> float64 every kImqRowFlush column blocks and at the end
    const int64_t nb = A.ldb / JB;
    const int64_t jb_first = SELF ? jstart(A, i0) / JB : 0;
    for (int64_t jb = jb_first; jb < nb; ++jb) {
      const int64_t j0 = jb * JB;
      if (GRAD && COLG) std::memset(S.gj, 0, sizeof(T) * size_t(d + 1) * JB);
      const bool touched = column_block(A, S.gv, i0, i1, j0, S.wm, S.mm, S.gj, S.gl, gl_row, P.vals);
      if (GRAD && touched && ++since_flush == kImqRowFlush) {
        flush_row_lanes(i1 - i0, d, S.gl, S.gi);
        since_flush = 0;
      }
      if (GRAD && COLG && touched) flush_columns(A, j0, S.gj, P.grad);
    }
    if (GRAD) {
      flush_row_lanes(i1 - i0, d, S.gl, S.gi);
      finish_rows(A, i0, i1, S.gi, P.grad);
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
