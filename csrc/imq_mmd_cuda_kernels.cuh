// Device code of the imq_mmd CUDA kernels and their host-side planning, free of torch headers.
//
// Included by csrc/imq_mmd_cuda.cu (nvcc) and by csrc/testing/imq_cuda_emu_test.cpp, which runs these very
// kernels on the CPU under a small SIMT emulator (csrc/testing/cuda_emu.h: one std::thread per CUDA thread,
// std::barrier for __syncthreads, exchange buffers for the warp shuffles).  See csrc/imq_mmd_cuda.cu for the
// algorithm.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "imq_math.h"

#ifndef GMW_DYNAMIC_SMEM
#define GMW_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
#ifndef GMW_CHECK_ALIGNED
#define GMW_CHECK_ALIGNED(p, n) ((void)0)
#endif

namespace gmwae_fast {
namespace imq_cuda {


constexpr int kBT = 64;  // tile rows (= tile columns)
constexpr int kThreads = 256;  // threads per block: 16 x 16 threads, 4 x 4 pairs each
constexpr int kWarps = kThreads / 32;
constexpr int kLd = kBT + 4;  // leading dimension of the shared tiles (keeps 16-byte alignment of rows)

// Coordinates per shared-memory chunk (d > DK is processed in chunks).
template <class T>
struct ChunkDims;
template <>
struct ChunkDims<float> {
  static constexpr int value = 64;
};
template <>
struct ChunkDims<double> {
  static constexpr int value = 32;
};

// Shared-memory carve-up, shared by the host (launch size) and the device (pointers).
struct SmemLayout {
  size_t As, Bs, Ps, Fs, wI, wJ, gI, gJ, Lsum, warp_part, val, groups, ngroups, bytes;
};

GMW_HD inline size_t align_up(size_t x, size_t a) {
  return (x + a - 1) / a * a;
}

template <class T>
GMW_HD inline SmemLayout smem_layout(int S, bool grad) {
  const size_t DK = ChunkDims<T>::value;
  const size_t ng = S > 0 ? size_t(S) : 1;
  SmemLayout L;
  size_t o = 0;
  L.As = o;
  o += DK * kLd * sizeof(T);
  L.Bs = o;
  o += DK * kLd * sizeof(T);
  L.Ps = o;
  if (grad) o += size_t(kBT) * kLd * sizeof(T);
  L.Fs = o;
  if (grad) o += size_t(kBT) * kLd * sizeof(T);
  L.wI = o;
  o += kBT * sizeof(T);
  L.wJ = o;
  o += kBT * sizeof(T);
  L.gI = o;
  o += kBT * sizeof(int64_t);
  L.gJ = o;
  o += kBT * sizeof(int64_t);
  L.Lsum = o;
  o += 4 * kBT * sizeof(T);
  L.warp_part = o;
  o += align_up(size_t(kWarps) * 2 * ng * sizeof(T), 16);
  L.val = o;
  o += align_up(2 * ng * sizeof(double), 16);
  L.groups = o;
  o += align_up(ng * sizeof(ImqGroup<T>), 16);
  L.ngroups = o;
  o += 16;
  L.bytes = o;
  return L;
}

template <class T>
struct TileArgs {
  const T* a;  // N x d (compute type, contiguous); row 0 is the origin of the shift
  const T* wa;
  const T* b;  // M x d (self: == a)
  const T* wb;
  const double* bw;  // S bandwidths (device)
  const double* h;  // S cotangents (device) or null
  int64_t N, M, d;
  int S;
  int64_t group;
  bool unbiased;
  bool b_grad;  // gradient ops: accumulate the column side too (self: always; cross: unless only a's gradient
                // is wanted, then slot_j is unused and the column-side L and G work is skipped)
  int TI, TJ;  // tiles of a and of b
  int PI, PJ;  // panels of a and of b (self: PI == PJ)
  int PSI, PSJ;  // tiles per panel
  T* slot_i;  // [PJ][N][d + 1]: row-side partials (gradient ops)
  T* slot_j;  // [PI][M][d + 1]: column-side partials (gradient ops with b_grad)
  double* block_vals;  // [gridDim.x][2 S]: sums of w w k, then of w w (1 - k)
};

// Four consecutive elements of a shared tile row (16-byte aligned).
template <class T>
__device__ __forceinline__ void ld4(const T* p, T (&v)[4]);
template <>
__device__ __forceinline__ void ld4<float>(const float* p, float (&v)[4]) {
  GMW_CHECK_ALIGNED(p, 16);
  const float4 x = *reinterpret_cast<const float4*>(p);
  v[0] = x.x;
  v[1] = x.y;
  v[2] = x.z;
  v[3] = x.w;
}
template <>
__device__ __forceinline__ void ld4<double>(const double* p, double (&v)[4]) {
  GMW_CHECK_ALIGNED(p, 16);
  const double2 x = *reinterpret_cast<const double2*>(p);
  const double2 y = *reinterpret_cast<const double2*>(p + 2);
  v[0] = x.x;
  v[1] = x.y;
  v[2] = y.x;
  v[3] = y.y;
}
template <class T>
__device__ __forceinline__ void st4(T* p, const T (&v)[4]);
template <>
__device__ __forceinline__ void st4<float>(float* p, const float (&v)[4]) {
  GMW_CHECK_ALIGNED(p, 16);
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
template <>
__device__ __forceinline__ void st4<double>(double* p, const double (&v)[4]) {
  GMW_CHECK_ALIGNED(p, 16);
  *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
  *reinterpret_cast<double2*>(p + 2) = make_double2(v[2], v[3]);
}

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Coordinates [c0, c0 + DK) of rows [r0, r0 + kBT) of x (rows x d), minus the origin o, into dst[k][r]
// (k-major, leading dimension kLd); zero outside the matrix.
template <class T>
__device__ __forceinline__ void load_chunk(T* dst, const T* __restrict__ x, int64_t rows, int64_t d, int64_t r0,
                                           int64_t c0, const T* __restrict__ o) {
  constexpr int DK = ChunkDims<T>::value;
  for (int e = threadIdx.x; e < DK * kBT; e += kThreads) {
    const int k = e % DK;
    const int r = e / DK;
    const int64_t gr = r0 + r;
    const int64_t gc = c0 + k;
    T v = T(0);
    if (gr < rows && gc < d) v = x[gr * d + gc] - o[gc];
    dst[k * kLd + r] = v;
  }
}

// Row-side or column-side slot update: first visit of the block stores, later visits add.
template <class T>
__device__ __forceinline__ void slot_put(T* p, T v, bool first) {
  *p = first ? v : *p + v;
}

template <class T, bool SELF, bool GRAD>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 2 : 1) imq_tiles_kernel(const TileArgs<T> A) {
  constexpr int DK = ChunkDims<T>::value;
  constexpr int NL = DK / 16;  // coordinates per thread and chunk in the G phase
  GMW_DYNAMIC_SMEM(smem_raw);
  const SmemLayout L = smem_layout<T>(A.S, GRAD);
  T* As = reinterpret_cast<T*>(smem_raw + L.As);
  T* Bs = reinterpret_cast<T*>(smem_raw + L.Bs);
  T* Ps = reinterpret_cast<T*>(smem_raw + L.Ps);
  T* Fs = reinterpret_cast<T*>(smem_raw + L.Fs);
  T* wI = reinterpret_cast<T*>(smem_raw + L.wI);
  T* wJ = reinterpret_cast<T*>(smem_raw + L.wJ);
  int64_t* gI = reinterpret_cast<int64_t*>(smem_raw + L.gI);  // group index of the tile rows (self, unbiased)
  int64_t* gJ = reinterpret_cast<int64_t*>(smem_raw + L.gJ);
  T* Lsum = reinterpret_cast<T*>(smem_raw + L.Lsum);  // [0] row sums of P, [1] column sums of P,
                                                      // [2] sum_j w_j Phi_ij, [3] sum_i w_i Phi_ij
  T* warp_part = reinterpret_cast<T*>(smem_raw + L.warp_part);  // [kWarps][2 S]
  double* val = reinterpret_cast<double*>(smem_raw + L.val);  // [2 S] block accumulators
  ImqGroup<T>* groups = reinterpret_cast<ImqGroup<T>*>(smem_raw + L.groups);
  int* ngroups_s = reinterpret_cast<int*>(smem_raw + L.ngroups);

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int S = A.S;
  const int64_t N = A.N, M = A.M, d = A.d;

  if (tid == 0) *ngroups_s = imq_make_groups<T>(A.bw, A.h, S, groups);
  for (int s = tid; s < 2 * S; s += kThreads) val[s] = 0.0;
  __syncthreads();
  const int ng = *ngroups_s;

  // Block -> panel pair (p, q); self: p <= q enumerated row by row.
  int p, q;
  if (SELF) {
    int b = blockIdx.x;
    p = 0;
    while (b >= A.PI - p) {
      b -= A.PI - p;
      ++p;
    }
    q = p + b;
  } else {
    p = blockIdx.x / A.PJ;
    q = blockIdx.x % A.PJ;
  }
  const int I_begin = p * A.PSI;
  const int I_end = min(I_begin + A.PSI, A.TI);
  const int Jq_begin = q * A.PSJ;
  const int J_end = min(Jq_begin + A.PSJ, A.TJ);
  const int nchunks = d > 0 ? int((d + DK - 1) / DK) : 1;

  // Pair phase: rows 4*ti .. 4*ti+3, columns 4*tj .. 4*tj+3 of the tile.
  const int ti = tid >> 4;
  const int tj = tid & 15;
  // G phase: rows 4*tg .. 4*tg+3 (of tile I for the row side, of tile J for the column side), coordinates
  // tk + 16 l (l < NL) of the chunk.
  const int tg = tid >> 4;
  const int tk = tid & 15;

  for (int I = I_begin; I < I_end; ++I) {
    const int J_begin = (SELF && p == q) ? I : Jq_begin;
    for (int J = J_begin; J < J_end; ++J) {
      const int64_t I0 = int64_t(I) * kBT;
      const int64_t J0 = int64_t(J) * kBT;

      // ---- D phase ----
      T D[4][4];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) D[ii][jj] = T(0);
      for (int c = 0; c < nchunks; ++c) {
        __syncthreads();  // every user of the shared tiles (previous chunk / tile) is done
        load_chunk<T>(As, A.a, N, d, I0, int64_t(c) * DK, A.a);
        load_chunk<T>(Bs, A.b, M, d, J0, int64_t(c) * DK, A.a);
        if (c == 0) {
          if (tid < kBT) {
            wI[tid] = (I0 + tid < N) ? A.wa[I0 + tid] : T(0);
            gI[tid] = (I0 + tid) / A.group;  // one 64-bit division per row, not one per pair
          } else if (tid < 2 * kBT) {
            const int r = tid - kBT;
            wJ[r] = (J0 + r < M) ? A.wb[J0 + r] : T(0);
            gJ[r] = (J0 + r) / A.group;
          }
        }
        __syncthreads();
        const int kc = int(d - int64_t(c) * DK < DK ? d - int64_t(c) * DK : DK);
        for (int k = 0; k < kc; ++k) {
          T av[4], bv[4];
          ld4<T>(As + k * kLd + 4 * ti, av);
          ld4<T>(Bs + k * kLd + 4 * tj, bv);
#pragma unroll
          for (int ii = 0; ii < 4; ++ii)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) D[ii][jj] = imq_sqdist_step(D[ii][jj], av[ii], bv[jj]);
        }
      }

      // ---- K phase ----
      T wpair[4][4];
      unsigned okmask = 0;  // bit 4 ii + jj: pair allowed
      {
        T wi[4], wj[4];
        ld4<T>(wI + 4 * ti, wi);
        ld4<T>(wJ + 4 * tj, wj);
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          const int64_t gi = I0 + 4 * ti + ii;
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const int64_t gj = J0 + 4 * tj + jj;
            bool ok = gi < N && gj < M;
            if (SELF) {
              ok = ok && gi < gj;
              if (A.unbiased) ok = ok && (gI[4 * ti + ii] != gJ[4 * tj + jj]);
            }
            wpair[ii][jj] = ok ? wi[ii] * wj[jj] : T(0);
            okmask |= unsigned(ok) << (4 * ii + jj);
          }
        }
      }
      T phi[4][4], psi[4][4];
      if (GRAD) {
#pragma unroll
        for (int ii = 0; ii < 4; ++ii)
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            phi[ii][jj] = T(0);
            psi[ii][jj] = T(0);
          }
      }
      // Values: sums of w w k (a*) and of w w (1 - k) (b*) per bandwidth, see imq_pick_value.
      for (int g = 0; g < ng; ++g) {
        const ImqGroup<T>& G = groups[g];
        T a0 = T(0), a1 = T(0), a2 = T(0), b0 = T(0), b1 = T(0), b2 = T(0);
        if (G.n == 3) {
#pragma unroll
          for (int ii = 0; ii < 4; ++ii)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
              T k0, k1, k2, u0, u1, u2;
              imq_ku3(D[ii][jj], G.inv_ref, G.c[0], G.c[1], G.c[2], k0, k1, k2, u0, u1, u2);
              const T wp = wpair[ii][jj];
              a0 += wp * k0;
              a1 += wp * k1;
              a2 += wp * k2;
              b0 += wp * u0;
              b1 += wp * u1;
              b2 += wp * u2;
              if (GRAD) {
                imq_phi_psi_acc(k0, G.h[0], G.q[0], phi[ii][jj], psi[ii][jj]);
                imq_phi_psi_acc(k1, G.h[1], G.q[1], phi[ii][jj], psi[ii][jj]);
                imq_phi_psi_acc(k2, G.h[2], G.q[2], phi[ii][jj], psi[ii][jj]);
              }
            }
        } else if (G.n == 2) {
#pragma unroll
          for (int ii = 0; ii < 4; ++ii)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
              T k0, k1, u0, u1;
              imq_ku2(D[ii][jj], G.inv_ref, G.c[0], G.c[1], k0, k1, u0, u1);
              const T wp = wpair[ii][jj];
              a0 += wp * k0;
              a1 += wp * k1;
              b0 += wp * u0;
              b1 += wp * u1;
              if (GRAD) {
                imq_phi_psi_acc(k0, G.h[0], G.q[0], phi[ii][jj], psi[ii][jj]);
                imq_phi_psi_acc(k1, G.h[1], G.q[1], phi[ii][jj], psi[ii][jj]);
              }
            }
        } else {
#pragma unroll
          for (int ii = 0; ii < 4; ++ii)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
              T k0, u0;
              imq_ku1(D[ii][jj], G.inv_ref, G.c[0], k0, u0);
              a0 += wpair[ii][jj] * k0;
              b0 += wpair[ii][jj] * u0;
              if (GRAD) imq_phi_psi_acc(k0, G.h[0], G.q[0], phi[ii][jj], psi[ii][jj]);
            }
        }
        // Warp partials (all lanes take part: the group loop and G.n are uniform across the block).
        a0 = warp_sum(a0);
        b0 = warp_sum(b0);
        if (G.n > 1) {
          a1 = warp_sum(a1);
          b1 = warp_sum(b1);
        }
        if (G.n > 2) {
          a2 = warp_sum(a2);
          b2 = warp_sum(b2);
        }
        if (lane == 0) {
          T* wk = warp_part + warp * 2 * S + G.s0;
          T* wu = wk + S;
          wk[0] = a0;
          wu[0] = b0;
          if (G.n > 1) {
            wk[1] = a1;
            wu[1] = b1;
          }
          if (G.n > 2) {
            wk[2] = a2;
            wu[2] = b2;
          }
        }
      }
      if (GRAD) {
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          T pv[4], fv[4];
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            pv[jj] = wpair[ii][jj] * psi[ii][jj];
            // Phi is kept only for allowed pairs (a zero weight keeps its pairs: dL/dw needs them).
            fv[jj] = ((okmask >> (4 * ii + jj)) & 1u) ? phi[ii][jj] : T(0);
          }
          st4<T>(Ps + (4 * ti + ii) * kLd + 4 * tj, pv);
          st4<T>(Fs + (4 * ti + ii) * kLd + 4 * tj, fv);
        }
      }
      __syncthreads();

      // ---- L phase ----
      for (int s = tid; s < 2 * S; s += kThreads) {
        double v = 0.0;
        for (int w = 0; w < kWarps; ++w) v += double(warp_part[w * 2 * S + s]);
        val[s] += v;
      }
      if (GRAD) {
        const int which = tid >> 7;  // 0: P, 1: Phi
        const int line = tid & 127;
        const T* X = which ? Fs : Ps;
        T s = T(0);
        if (line < kBT) {
          const int r = line;
          for (int u = 0; u < kBT; ++u) {
            const int j = (u + r) & (kBT - 1);  // rotated start: conflict-free shared reads
            s += which ? X[r * kLd + j] * wJ[j] : X[r * kLd + j];
          }
          Lsum[(2 * which) * kBT + r] = s;
        } else if (A.b_grad) {
          const int cidx = line - kBT;
          for (int i = 0; i < kBT; ++i) s += which ? X[i * kLd + cidx] * wI[i] : X[i * kLd + cidx];
          Lsum[(2 * which + 1) * kBT + cidx] = s;
        }
      }
      __syncthreads();

      if (GRAD) {
        // ---- G phase ----
        const bool first_i = (J == J_begin);  // first visit of this block to slot (q, rows of I)
        const bool first_j = (I == I_begin);  // first visit of this block to slot (p, rows of J)
        T* si = A.slot_i + (int64_t(q) * N + I0) * (d + 1);
        T* sj = A.b_grad ? A.slot_j + (int64_t(p) * M + J0) * (d + 1) : nullptr;
        if (tid < kBT) {
          if (I0 + tid < N) slot_put(si + int64_t(tid) * (d + 1) + d, Lsum[2 * kBT + tid], first_i);
        } else if (tid < 2 * kBT && A.b_grad) {
          const int r = tid - kBT;
          if (J0 + r < M) slot_put(sj + int64_t(r) * (d + 1) + d, Lsum[3 * kBT + r], first_j);
        }
        for (int c = 0; c < nchunks; ++c) {
          if (nchunks > 1) {
            __syncthreads();
            load_chunk<T>(As, A.a, N, d, I0, int64_t(c) * DK, A.a);
            load_chunk<T>(Bs, A.b, M, d, J0, int64_t(c) * DK, A.a);
            __syncthreads();
          }
          const int64_t c0 = int64_t(c) * DK;
          const int kc = int(d - c0 < DK ? d - c0 : DK);
          // Row side: sum_j P[i][j] b~[j][k].
          {
            T o[4][NL];
#pragma unroll
            for (int ii = 0; ii < 4; ++ii)
#pragma unroll
              for (int l = 0; l < NL; ++l) o[ii][l] = T(0);
#pragma unroll 1
            for (int u = 0; u < kBT; u += 4) {
              T pv[4][4], bv[NL][4];
#pragma unroll
              for (int ii = 0; ii < 4; ++ii) ld4<T>(Ps + (4 * tg + ii) * kLd + u, pv[ii]);
#pragma unroll
              for (int l = 0; l < NL; ++l) ld4<T>(Bs + (tk + 16 * l) * kLd + u, bv[l]);
#pragma unroll
              for (int ii = 0; ii < 4; ++ii)
#pragma unroll
                for (int l = 0; l < NL; ++l)
#pragma unroll
                  for (int uu = 0; uu < 4; ++uu) o[ii][l] += pv[ii][uu] * bv[l][uu];
            }
#pragma unroll
            for (int ii = 0; ii < 4; ++ii) {
              const int r = 4 * tg + ii;
              if (I0 + r >= N) continue;
#pragma unroll
              for (int l = 0; l < NL; ++l) {
                const int k = tk + 16 * l;
                if (k < kc) {
                  const T v = As[k * kLd + r] * Lsum[r] - o[ii][l];
                  slot_put(si + int64_t(r) * (d + 1) + c0 + k, v, first_i);
                }
              }
            }
          }
          // Column side: sum_i P[i][j] a~[i][k] (A.b_grad is uniform across the block).
          if (A.b_grad) {
            T o[4][NL];
#pragma unroll
            for (int jj = 0; jj < 4; ++jj)
#pragma unroll
              for (int l = 0; l < NL; ++l) o[jj][l] = T(0);
#pragma unroll 1
            for (int u = 0; u < kBT; u += 4) {
              T pv[4][4], av[NL][4];
#pragma unroll
              for (int uu = 0; uu < 4; ++uu) ld4<T>(Ps + (u + uu) * kLd + 4 * tg, pv[uu]);
#pragma unroll
              for (int l = 0; l < NL; ++l) ld4<T>(As + (tk + 16 * l) * kLd + u, av[l]);
#pragma unroll
              for (int jj = 0; jj < 4; ++jj)
#pragma unroll
                for (int l = 0; l < NL; ++l)
#pragma unroll
                  for (int uu = 0; uu < 4; ++uu) o[jj][l] += pv[uu][jj] * av[l][uu];
            }
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
              const int r = 4 * tg + jj;
              if (J0 + r >= M) continue;
#pragma unroll
              for (int l = 0; l < NL; ++l) {
                const int k = tk + 16 * l;
                if (k < kc) {
                  const T v = Bs[k * kLd + r] * Lsum[kBT + r] - o[jj][l];
                  slot_put(sj + int64_t(r) * (d + 1) + c0 + k, v, first_j);
                }
              }
            }
          }
        }
      }
    }
  }
  // val[s] is only ever touched by thread s (mod kThreads).
  for (int s = tid; s < 2 * S; s += kThreads) A.block_vals[int64_t(blockIdx.x) * 2 * S + s] = val[s];
}

// Fixed-order sum over the 256 threads of a block (all threads call it; returns the total to every thread).
__device__ __forceinline__ double block_sum256(double v, double* red) {
  const int tid = threadIdx.x;
  red[tid] = v;
  __syncthreads();
  for (int off = 128; off > 0; off >>= 1) {
    if (tid < off) red[tid] += red[tid + off];
    __syncthreads();
  }
  const double total = red[0];
  __syncthreads();
  return total;
}

// values[s] = scale * pick(K_s, U_s, W) + (diag ? sum_i w_i^2 : 0) with K_s, U_s the sums of the block
// partials and W the exact (float64) total weight of the visited pairs (imq_pick_value); one block, fixed
// summation order.
template <class T>
__global__ void __launch_bounds__(256) imq_values_finalize_kernel(const double* __restrict__ block_vals, int nblocks,
                                                                  int S, bool self, bool unbiased, int64_t group,
                                                                  const T* __restrict__ wa, int64_t n,
                                                                  const T* __restrict__ wb, int64_t m,
                                                                  double* __restrict__ out) {
  __shared__ double red[256];
  const int tid = threadIdx.x;
  double sw = 0.0, sw2 = 0.0, sv = 0.0, sg = 0.0;
  for (int64_t i = tid; i < n; i += 256) {
    const double w = double(wa[i]);
    sw += w;
    sw2 += w * w;
  }
  if (!self) {
    for (int64_t j = tid; j < m; j += 256) sv += double(wb[j]);
  } else if (unbiased) {
    for (int64_t g0 = int64_t(tid) * group; g0 < n; g0 += int64_t(256) * group) {
      double s = 0.0;
      for (int64_t i = g0; i < g0 + group && i < n; ++i) s += double(wa[i]);
      sg += s * s;
    }
  }
  sw = block_sum256(sw, red);
  sw2 = block_sum256(sw2, red);
  sv = block_sum256(sv, red);
  sg = block_sum256(sg, red);
  // Self terms count the pairs i < j once (scale 2); the biased diagonal is added analytically.
  const double wtot = !self ? sw * sv : (unbiased ? 0.5 * (sw * sw - sg) : 0.5 * (sw * sw - sw2));
  const double scale = self ? 2.0 : 1.0;
  const double diag = (self && !unbiased) ? sw2 : 0.0;
  for (int s = 0; s < S; ++s) {
    double k = 0.0, u = 0.0;
    for (int b = tid; b < nblocks; b += 256) {
      k += block_vals[int64_t(b) * 2 * S + s];
      u += block_vals[int64_t(b) * 2 * S + S + s];
    }
    k = block_sum256(k, red);
    u = block_sum256(u, red);
    if (tid == 0) out[s] = scale * imq_pick_value(k, u, wtot) + diag;
  }
}

// Rows the gradient finalize kernel writes: those of a, then (cross, with b_grad) those of b.
template <class T>
GMW_HD inline int64_t grad_rows(const TileArgs<T>& A, bool self) {
  return self ? A.N : A.N + (A.b_grad ? A.M : 0);
}

// Gradient of one row block: sums the written slots of each (row, coordinate) in a fixed order.
//   self:  slots_i[q] for q = panel(row) .. P - 1, then slots_j[p] for p = 0 .. panel(row)
//   cross: a rows: slots_i[q], q < PJ; b rows (only with b_grad): slots_j[p], p < PI
template <class T>
__global__ void __launch_bounds__(256) imq_grad_finalize_kernel(const TileArgs<T> A, bool self, double fa, double fw,
                                                                bool diag, T* __restrict__ da, T* __restrict__ dwa,
                                                                T* __restrict__ db, T* __restrict__ dwb) {
  const int64_t d1 = A.d + 1;
  const int64_t rows = grad_rows(A, self);
  const int64_t total = rows * d1;
  double hsum = 0.0;
  if (diag && A.h) {
    for (int s = 0; s < A.S; ++s) hsum += A.h[s];
  }
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / d1;
    const int64_t k = e - r * d1;
    double v = 0.0;
    bool b_side = false;
    int64_t rr = r;
    if (self) {
      const int pr = int(r / kBT) / A.PSI;
      for (int q = pr; q < A.PJ; ++q) v += double(A.slot_i[(int64_t(q) * A.N + r) * d1 + k]);
      for (int p = 0; p <= pr; ++p) v += double(A.slot_j[(int64_t(p) * A.N + r) * d1 + k]);
    } else if (r < A.N) {
      for (int q = 0; q < A.PJ; ++q) v += double(A.slot_i[(int64_t(q) * A.N + r) * d1 + k]);
    } else {
      b_side = true;
      rr = r - A.N;
      for (int p = 0; p < A.PI; ++p) v += double(A.slot_j[(int64_t(p) * A.M + rr) * d1 + k]);
    }
    if (k < A.d) {
      (b_side ? db : da)[rr * A.d + k] = T(fa * v);
    } else {
      const T* w = b_side ? A.wb : A.wa;
      double g = fw * v;
      if (diag) g += 2.0 * double(w[rr]) * hsum;
      (b_side ? dwb : dwa)[rr] = T(g);
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Panels along a (PI) and b (PJ): enough blocks for every SM, capped slot memory for the gradient ops.  The plan
// does not depend on b_grad, so the row side is summed in the same order (bitwise the same) with and without it.
inline void choose_panels(bool self, bool grad, int64_t N, int64_t M, int64_t d, size_t elem, int sms, int TI, int TJ,
                   int& PI, int& PJ, int& PSI, int& PSJ) {
  const double target = 6.0 * sms;  // blocks
  const double budget = 512.0 * 1024 * 1024;  // bytes of gradient slots
  if (self) {
    int P = int(std::ceil(std::sqrt(2.0 * target)));
    P = std::max(1, std::min(P, TI));
    if (grad) {
      while (P > 1 && 2.0 * P * double(N) * double(d + 1) * double(elem) > budget) --P;
    }
    PSI = PSJ = int(ceil_div(TI, P));
    PI = PJ = int(ceil_div(TI, PSI));
    return;
  }
  int pi = int(std::ceil(std::sqrt(target * double(TI) / double(TJ))));
  pi = std::max(1, std::min(pi, TI));
  int pj = int(std::ceil(target / pi));
  pj = std::max(1, std::min(pj, TJ));
  if (grad) {
    auto bytes = [&](int a_, int b_) { return (double(b_) * N + double(a_) * M) * double(d + 1) * double(elem); };
    while ((pi > 1 || pj > 1) && bytes(pi, pj) > budget) {
      if ((pj >= pi && pj > 1) || pi == 1) --pj; else --pi;
    }
  }
  PSI = int(ceil_div(TI, pi));
  PSJ = int(ceil_div(TJ, pj));
  PI = int(ceil_div(TI, PSI));
  PJ = int(ceil_div(TJ, PSJ));
}

// Fills the tiling fields of A (TI, TJ, panels) and returns the number of blocks of imq_tiles_kernel.
template <class T>
inline int plan_tiles(TileArgs<T>& A, bool self, bool grad, int sms) {
  A.TI = int(ceil_div(A.N, kBT));
  A.TJ = int(ceil_div(A.M, kBT));
  choose_panels(self, grad, A.N, A.M, A.d, sizeof(T), sms, A.TI, A.TJ, A.PI, A.PJ, A.PSI, A.PSJ);
  return self ? A.PI * (A.PI + 1) / 2 : A.PI * A.PJ;
}

// Slot elements (row side, column side) of the gradient ops.
template <class T>
inline void slot_sizes(const TileArgs<T>& A, int64_t& ni, int64_t& nj) {
  ni = int64_t(A.PJ) * A.N * (A.d + 1);
  nj = A.b_grad ? int64_t(A.PI) * A.M * (A.d + 1) : 0;
}

template <class T>
inline int grad_finalize_blocks(const TileArgs<T>& A, bool self, int sms) {
  const int64_t rows = grad_rows(A, self), d = A.d;
  return int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows * (d + 1), 256), int64_t(sms) * 8)));
}

}  // namespace imq_cuda
}  // namespace gmwae_fast
