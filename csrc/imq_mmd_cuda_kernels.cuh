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
#include <vector>

#include "imq_math.h"

#ifndef GMW_DYNAMIC_SMEM
#define GMW_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
#ifndef GMW_CHECK_ALIGNED
#define GMW_CHECK_ALIGNED(p, n) ((void)0)
#endif

namespace gmwae_fast {
namespace imq_cuda {

constexpr int kBT = 64;        // tile rows (= tile columns)
constexpr int kThreads = 256;  // threads per block: 16 x 16 threads, 4 x 4 pairs each
constexpr int kWarps = kThreads / 32;
// Value partials per warp and bandwidth: float sums the warp's 32 lanes over 1 butterfly level only (lanes
// 0 .. 15 then hold the sums of lanes l and l + 16: 4 shuffles and adds per bandwidth and thread instead of 10) and
// the L phase adds the kWarps * kLaneParts partials in float64; double keeps the full 5-level tree (one partial
// per warp: its shared memory stays within the opt-in limit at kImqMaxBandwidthsCuda bandwidths).
template <class T>
constexpr int kLaneParts = sizeof(T) == 4 ? 16 : 1;
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
  size_t As, Bs, Ps, Fs, wI, wJ, gI, gJ, Lsum, tc, warp_part, val, bands, info, bytes;
};

// Tensor-core route (float kernels, kTcMinD <= d <= 64): float64 scratch of a tile pair, in doubles from L.tc.
constexpr int kTcMinD = 32;
constexpr int kTcCentre = 0;             // [kBT] centre c_k (row 0 of the I tile), 0 beyond the chunk
constexpr int kTcNorm = kBT;             // [2 kBT] |a_i - c|^2, then |b_j - c|^2 (0 for rows outside the matrix)
constexpr int kTcLineSum = 3 * kBT;      // [2 kBT] float64 row sums, then column sums, of P
constexpr int kTcWarpMax = 5 * kBT;      // [4] the largest norm of each of the 4 norm warps
constexpr int kTcMinBand = 5 * kBT + 4;  // [1] the smallest bandwidth
constexpr int kTcDoubles = 5 * kBT + 8;

GMW_HD inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Whether the float kernels run the tensor-core instantiation (imq_tiles_kernel<..., TC = true>) for d: one
// chunk of kTcMinD .. 64 coordinates.  Its tile pairs still fall back to the CUDA-core phases one by one (error
// gate), and everywhere on a device without the instruction (compiled for an architecture before sm_80).
GMW_HD inline bool tensor_core_route(int64_t d, size_t elem, bool allowed) {
  return allowed && elem == sizeof(float) && d >= kTcMinD && d <= kBT;
}

template <class T>
GMW_HD inline SmemLayout smem_layout(int S, bool grad, bool tc = false) {
  tc = tc && sizeof(T) == 4;
  const size_t DK = ChunkDims<T>::value;
  const size_t ng = S > 0 ? size_t(S) : 1;
  SmemLayout L;
  size_t o = 0;
  L.As = o;
  o += DK * kLd * sizeof(T);
  L.Bs = o;
  o += DK * kLd * sizeof(T);
  L.Ps = o;  // tensor-core route: also its distance tile, hence in the values kernels too
  if (grad || tc) o += size_t(kBT) * kLd * sizeof(T);
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
  o += 2 * kBT * sizeof(T);
  L.tc = o;
  if (tc) o += kTcDoubles * sizeof(double);
  // Everything above and the band table's offset are compile-time constants (no register holds them across
  // the tile loop); the S-sized arrays follow.
  L.info = o;
  o += 32;
  L.bands = o;
  o += align_up(ng * sizeof(ImqBand<T>), 16);
  L.warp_part = o;
  o += align_up(size_t(kWarps) * kLaneParts<T> * 2 * ng * sizeof(T), 16);
  L.val = o;
  o += align_up(2 * ng * sizeof(double), 16);
  L.bytes = o;
  return L;
}

template <class T>
struct TileArgs {
  const T* a;  // N x d (compute type, contiguous)
  const T* wa;
  const T* b;  // M x d (self: == a)
  const T* wb;
  const double* bw;  // S bandwidths (device)
  const double* h;   // S cotangents (device) or null
  int64_t N, M, d;
  int S;
  int64_t group;
  bool unbiased;
  bool b_grad;         // gradient ops: accumulate the column side too (self: always; cross: unless only a's gradient
                       // is wanted, then slot_j is unused and the column-side L and G work is skipped)
  int TI, TJ;          // tiles of a and of b
  int PI, PJ;          // panels of a and of b (self: PI == PJ)
  int PSI, PSJ;        // tiles per panel
  int64_t block0;      // panel pair (block id) of blockIdx.x == 0: a launch runs the blocks of one wave
  T* slot_i;           // [blocks of the wave][PSI kBT][d + 1]: row-side partials of each block (gradient ops)
  T* slot_j;           // [blocks of the wave][PSJ kBT][d + 1]: column-side partials (gradient ops with b_grad)
  double* block_vals;  // [blocks of the wave][2 S]: sums of w w k, then of w w (1 - k)
  bool tensor_cores = true;  // the host launches the TC instantiation (tensor_core_route); false: never
  bool vec4 = false;         // float, d % 4 == 0, a and b 16-byte aligned: 16-byte tile loads (load_chunk)
};

// First block of row p of the self panel triangle (pairs p <= q, enumerated row by row).
GMW_HD inline int64_t tri_row_start(int64_t p, int64_t P) { return p * P - p * (p - 1) / 2; }

// Panel pair (p, q) of block id: self, the triangle row by row; cross, row-major over PI x PJ.
GMW_HD inline void block_panels(int64_t id, bool self, int PI, int PJ, int& p, int& q) {
  if (!self) {
    p = int(id / PJ);
    q = int(id % PJ);
    return;
  }
  // Root of p^2 - (2 P + 1) p + 2 id = 0, then corrected for its rounding.
  const double b = 2.0 * PI + 1.0;
  int64_t r = int64_t((b - sqrt(b * b - 8.0 * double(id))) / 2.0);
  r = r < 0 ? 0 : (r > PI - 1 ? PI - 1 : r);
  while (r > 0 && tri_row_start(r, PI) > id) --r;
  while (r + 1 < PI && tri_row_start(r + 1, PI) <= id) ++r;
  p = int(r);
  q = int(r + (id - tri_row_start(r, PI)));
}

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

// threadIdx.x, read afresh where it is used: the tensor-core phases' fragment addresses are cheap to rebuild per
// tile, and hoisted out of the tile loop they would stay live across the K phase (register pressure, spills).
__device__ __forceinline__ int fresh_tid() {
#if defined(__CUDA_ARCH__)
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
#else
  return int(threadIdx.x);
#endif
}

// Lane partials of one bandwidth (all lanes call it: the band loop is uniform across the block): a and b summed
// over the lanes l' = l mod P (P = kLaneParts<T>); lane l < P of warp w writes K = c sum w w r to
// part[(w P + l) 2 S] and U = sum w w x r to part[(w P + l) 2 S + S] (part: warp_part + s).
// FRESH (tensor-core kernels): the destination built from fresh_tid (no register held across the tile loop).
template <class T, bool FRESH = false>
__device__ __forceinline__ void band_partials(T a, T b, T c, T* part, int S) {
#pragma unroll
  for (int off = 16; off >= kLaneParts<T>; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  const int l = threadIdx.x & 31;
  if (l < kLaneParts<T>) {
    T* dst = part + (((FRESH ? unsigned(fresh_tid()) : threadIdx.x) >> 5) * kLaneParts<T> + l) * 2 * S;
    dst[0] = a * c;
    dst[S] = b;
  }
}

// Coordinates [c0, c0 + kcp) of rows [r0, r0 + kBT) of x (rows x d) into dst[k][r] (k-major, leading dimension
// kLd); zero outside the matrix.  kcp: the chunk's coordinates rounded up to a multiple of 4 (8 in the
// tensor-core kernels, whose D phase reads 8 at a time; coordinates kcp .. DK - 1 are left alone: only discarded
// outputs read them).  Thread
// t fills row t / 4, coordinates t % 4 + 4 j: one 64-bit row address per thread, then 32-bit offsets.  No shift:
// every difference a_ik - b_jk is formed directly (D and G phases), so neither a common offset nor an outlier
// costs accuracy.
template <class T>
__device__ __forceinline__ void load_chunk(T* dst, const T* __restrict__ x, int64_t rows, int64_t d, int64_t r0,
                                           int64_t c0, int kcp) {
  const int r = threadIdx.x >> 2, q = threadIdx.x & 3;
  const bool row_in = r0 + r < rows;
  const T* __restrict__ src = x + (row_in ? (r0 + r) * d + c0 : 0);
  const int kin = int(d - c0 < kcp ? d - c0 : kcp);  // coordinates inside the matrix
  for (int k = q; k < kcp; k += 4) dst[k * kLd + r] = (row_in && k < kin) ? src[k] : T(0);
}

// load_chunk with 16-byte loads (float, d % 4 == 0, x 16-byte aligned: TileArgs::vec4; the chunk's coordinates
// then a multiple of 4): thread t reads coordinates 4 (t % 4) + 16 j .. + 3 of row t / 4.
__device__ __forceinline__ void load_chunk4(float* dst, const float* __restrict__ x, int64_t rows, int64_t d,
                                            int64_t r0, int64_t c0, int kcp) {
  const int r = threadIdx.x >> 2, q = threadIdx.x & 3;
  const bool row_in = r0 + r < rows;
  const float* __restrict__ src = x + (row_in ? (r0 + r) * d + c0 : 0);
  const int kin = int(d - c0 < kcp ? d - c0 : kcp);  // coordinates inside the matrix (a multiple of 4)
  for (int k4 = 4 * q; k4 < kcp; k4 += 16) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row_in && k4 < kin) {
      GMW_CHECK_ALIGNED(src + k4, 16);
      v = *reinterpret_cast<const float4*>(src + k4);
    }
    dst[k4 * kLd + r] = v.x;
    dst[(k4 + 1) * kLd + r] = v.y;
    dst[(k4 + 2) * kLd + r] = v.z;
    dst[(k4 + 3) * kLd + r] = v.w;
  }
}

// Row-side or column-side slot update: first visit of the block stores, later visits add.
template <class T>
__device__ __forceinline__ void slot_put(T* p, T v, bool first) {
  *p = first ? v : *p + v;
}

// G phase, one side, for 4 rows of this thread and the coordinates tk + 16 l, l < NL, of the chunk (tk = tid / 16,
// uniform across each half-warp; tg = tid % 16):  o[r][k] = sum_u P(r, u) (own[r][k] - other[u][k]), with
// P(r, u) = Ps[r][u] on the row side (ROW) and Ps[u][r] on the column side; own / other are the shared chunks
// (k-major).  Rows: tg + 16 ii on the row side, 4 tg + ii on the column side (either way the 8 lanes of one
// 128-bit shared-memory phase read 8 different 16-byte chunks: no bank conflict).  Rows r < rows_left and
// coordinates k < kc go to slot[r (d + 1) + k] (stored on the first visit, added later).  NL is the number of
// 16-coordinate slices the chunk needs (ceil(kc / 16)); the caller runs only the threads with tk < kc, i.e.
// whole warps (d = 10: 5 of the 8 warps).
template <class T, int NL, bool ROW>
__device__ __forceinline__ void g_side(const T* Ps, const T* own_s, const T* oth_s, T* slot, int64_t rows_left, int kc,
                                       int64_t d, bool first) {
  const int tk = threadIdx.x >> 4;
  const int tg = threadIdx.x & 15;
  T own[NL][4];
  if (ROW) {
#pragma unroll
    for (int l = 0; l < NL; ++l)
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) own[l][ii] = own_s[(tk + 16 * l) * kLd + tg + 16 * ii];
  } else {
#pragma unroll
    for (int l = 0; l < NL; ++l) ld4<T>(own_s + (tk + 16 * l) * kLd + 4 * tg, own[l]);
  }
  T o[4][NL];
#pragma unroll
  for (int ii = 0; ii < 4; ++ii)
#pragma unroll
    for (int l = 0; l < NL; ++l) o[ii][l] = T(0);
#pragma unroll 1
  for (int u = 0; u < kBT; u += 4) {
    T pv[4][4], ov[NL][4];  // pv[ii][uu] = P(row ii of this thread, u + uu)
    if (ROW) {
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) ld4<T>(Ps + (tg + 16 * ii) * kLd + u, pv[ii]);
    } else {
      T pt[4][4];
#pragma unroll
      for (int uu = 0; uu < 4; ++uu) ld4<T>(Ps + (u + uu) * kLd + 4 * tg, pt[uu]);
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int uu = 0; uu < 4; ++uu) pv[ii][uu] = pt[uu][ii];
    }
#pragma unroll
    for (int l = 0; l < NL; ++l) ld4<T>(oth_s + (tk + 16 * l) * kLd + u, ov[l]);
#pragma unroll
    for (int ii = 0; ii < 4; ++ii)
#pragma unroll
      for (int l = 0; l < NL; ++l)
#pragma unroll
        for (int uu = 0; uu < 4; ++uu) o[ii][l] += pv[ii][uu] * (own[l][ii] - ov[l][uu]);
  }
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
    const int r = ROW ? tg + 16 * ii : 4 * tg + ii;
    if (r >= rows_left) continue;
#pragma unroll
    for (int l = 0; l < NL; ++l) {
      const int k = tk + 16 * l;
      if (k < kc) slot_put(slot + int64_t(r) * (d + 1) + k, o[ii][l], first);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core route of the float kernels (kTcMinD <= d <= 64, one chunk): the D and G phases as float64 GEMMs
// on the FP64 tensor cores (mma.m8n8k4.f64, sm_80 and later) on coordinates centred at c = row 0 of the I tile:
//   D_ij = |a'_i|^2 + |b'_j|^2 - 2 a'_i . b'_j,   a' = a - c, b' = b - c (float64, exact for float inputs);
//   row side    sum_j P_ij (a_i - b_j) = a'_i sum_j P_ij - (P B')_i,
//   column side sum_i P_ij (b_j - a_i) = b'_j sum_i P_ij - (P^T A')_j.
// The expanded forms cancel; in float64 their error is below (2 kc + 8) u R with u = 2^-53 and R the sum of the
// largest |a'_i|^2 and |b'_j|^2 of the tile pair, and a tile pair takes the route only when that bound is at
// most 2^-30 of the smallest bandwidth (tc_route_ok): every kernel value C / (C + D) then moves by under 1e-9
// relative, far inside the float contract.  Tile pairs holding a far outlier, a NaN or an infinity, and builds
// without the instruction, keep the CUDA-core D and G phases (differences formed directly).
#if defined(__CUDA_ARCH__)
#define GMW_TC_ROUTE (__CUDA_ARCH__ >= 800)
#elif defined(GMW_DMMA_MODEL)
#define GMW_TC_ROUTE 1
#else
#define GMW_TC_ROUTE 0
#endif

// c[0..1] += A B for the warp's 8 x 4 A (lane l holds A[l / 4][l % 4]) and 4 x 8 B (lane l holds B[l % 4][l / 4]);
// lane l holds C[l / 4][2 (l % 4) + e], e = 0, 1.  Every lane of the warp must call it.
__device__ __forceinline__ void dmma884(double (&c)[2], double a, double b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+d"(c[0]), "+d"(c[1])
               : "d"(a), "d"(b));
#elif defined(GMW_DMMA_MODEL)
  GMW_DMMA_MODEL(c, a, b);
#else
  (void)c, (void)a, (void)b;  // not reached: GMW_TC_ROUTE is 0
#endif
}

// dmma16x8x8 below as four m8n8k4 (sm_80): k = 0 .. 3, then 4 .. 7, for the top and the bottom 8 rows.
__device__ __forceinline__ void dmma16x8x8_as_884(double (&c)[4], const double (&a)[4], const double (&b)[2]) {
  double top[2] = {c[0], c[1]}, bottom[2] = {c[2], c[3]};
  dmma884(top, a[0], b[0]);
  dmma884(top, a[2], b[1]);
  dmma884(bottom, a[1], b[0]);
  dmma884(bottom, a[3], b[1]);
  c[0] = top[0], c[1] = top[1], c[2] = bottom[0], c[3] = bottom[1];
}

// c[0..3] += A B for the warp's 16 x 8 A (lane l = 4 g + t holds a[0] = A[g][t], a[1] = A[g + 8][t], a[2] =
// A[g][t + 4], a[3] = A[g + 8][t + 4]) and 8 x 8 B (b[0] = B[t][g], b[1] = B[t + 4][g]); lane l holds C[g][2 t + e]
// in c[e] and C[g + 8][2 t + e] in c[2 + e].  sm_90: one mma.m16n8k8.f64 (1024 multiply-adds); sm_80: the same
// product as four m8n8k4 (dmma16x8x8_as_884).  Every lane must call it.
__device__ __forceinline__ void dmma16x8x8(double (&c)[4], const double (&a)[4], const double (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+d"(c[0]), "+d"(c[1]), "+d"(c[2]), "+d"(c[3])
      : "d"(a[0]), "d"(a[1]), "d"(a[2]), "d"(a[3]), "d"(b[0]), "d"(b[1]));
#elif defined(GMW_DMMA16_MODEL)
  GMW_DMMA16_MODEL(c, a, b);
#else
  dmma16x8x8_as_884(c, a, b);
#endif
}

// Gate of the tensor-core route, one row per thread (threads 0 .. 2 kBT - 1, whole warps): t < kBT row t of the
// I tile, else row t - kBT of the J tile; its |row - c|^2 (0 outside the matrix) to tcs[kTcNorm + t] and the
// largest of its warp (a NaN or an infinity as infinity) to tcs[kTcWarpMax + t / 32].
__device__ __forceinline__ void tc_row_norm(const float* As, const float* Bs, double* tcs, int kc, int rows_i,
                                            int rows_j) {
  const int tid = fresh_tid();
  const bool side_j = tid >= kBT;
  const int r = tid & (kBT - 1);
  const float* src = side_j ? Bs : As;
  double n = 0.0;
  if (r < (side_j ? rows_j : rows_i)) {
    for (int q = 0; q < kc; ++q) {
      const double v = double(src[q * kLd + r]) - tcs[kTcCentre + q];
      n = fma(v, v, n);
    }
  }
  tcs[kTcNorm + tid] = n;
  double m = n == n ? n : HUGE_VAL;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, off));
  if ((tid & 31) == 0) tcs[kTcWarpMax + (tid >> 5)] = m;
}

// After tc_row_norm (and a barrier): the tile pair's bound (2 kc + 8) 2^-53 R on the absolute error of an expanded
// distance, R = the largest |a_i - c|^2 + the largest |b_j - c|^2.
__device__ __forceinline__ double tc_distance_error(const double* tcs, int kc) {
  const double R = fmax(tcs[kTcWarpMax], tcs[kTcWarpMax + 1]) + fmax(tcs[kTcWarpMax + 2], tcs[kTcWarpMax + 3]);
  return R * double(2 * kc + 8) * 0x1p-53;
}

// Whether the tile pair takes the route: its distance error at most 2^-30 of the smallest bandwidth.
__device__ __forceinline__ bool tc_route_ok(const double* tcs, int kc) {
  return tc_distance_error(tcs, kc) <= ldexp(tcs[kTcMinBand], -30);
}

// A distance the expanded form cannot resolve to float precision (below 2^26 times its absolute error bound: a
// near pair in a tile whose centre is far, e.g. a far row of weight 0 at the head of a tight cluster), formed
// again from the coordinate differences, as on the CUDA cores.  Such pairs carry the MMD^2 through 1 - k = D / (C + D),
// which needs D to relative precision, not to the bandwidth's.
__device__ __forceinline__ double tc_direct_distance(const float* As, const float* Bs, int i, int j, int kc) {
  double D = 0.0;
  for (int q = 0; q < kc; ++q) {
    const double v = double(As[q * kLd + i]) - double(Bs[q * kLd + j]);
    D = fma(v, v, D);
  }
  return D;
}

// D phase on tensor cores: Ds[i][j] = |a'_i|^2 + |b'_j|^2 - 2 a'_i . b'_j (float, leading dimension kLd), negative
// rounding clamped to 0.  Warp w: rows 16 (w / 2) .. + 16, columns 32 (w % 2) .. + 32 (4 blocks of 16 x 8), 8
// coordinates per step (the tiles hold zeros up to a multiple of 8).  Rows outside the matrices (zeros in the
// tiles, norm 0) get finite distances or +inf in float, never NaN: their pairs have weight 0 and are masked, as on
// the CUDA-core route.
__device__ __forceinline__ void tc_distances(const float* As, const float* Bs, const double* tcs, float* Ds, int kc) {
  const int tid = fresh_tid(), w = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
  const int rb = 16 * (w >> 1), cb = 32 * (w & 1);
  double acc[4][4];
#pragma unroll
  for (int n = 0; n < 4; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0;
  for (int k0 = 0; k0 < kc; k0 += 8) {  // coordinates k0 + t (+ 4) >= kc are zero in the tiles and in the centre
    const int k = k0 + t;
    const double c0 = tcs[kTcCentre + k], c1 = tcs[kTcCentre + k + 4];
    const double af[4] = {double(As[k * kLd + rb + g]) - c0, double(As[k * kLd + rb + g + 8]) - c0,
                          double(As[(k + 4) * kLd + rb + g]) - c1, double(As[(k + 4) * kLd + rb + g + 8]) - c1};
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int j = cb + 8 * n + g;
      const double bf[2] = {double(Bs[k * kLd + j]) - c0, double(Bs[(k + 4) * kLd + j]) - c1};
      dmma16x8x8(acc[n], af, bf);
    }
  }
  const double resolve = ldexp(tc_distance_error(tcs, kc), 26);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = rb + g + 8 * h;
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = cb + 8 * n + 2 * t + e;
        double D = tcs[kTcNorm + i] + tcs[kTcNorm + kBT + j] - 2.0 * acc[n][2 * h + e];
        if (D < resolve) D = tc_direct_distance(As, Bs, i, j, kc);  // exact to float; a NaN stays NaN
        Ds[i * kLd + j] = float(D < 0.0 ? 0.0 : D);
      }
  }
}

// G phase, one side, on tensor cores: o(r, k) = own'(r, k) psum(r) - sum_u P(r, u) oth'(u, k) for the kc
// coordinates, P(r, u) = Ps[r][u] on the row side (ROW), Ps[u][r] on the column side; psum = the float64 line
// sums of P on that side.  Rows r < rows_left go to slot[r (d + 1) + k] (stored on the first visit, added later).
// Warp w: rows 16 (w / 2) .. + 16, coordinates 32 (w % 2) .. + 32 (4 blocks of 16 x 8), 8 partners per step; only
// warps with coordinates call it (32 (w % 2) < kc).
template <bool ROW>
__device__ __forceinline__ void tc_g_side(const float* Ps, const float* own_s, const float* oth_s, const double* tcs,
                                          const double* psum, float* slot, int64_t rows_left, int kc, int64_t d,
                                          bool first) {
  const int tid = fresh_tid(), w = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
  const int rb = 16 * (w >> 1), kb = 32 * (w & 1);
  double ck[4], acc[4][4];
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    ck[n] = tcs[kTcCentre + kb + 8 * n + g];
    acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0;
  }
#pragma unroll 2
  for (int u0 = 0; u0 < kBT; u0 += 8) {  // P is 0 on rows and columns outside the matrices
    const int u = u0 + t, r = rb + g;
    const double af[4] = {double(ROW ? Ps[r * kLd + u] : Ps[u * kLd + r]),
                          double(ROW ? Ps[(r + 8) * kLd + u] : Ps[u * kLd + r + 8]),
                          double(ROW ? Ps[r * kLd + u + 4] : Ps[(u + 4) * kLd + r]),
                          double(ROW ? Ps[(r + 8) * kLd + u + 4] : Ps[(u + 4) * kLd + r + 8])};
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const float* o = oth_s + (kb + 8 * n + g) * kLd + u;
      const double bf[2] = {double(o[0]) - ck[n], double(o[4]) - ck[n]};
      dmma16x8x8(acc[n], af, bf);
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = rb + g + 8 * h;
    if (r >= rows_left) continue;
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int k = kb + 8 * n + 2 * t + e;
        if (k >= kc) continue;
        const double own = double(own_s[k * kLd + r]) - tcs[kTcCentre + k];
        slot_put(slot + int64_t(r) * (d + 1) + k, float(own * psum[r] - acc[n][2 * h + e]), first);
      }
  }
}

// TC: the tensor-core instantiation (float only; the host picks it by tensor_core_route).  The kernel without it
// carries none of that code, so its registers and instruction counts are those of the CUDA-core kernel.
template <class T, bool SELF, bool GRAD, bool TC = false>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 2 : 1) imq_tiles_kernel(const TileArgs<T> A) {
  constexpr int DK = ChunkDims<T>::value;
  constexpr int NL = DK / 16;  // most coordinates per thread and chunk in the G phase (g_side)
  GMW_DYNAMIC_SMEM(smem_raw);
  const SmemLayout L = smem_layout<T>(A.S, GRAD, TC);
  T* As = reinterpret_cast<T*>(smem_raw + L.As);
  T* Bs = reinterpret_cast<T*>(smem_raw + L.Bs);
  T* Ps = reinterpret_cast<T*>(smem_raw + L.Ps);
  T* Fs = reinterpret_cast<T*>(smem_raw + L.Fs);
  T* wI = reinterpret_cast<T*>(smem_raw + L.wI);
  T* wJ = reinterpret_cast<T*>(smem_raw + L.wJ);
  int64_t* gI = reinterpret_cast<int64_t*>(smem_raw + L.gI);  // group index of the tile rows (self, unbiased)
  int64_t* gJ = reinterpret_cast<int64_t*>(smem_raw + L.gJ);
  T* Lsum = reinterpret_cast<T*>(smem_raw + L.Lsum);            // [0] sum_j w_j Phi_ij, [1] sum_i w_i Phi_ij
  T* warp_part = reinterpret_cast<T*>(smem_raw + L.warp_part);  // [kWarps kLaneParts<T>][2 S]
  double* val = reinterpret_cast<double*>(smem_raw + L.val);    // [2 S] block accumulators
  const ImqBand<T>* bands = reinterpret_cast<const ImqBand<T>*>(smem_raw + L.bands);
  // [0] one scale for all bandwidths, [1] I_begin, [2] I_end, [3] Jq_begin, [4] J_end, [5] p == q, [6] the tile
  // pair's route (tensor cores): read from shared memory where used (after a barrier), so no register holds them
  // across the tile loop.
  int* info = reinterpret_cast<int*>(smem_raw + L.info);
  double* tcs = reinterpret_cast<double*>(smem_raw + L.tc);  // tensor-core route (float): see kTcCentre ...

  const int tid = threadIdx.x;
  const int S = A.S;
  const int64_t N = A.N, M = A.M, d = A.d;
  // The tensor-core route exists in this build and fits d (uniform across the grid); each tile pair then passes
  // its error gate or not (tc below).
  constexpr bool kTcBuild = TC && sizeof(T) == 4 && GMW_TC_ROUTE;
  const bool tc_possible = kTcBuild && A.tensor_cores && d >= kTcMinD && d <= DK;

  if (tid == 0) {
    info[0] = int(imq_make_bands<T>(A.bw, A.h, S, reinterpret_cast<ImqBand<T>*>(smem_raw + L.bands)));
    if (kTcBuild) {
      double cmin = S > 0 ? A.bw[0] : 0.0;
      for (int s = 1; s < S; ++s) cmin = A.bw[s] < cmin ? A.bw[s] : cmin;
      tcs[kTcMinBand] = cmin;
    }
    // Block -> panel pair (p, q); self: p <= q enumerated row by row.
    int p, q;
    block_panels(A.block0 + blockIdx.x, SELF, A.PI, A.PJ, p, q);
    info[1] = p * A.PSI;
    info[2] = min(info[1] + A.PSI, A.TI);
    info[3] = q * A.PSJ;
    info[4] = min(info[3] + A.PSJ, A.TJ);
    info[5] = int(p == q);
  }
  for (int s = tid; s < 2 * S; s += kThreads) val[s] = 0.0;
  __syncthreads();

  const int nchunks = d > 0 ? int((d + DK - 1) / DK) : 1;

  for (int I = info[1]; I < info[2]; ++I) {
    const int J_begin = (SELF && info[5]) ? I : info[3];
    for (int J = J_begin; J < info[4]; ++J) {
      // Pair phase: rows 4*ti .. 4*ti+3, columns 4*tj .. 4*tj+3 of the tile (tensor-core kernels: rebuilt per
      // tile, one register less across the tile loop).
      const int tid_p = TC ? fresh_tid() : tid;
      const int ti = tid_p >> 4;
      const int tj = tid_p & 15;
      const int64_t I0 = int64_t(I) * kBT;
      const int64_t J0 = int64_t(J) * kBT;

      // ---- D phase ----
      T D[4][4];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) D[ii][jj] = T(0);
      const int rows_i = int(N - I0 < kBT ? N - I0 : kBT), rows_j = int(M - J0 < kBT ? M - J0 : kBT);
      bool tc = false;  // this tile pair's D and G phases on tensor cores (uniform across the block)
      for (int c = 0; c < nchunks; ++c) {
        const int kc = int(d - int64_t(c) * DK < DK ? d - int64_t(c) * DK : DK);
        const int kcp = TC ? (kc + 7) & ~7 : (kc + 3) & ~3;  // (the tensor-core D phase reads 8 at a time)
        // One chunk: the row tile and its weights stay in shared memory for all the column tiles of a row.
        const bool new_rows = nchunks > 1 || J == J_begin;
        __syncthreads();  // every user of the shared tiles (previous chunk / tile) is done
        if constexpr (sizeof(T) == 4) {
          if (A.vec4) {
            if (new_rows) load_chunk4(As, A.a, N, d, I0, int64_t(c) * DK, kcp);
            load_chunk4(Bs, A.b, M, d, J0, int64_t(c) * DK, kcp);
          }
        }
        if (!(sizeof(T) == 4 && A.vec4)) {  // 4-byte loads
          if (new_rows) load_chunk<T>(As, A.a, N, d, I0, int64_t(c) * DK, kcp);
          load_chunk<T>(Bs, A.b, M, d, J0, int64_t(c) * DK, kcp);
        }
        if (c == 0) {
          if (tid < kBT && new_rows) {
            wI[tid] = (I0 + tid < N) ? A.wa[I0 + tid] : T(0);
            gI[tid] = (I0 + tid) / A.group;  // one 64-bit division per row, not one per pair
          } else if (tid < 2 * kBT) {
            const int r = tid - kBT;
            wJ[r] = (J0 + r < M) ? A.wb[J0 + r] : T(0);
            gJ[r] = (J0 + r) / A.group;
          }
        }
        __syncthreads();
        if constexpr (kTcBuild) {
          if (tc_possible) {  // one chunk: c == 0, kc == d
            // The centre and the row tile's norms change with the row tile only.
            if (tid < kBT && new_rows) {
              const int k = fresh_tid();
              tcs[kTcCentre + k] = k < kc ? double(As[k * kLd]) : 0.0;
            }
            __syncthreads();
            if (tid < 2 * kBT && (new_rows || tid >= kBT)) tc_row_norm(As, Bs, tcs, kc, rows_i, rows_j);
            __syncthreads();
            tc = tc_route_ok(tcs, kc);
            if (tid == 0) info[6] = int(tc);
            if (tc) tc_distances(As, Bs, tcs, Ps, kc);
          }
        }
        if (!tc) {
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
      }
#ifdef GMW_EMU_TILE
      if (tid == 0) GMW_EMU_TILE(tc);
#endif
      if (tc) {  // this thread's 4 x 4 distances (Ps is overwritten with P below by the same thread)
        __syncthreads();
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) ld4<T>(Ps + (4 * ti + ii) * kLd + 4 * tj, D[ii]);
      }

      // ---- K phase ----
      T wpair[4][4];
      unsigned okmask = 0xFFFFu;  // bit 4 ii + jj: pair allowed
      // Every pair of the tile is allowed unless it is a last (partial) tile, a self diagonal tile or, unbiased,
      // the two tiles share a group (uniform across the block).
      const bool edge_tile = I0 + kBT > N || J0 + kBT > M || (SELF && (I == J || (A.unbiased && gI[kBT - 1] >= gJ[0])));
      {
        T wi[4], wj[4];
        ld4<T>(wI + 4 * ti, wi);
        ld4<T>(wJ + 4 * tj, wj);
#pragma unroll
        for (int ii = 0; ii < 4; ++ii)
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) wpair[ii][jj] = wi[ii] * wj[jj];
        if (edge_tile) {
          okmask = 0;
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
              wpair[ii][jj] = ok ? wpair[ii][jj] : T(0);
              okmask |= unsigned(ok) << (4 * ii + jj);
            }
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
      // Values: sums of w w r (a*, K_s = c_s a) and of w w (1 - k) (b*) per bandwidth, see imq_band_acc
      // and imq_pick_value; one reciprocal per bandwidth and pair.  The flag is read per tile (after a barrier):
      // no register holds it across the tile loop.
      if (info[0]) {
        // One scale for every bandwidth: x, its cap and w x once per pair (x overwrites D).
        const T inv_ref = bands[0].inv_ref;
        T wx[4][4];
#pragma unroll
        for (int ii = 0; ii < 4; ++ii)
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            D[ii][jj] = imq_group_x(D[ii][jj], inv_ref);
            wx[ii][jj] = wpair[ii][jj] * D[ii][jj];
          }
#pragma unroll(GRAD ? 2 : 1)
        for (int s = 0; s < S; ++s) {
          const ImqBand<T> B = bands[s];
          T a = T(0), b = T(0);
#pragma unroll
          for (int ii = 0; ii < 4; ++ii)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj)
              imq_band_acc<T, T, GRAD>(D[ii][jj], wpair[ii][jj], wx[ii][jj], B.c, B.hc, B.qr, a, b, phi[ii][jj],
                                       psi[ii][jj]);
          band_partials<T, TC>(a, b, B.c, warp_part + s, S);
        }
      } else {
        // One scale per bandwidth (bandwidths spanning more than kImqMaxScaleRatio): x per pair and bandwidth.
#pragma unroll 1
        for (int s = 0; s < S; ++s) {
          const ImqBand<T> B = bands[s];
          T a = T(0), b = T(0);
#pragma unroll
          for (int ii = 0; ii < 4; ++ii)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
              const T x = imq_group_x(D[ii][jj], B.inv_ref);
              imq_band_acc<T, T, GRAD>(x, wpair[ii][jj], wpair[ii][jj] * x, B.c, B.hc, B.qr, a, b, phi[ii][jj],
                                       psi[ii][jj]);
            }
          band_partials<T, TC>(a, b, B.c, warp_part + s, S);
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
      if constexpr (kTcBuild) tc = info[6];  // (no register holds the flag across the K phase)

      // ---- L phase ----
      for (int s = tid; s < 2 * S; s += kThreads) {
        double v = 0.0;
        for (int w = 0; w < kWarps * kLaneParts<T>; ++w) v += double(warp_part[w * 2 * S + s]);
        val[s] += v;
      }
      if (GRAD) {
        // Weighted Phi line sums: threads 0..63 the rows, 64..127 the columns (with the column side).
        if (tid < kBT) {
          const int r = tid;
          T s = T(0);
          for (int u = 0; u < kBT; ++u) {
            const int j = (u + r) & (kBT - 1);  // rotated start: conflict-free shared reads
            s += Fs[r * kLd + j] * wJ[j];
          }
          Lsum[r] = s;
        } else if (tid < 2 * kBT && A.b_grad) {
          const int cidx = tid - kBT;
          T s = T(0);
          for (int i = 0; i < kBT; ++i) s += Fs[i * kLd + cidx] * wI[i];
          Lsum[kBT + cidx] = s;
        }
        if (tc) {
          // Float64 line sums of P for the tensor-core G phase: threads 128 .. 191 the rows, 192 .. 255 the columns.
          if (tid >= 2 * kBT && tid < 3 * kBT) {
            const int r = fresh_tid() - 2 * kBT;
            double s = 0.0;
            for (int v = 0; v < kBT; ++v) s += double(Ps[r * kLd + ((v + r) & (kBT - 1))]);
            tcs[kTcLineSum + r] = s;
          } else if (tid >= 3 * kBT && A.b_grad) {
            const int cidx = fresh_tid() - 3 * kBT;
            double s = 0.0;
            for (int v = 0; v < kBT; ++v) s += double(Ps[v * kLd + cidx]);
            tcs[kTcLineSum + kBT + cidx] = s;
          }
        }
      }
      __syncthreads();

      if (GRAD) {
        // ---- G phase ----
        const bool first_i = (J == J_begin);  // first visit of this block to its row-side slot rows of I
        const bool first_j = (I == info[1]);  // first visit of this block to its column-side slot rows of J
        const int64_t wb = blockIdx.x;        // the block's slot regions within the wave
        T* si = A.slot_i + (wb * A.PSI * kBT + (I0 - int64_t(info[1]) * kBT)) * (d + 1);
        T* sj = A.b_grad ? A.slot_j + (wb * A.PSJ * kBT + (J0 - int64_t(info[3]) * kBT)) * (d + 1) : nullptr;
        if (tid < kBT) {
          if (I0 + tid < N) slot_put(si + int64_t(tid) * (d + 1) + d, Lsum[tid], first_i);
        } else if (tid < 2 * kBT && A.b_grad) {
          const int r = tid - kBT;
          if (J0 + r < M) slot_put(sj + int64_t(r) * (d + 1) + d, Lsum[kBT + r], first_j);
        }
        if constexpr (kTcBuild) {
          // One chunk (kc = d): the warps whose 32 coordinates start below d.
          if (tc && 32 * ((tid >> 5) & 1) < d) {
            tc_g_side<true>(Ps, As, Bs, tcs, tcs + kTcLineSum, si, N - I0, int(d), d, first_i);
            if (A.b_grad) tc_g_side<false>(Ps, Bs, As, tcs, tcs + kTcLineSum + kBT, sj, M - J0, int(d), d, first_j);
          }
        }
        if (!tc) {
          for (int c = 0; c < nchunks; ++c) {
            if (nchunks > 1) {
              __syncthreads();
              const int kcp = (int(d - int64_t(c) * DK < DK ? d - int64_t(c) * DK : DK) + 3) & ~3;
              load_chunk<T>(As, A.a, N, d, I0, int64_t(c) * DK, kcp);
              load_chunk<T>(Bs, A.b, M, d, J0, int64_t(c) * DK, kcp);
              __syncthreads();
            }
            const int64_t c0 = int64_t(c) * DK;
            const int kc = int(d - c0 < DK ? d - c0 : DK);
            // Only the coordinate lanes a chunk holds: nl of the NL slices of 16 (d = 10: one of four).
            const int nl = (kc + 15) >> 4;
            T* si_c = si + c0;
            // Threads whose first coordinate tk = tid / 16 is padding have no G work: whole warps sit out (no
            // barrier below).
            if ((tid >> 4) < kc) {
              // Row side: sum_j P[i][j] (a[i][k] - b[j][k]), differences formed directly.
              if (nl <= 1)
                g_side<T, 1, true>(Ps, As, Bs, si_c, N - I0, kc, d, first_i);
              else if (nl == 2)
                g_side<T, (NL < 2 ? NL : 2), true>(Ps, As, Bs, si_c, N - I0, kc, d, first_i);
              else
                g_side<T, NL, true>(Ps, As, Bs, si_c, N - I0, kc, d, first_i);
              // Column side: sum_i P[i][j] (b[j][k] - a[i][k]) (A.b_grad is uniform across the block).
              if (A.b_grad) {
                T* sj_c = sj + c0;
                if (nl <= 1)
                  g_side<T, 1, false>(Ps, Bs, As, sj_c, M - J0, kc, d, first_j);
                else if (nl == 2)
                  g_side<T, (NL < 2 ? NL : 2), false>(Ps, Bs, As, sj_c, M - J0, kc, d, first_j);
                else
                  g_side<T, NL, false>(Ps, Bs, As, sj_c, M - J0, kc, d, first_j);
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

// sum_i wa_i * sum_j wb_j (fixed order).
template <class T>
__device__ double cross_pair_weight(const T* __restrict__ wa, int64_t n, const T* __restrict__ wb, int64_t m,
                                    double* red) {
  double sw = 0.0, sv = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += 256) sw += double(wa[i]);
  for (int64_t j = threadIdx.x; j < m; j += 256) sv += double(wb[j]);
  sw = block_sum256(sw, red);
  sv = block_sum256(sv, red);
  return sw * sv;
}

// sum_{g < h} s_g s_h over the masses s_g of the units of `unit` consecutive points, as sum_g s_g (s_0 + ... +
// s_{g-1}): non-negative terms only ((sum w)^2 - sum s_g^2 cancels when one unit holds nearly all the mass).
// Each thread takes a contiguous run of units (its pairs and its mass), then thread 0 adds the pairs between
// runs with a running prefix over the 256 run masses.  Fixed order.
template <class T>
__device__ double self_pair_weight(const T* __restrict__ wa, int64_t n, int64_t unit, double* red) {
  const int tid = threadIdx.x;
  const int64_t units = (n + unit - 1) / unit, per = (units + 255) / 256;
  double before = 0.0, pairs = 0.0;
  for (int64_t g = int64_t(tid) * per; g < std::min<int64_t>(units, int64_t(tid + 1) * per); ++g) {
    double s = 0.0;
    for (int64_t i = g * unit; i < std::min<int64_t>(n, (g + 1) * unit); ++i) s += double(wa[i]);
    pairs += s * before;
    before += s;
  }
  red[tid] = before;
  __syncthreads();
  double between = 0.0;
  if (tid == 0) {
    double run = 0.0;
    for (int t = 0; t < 256; ++t) {
      between += red[t] * run;
      run += red[t];
    }
  }
  __syncthreads();
  return block_sum256(pairs, red) + between;  // `between` is thread 0's; only thread 0 writes the output
}

// Value partials of one wave: K_s, U_s = the sums of its block partials in a fixed order, added to the running
// sums acc[2 S] of the earlier waves (first: none).  Last wave: values[s] = scale * pick(K_s, U_s, W) + (diag ?
// sum_i w_i^2 : 0) with W the exact (float64) total weight of the visited pairs (imq_pick_value); otherwise the
// running sums go back to acc.  One block, fixed summation order.
template <class T>
__global__ void __launch_bounds__(256)
    imq_values_finalize_kernel(const double* __restrict__ block_vals, int nblocks, int S, bool self, bool unbiased,
                               int64_t group, const T* __restrict__ wa, int64_t n, const T* __restrict__ wb, int64_t m,
                               double* __restrict__ acc, bool first, bool last, double* __restrict__ out) {
  __shared__ double red[256];
  const int tid = threadIdx.x;
  double wtot = 0.0, diag = 0.0;
  if (last) {
    double sw2 = 0.0;
    for (int64_t i = tid; i < n; i += 256) sw2 += double(wa[i]) * double(wa[i]);
    sw2 = block_sum256(sw2, red);
    wtot = self ? self_pair_weight(wa, n, unbiased ? group : 1, red) : cross_pair_weight(wa, n, wb, m, red);
    diag = (self && !unbiased) ? sw2 : 0.0;  // self terms count the pairs i < j once (scale 2)
  }
  const double scale = self ? 2.0 : 1.0;
  for (int s = 0; s < S; ++s) {
    double k = 0.0, u = 0.0;
    for (int b = tid; b < nblocks; b += 256) {
      k += block_vals[int64_t(b) * 2 * S + s];
      u += block_vals[int64_t(b) * 2 * S + S + s];
    }
    k = block_sum256(k, red);
    u = block_sum256(u, red);
    if (tid == 0) {
      if (!first) {
        k += acc[s];
        u += acc[S + s];
      }
      if (last) {
        out[s] = scale * imq_pick_value(k, u, wtot) + diag;
      } else {
        acc[s] = k;
        acc[S + s] = u;
      }
    }
  }
}

// One launch of the tile kernel: blocks [b0, b1) (panel pairs (p0, q0) .. (p1, q1)), and the rows its gradient
// fold visits: rows [ra0, ra1) of a, then [rb0, rb1) of b (cross) or of a (self, disjoint from the first range).
struct Wave {
  int64_t b0, b1;
  int p0, q0, p1, q1;
  int64_t ra0, ra1, rb0, rb1;
  bool first, last;
};

// Gradient fold of one wave: for every visited (row, coordinate) the slots of the wave's blocks that hold it,
// summed in a fixed order in float64 and added to the running sums acc[(N + M) (d + 1)] of the earlier waves
// (null with a single wave).  Last wave (it visits every row): writes the gradients with the factors fa, fw
// and the analytic diagonal; otherwise stores the running sums.  Order within a wave:
//   self:  row-side slots of blocks (panel(row), q), q ascending, then column-side slots of (p, panel(row)),
//          p ascending;  cross: a rows the row-side slots of (panel(row), q); b rows the column-side slots of
//          (p, panel(row)).
template <class T>
__global__ void __launch_bounds__(256)
    imq_grad_finalize_kernel(const TileArgs<T> A, const Wave W, bool self, double fa, double fw, bool diag,
                             double* __restrict__ acc, T* __restrict__ da, T* __restrict__ dwa, T* __restrict__ db,
                             T* __restrict__ dwb) {
  const int64_t d1 = A.d + 1;
  const int64_t na = (W.ra1 - W.ra0) * d1;
  const int64_t total = na + (W.rb1 - W.rb0) * d1;
  const int64_t rows_i = int64_t(A.PSI) * kBT, rows_j = int64_t(A.PSJ) * kBT;
  double hsum = 0.0;
  if (diag && A.h) {
    for (int s = 0; s < A.S; ++s) hsum += A.h[s];
  }
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const bool second = e >= na;
    const int64_t r = second ? W.rb0 + (e - na) / d1 : W.ra0 + e / d1;
    const int64_t k = second ? (e - na) % d1 : e % d1;
    const bool b_side = second && !self;
    double v = 0.0;
    if (!b_side) {  // row side of a's row r: blocks (pr, q)
      const int pr = int(r / rows_i);
      if (pr >= W.p0 && pr <= W.p1) {
        const int qa = pr == W.p0 ? W.q0 : (self ? pr : 0);
        const int qb = pr == W.p1 ? W.q1 : A.PJ - 1;
        const int64_t id0 = self ? tri_row_start(pr, A.PI) - pr : int64_t(pr) * A.PJ;
        for (int q = qa; q <= qb; ++q) {
          v += double(A.slot_i[((id0 + q - W.b0) * rows_i + r - pr * rows_i) * d1 + k]);
        }
      }
    }
    if (self || b_side) {  // column side of row r of b (self: of a): blocks (p, c)
      const int c = int(r / rows_j);
      const int pa = W.p0 + (c < W.q0 ? 1 : 0);
      int pb = W.p1 - (c > W.q1 ? 1 : 0);
      if (self && pb > c) pb = c;
      for (int p = pa; p <= pb; ++p) {
        const int64_t id = self ? tri_row_start(p, A.PI) + c - p : int64_t(p) * A.PJ + c;
        v += double(A.slot_j[((id - W.b0) * rows_j + r - c * rows_j) * d1 + k]);
      }
    }
    const int64_t g = (b_side ? A.N + r : r) * d1 + k;
    if (acc && !W.first) v += acc[g];
    if (!W.last) {
      acc[g] = v;
    } else if (k < A.d) {
      (b_side ? db : da)[r * A.d + k] = T(fa * v);
    } else {
      const T* w = b_side ? A.wb : A.wa;
      double gw = fw * v;
      if (diag) gw += 2.0 * double(w[r]) * hsum;
      (b_side ? dwb : dwa)[r] = T(gw);
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tiling plan depends only on (N, M, d, element size, self, grad) and the slot budget, never on the device:
// the summation order, hence every bit of the results, is the same on any GPU (H100 SXM or PCIe, a MIG slice).
// kTargetBlocks panel pairs keep any GPU of up to 512 SMs (2 resident blocks each) busy whenever there are
// that many tile pairs; the gradient ops run the blocks in waves whose slots fit kSlotBudgetBytes.
constexpr int64_t kTargetBlocks = 1024;
constexpr double kSlotBudgetBytes = 512.0 * 1024 * 1024;

// Panels along a (PI) and b (PJ), of PSI and PSJ tiles.  The plan does not depend on b_grad, so the row side is
// summed in the same order (bitwise the same) with and without the column side.
inline void choose_panels(bool self, bool grad, int64_t d, size_t elem, double budget, int TI, int TJ, int& PI, int& PJ,
                          int& PSI, int& PSJ) {
  // Slot bytes of one tile row block (kBT rows of d + 1); a wave of kTargetBlocks blocks must fit the budget.
  const double tile_slot = double(kBT) * double(d + 1) * double(elem);
  const double max_tiles = grad ? std::floor(budget / (double(kTargetBlocks) * tile_slot)) : 1e18;
  if (self) {
    int64_t P0 = 1;
    while (P0 * (P0 + 1) / 2 < kTargetBlocks) ++P0;
    int64_t PS = std::max<int64_t>(1, TI / P0);
    PS = std::max<int64_t>(1, std::min<int64_t>(PS, int64_t(max_tiles / 2)));
    PSI = PSJ = int(PS);
    PI = PJ = int(ceil_div(TI, PS));
    return;
  }
  int64_t pi = int64_t(std::ceil(std::sqrt(double(kTargetBlocks) * TI / TJ)));
  pi = std::max<int64_t>(1, std::min<int64_t>(pi, TI));
  int64_t pj = std::max<int64_t>(1, std::min<int64_t>(ceil_div(kTargetBlocks, pi), TJ));
  int64_t psi = std::max<int64_t>(1, TI / pi), psj = std::max<int64_t>(1, TJ / pj);
  if (double(psi + psj) > max_tiles) {
    const double f = std::max(2.0, max_tiles) / double(psi + psj);
    psi = std::max<int64_t>(1, int64_t(double(psi) * f));
    psj = std::max<int64_t>(1, int64_t(double(psj) * f));
  }
  PSI = int(psi);
  PSJ = int(psj);
  PI = int(ceil_div(TI, psi));
  PJ = int(ceil_div(TJ, psj));
}

struct TilePlan {
  int64_t blocks;           // panel pairs in all
  int64_t wave_blocks;      // most blocks of one launch (gradient ops: slots of one wave <= the budget)
  double block_slot_bytes;  // slot bytes of one block (both sides, whether or not b_grad)
};

// Fills the tiling fields of A (TI, TJ, panels) and returns the plan.
template <class T>
inline TilePlan plan_tiles(TileArgs<T>& A, bool self, bool grad, double budget = kSlotBudgetBytes) {
  A.TI = int(ceil_div(A.N, kBT));
  A.TJ = int(ceil_div(A.M, kBT));
  choose_panels(self, grad, A.d, sizeof(T), budget, A.TI, A.TJ, A.PI, A.PJ, A.PSI, A.PSJ);
  A.block0 = 0;
  TilePlan P;
  P.blocks = self ? int64_t(A.PI) * (A.PI + 1) / 2 : int64_t(A.PI) * A.PJ;
  P.block_slot_bytes = grad ? double(A.PSI + A.PSJ) * kBT * double(A.d + 1) * double(sizeof(T)) : 0.0;
  P.wave_blocks = grad ? std::max<int64_t>(1, int64_t(budget / P.block_slot_bytes)) : P.blocks;
  P.wave_blocks = std::min(P.wave_blocks, std::max<int64_t>(P.blocks, 1));
  return P;
}

// Blocks of row p of the panel grid and the id of its first block.
template <class T>
inline int64_t grid_row_len(const TileArgs<T>& A, bool self, int p) {
  return self ? A.PI - p : A.PJ;
}
template <class T>
inline int64_t grid_row_start(const TileArgs<T>& A, bool self, int p) {
  return self ? tri_row_start(p, A.PI) : int64_t(p) * A.PJ;
}

// The waves, in order: whole consecutive grid rows while they fit the wave's limit, the rest of a longer row in
// equal chunks; the last two waves share what is left (a wave's limit is then half of it) and the last one takes all
// that remains.  A wave's fold then visits about as many rows as its blocks hold, and every wave of a
// multi-wave plan holds more than wave_blocks / 2 blocks (rows never grow along the enumeration).
template <class T>
inline std::vector<Wave> plan_waves(const TileArgs<T>& A, bool self, const TilePlan& P) {
  std::vector<Wave> out;
  const int rows = A.PI;
  int64_t b = 0;
  while (b < P.blocks) {
    Wave w;
    int p, q;
    block_panels(b, self, A.PI, A.PJ, p, q);
    const int64_t rem = P.blocks - b;
    const int64_t limit = rem <= 2 * P.wave_blocks ? ceil_div(rem, 2) : P.wave_blocks;
    const int64_t len = grid_row_len(A, self, p), rs = grid_row_start(A, self, p);
    int64_t e;
    if (rem <= P.wave_blocks) {
      e = P.blocks;
    } else if (b == rs && len <= limit) {
      e = rs + len;
      for (int r = p + 1; r < rows && e + grid_row_len(A, self, r) - b <= limit; ++r) {
        e += grid_row_len(A, self, r);
      }
    } else {
      const int64_t left = rs + len - b;  // the rest of the row, in equal chunks of at most `limit`
      e = b + ceil_div(left, ceil_div(left, limit));
    }
    w.b0 = b;
    w.b1 = e;
    block_panels(b, self, A.PI, A.PJ, w.p0, w.q0);
    block_panels(e - 1, self, A.PI, A.PJ, w.p1, w.q1);
    const int64_t ri = int64_t(A.PSI) * kBT, rj = int64_t(A.PSJ) * kBT;
    const int qa = w.p0 == w.p1 ? w.q0 : (self ? w.p0 : 0);
    const int qb = w.p0 == w.p1 ? w.q1 : A.PJ - 1;
    w.ra0 = w.p0 * ri;
    w.ra1 = std::min<int64_t>(A.N, (w.p1 + 1) * ri);
    w.rb0 = A.b_grad ? qa * rj : 0;
    w.rb1 = A.b_grad ? std::min<int64_t>(A.M, (qb + 1) * rj) : 0;
    w.first = b == 0;
    w.last = e == P.blocks;
    if (w.last) {  // the last fold writes every gradient row
      w.ra0 = 0;
      w.ra1 = A.N;
      w.rb0 = 0;
      w.rb1 = (!self && A.b_grad) ? A.M : 0;
    }
    if (self && w.rb0 < w.ra1 && w.ra0 < w.rb1) {  // one range: each row is folded by one thread
      w.ra0 = std::min(w.ra0, w.rb0);
      w.ra1 = std::max(w.ra1, w.rb1);
    }
    if (self && (w.rb0 >= w.ra0 && w.rb1 <= w.ra1)) w.rb0 = w.rb1 = 0;
    out.push_back(w);
    b = e;
  }
  return out;
}

// Slot elements (row side, column side) of one wave of the gradient ops.
template <class T>
inline void slot_sizes(const TileArgs<T>& A, const TilePlan& P, int64_t& ni, int64_t& nj) {
  ni = P.wave_blocks * A.PSI * kBT * (A.d + 1);
  nj = A.b_grad ? P.wave_blocks * A.PSJ * kBT * (A.d + 1) : 0;
}

// Grid of the gradient fold of one wave (any grid gives the same bits: each element is summed by one thread).
inline int grad_finalize_blocks(const Wave& W, int64_t d, int sms) {
  const int64_t n = (W.ra1 - W.ra0 + W.rb1 - W.rb0) * (d + 1);
  return int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, 256), int64_t(sms) * 8)));
}

}  // namespace imq_cuda
}  // namespace gmwae_fast
