// A tiny SIMT emulator: runs CUDA kernels written for csrc/*.cuh on the CPU, for testing without a GPU.
//
// Each block runs its threads as std::threads (one per CUDA thread); __syncthreads is a std::barrier over the
// block, warp shuffles exchange through a per-warp buffer between two warp barriers.  Blocks run one after the
// other, so a kernel's static __shared__ arrays can be function statics and the dynamic shared memory one buffer.
// Shared memory is filled with NaN bytes before each block, so a read of an unwritten entry shows up in the
// results.  Supported: threadIdx/blockIdx/blockDim/gridDim .x, __syncthreads, __shfl_xor_sync, float4,
// double2, dynamic shared memory through GMW_DYNAMIC_SMEM, the float64 mma.m8n8k4 (GMW_DMMA_MODEL: each
// output a chain of fused multiply-adds in k order; counted in gmw_emu::mma_count).  Device code is compiled by the
// host compiler, so
// `__CUDA_ARCH__` is undefined (imq_math.h then uses its host reciprocal, and for imq_rcp_approx the model
// gmw_emu::rcp_approx of the device instruction).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define GMW_DYNAMIC_SMEM(name) unsigned char* name = ::gmw_emu::dynamic_smem()
// The warp-wide float64 tensor-core mma (mma.m8n8k4.f64) of the kernels' dmma884.
#define GMW_DMMA_MODEL(c, a, b) ::gmw_emu::dmma884(c, a, b)
#define GMW_DMMA16_MODEL(c, a, b) ::gmw_emu::dmma16x8x8(c, a, b)
// Per tile pair (thread 0): which route its D and G phases took.
#define GMW_EMU_TILE(tc) ::gmw_emu::count_tile(tc)
// Vector loads/stores must be aligned on the GPU; the emulator checks it.
#define GMW_CHECK_ALIGNED(p, n) ::gmw_emu::check_aligned(p, n, __FILE__, __LINE__)

#define GMW_RCP_APPROX_MODEL(p) ::gmw_emu::rcp_approx(p)

using std::max;
using std::min;

struct gmw_emu_dim3 {
  unsigned x = 0, y = 1, z = 1;
};

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(16) double2 {
  double x, y;
};
inline double2 make_double2(double x, double y) { return double2{x, y}; }

namespace gmw_emu {

struct Warp {
  std::barrier<> bar{32};
  alignas(8) unsigned char slot[32][8];
  double mma_a[32][4], mma_b[32][2];  // operands of a warp-wide mma
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* smem = nullptr;
};

inline thread_local gmw_emu_dim3 tl_thread;
inline thread_local gmw_emu_dim3 tl_block;
inline gmw_emu_dim3 g_block_dim;
inline gmw_emu_dim3 g_grid_dim;
inline Block* g_block = nullptr;

// Model of the device's rcp.approx.ftz.f32 (imq_rcp_approx, GMW_RCP_APPROX_MODEL below): the correctly rounded
// reciprocal moved one ulp up (rcp_bias = +1) or down (-1), i.e. up to 1.5 ulp and always of one sign -- worse
// than the instruction's documented 1 ulp, so results within tolerance here are within it on the GPU; 0: exact.
inline int rcp_bias = 1;
inline float rcp_approx(float p) {
  const float r = 1.0f / p;
  if (rcp_bias == 0 || !(r == r) || r == 0.0f || r == HUGE_VALF || r == -HUGE_VALF) return r;
  return std::nextafter(r, rcp_bias > 0 ? HUGE_VALF : 0.0f);
}

inline unsigned char* dynamic_smem() { return g_block->smem; }

inline void check_aligned(const void* p, size_t n, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % n != 0) {
    std::fprintf(stderr, "%s:%d: misaligned %zu-byte vector access at %p\n", file, line, n, p);
    std::abort();
  }
}

// kernel<<<grid, block, smem>>>(args...), synchronously.
template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), unsigned grid, unsigned block, size_t smem_bytes, Args... args) {
  g_grid_dim = gmw_emu_dim3{grid, 1, 1};
  g_block_dim = gmw_emu_dim3{block, 1, 1};
  // Exactly smem_bytes (rounded up to the allocation granule): an overrun shows up under -fsanitize=address.
  const size_t bytes = std::max<size_t>(64, (smem_bytes + 63) / 64 * 64);
  unsigned char* buf = static_cast<unsigned char*>(std::aligned_alloc(64, bytes));
  for (unsigned b = 0; b < grid; ++b) {
    Block blk;
    blk.bar = std::make_unique<std::barrier<>>(std::ptrdiff_t(block));
    for (unsigned w = 0; w < (block + 31) / 32; ++w) blk.warps.push_back(std::make_unique<Warp>());
    std::memset(buf, 0xFF, bytes);  // NaN for float and double
    blk.smem = buf;
    g_block = &blk;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([=]() {
        tl_thread = gmw_emu_dim3{t, 1, 1};
        tl_block = gmw_emu_dim3{b, 1, 1};
        kernel(args...);
      });
    }
    for (auto& th : threads) th.join();
    g_block = nullptr;
  }
  std::free(buf);
}

}  // namespace gmw_emu

#define threadIdx (::gmw_emu::tl_thread)
#define blockIdx (::gmw_emu::tl_block)
#define blockDim (::gmw_emu::g_block_dim)
#define gridDim (::gmw_emu::g_grid_dim)

inline void __syncthreads() { ::gmw_emu::g_block->bar->arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  ::gmw_emu::Warp& w = *::gmw_emu::g_block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x & 31u;
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, w.slot[lane ^ unsigned(off)], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}

namespace gmw_emu {

inline std::atomic<long long> mma_count{0};  // warp-wide mma instructions run (per warp, not per lane)
inline std::atomic<long long> tc_tiles{0};   // tile pairs that took the tensor-core route (GMW_EMU_TILE)
inline std::atomic<long long> all_tiles{0};  // tile pairs visited

inline void count_tile(bool tc) {
  all_tiles.fetch_add(1, std::memory_order_relaxed);
  if (tc) tc_tiles.fetch_add(1, std::memory_order_relaxed);
}

// mma.sync.aligned.m8n8k4.row.col.f64: lane l gives A[l / 4][l % 4] and B[l % 4][l / 4] and holds C[l / 4][2 (l % 4)
// + e]; D = C + A B, here each output a chain of fused multiply-adds over k = 0 .. 3 (a model: the device's order
// of the four products may differ, which moves the last bits of a float64 sum only).
inline void dmma884(double (&c)[2], double a, double b) {
  Warp& w = *g_block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x & 31u;
  w.mma_a[lane][0] = a;
  w.mma_b[lane][0] = b;
  w.bar.arrive_and_wait();
  const unsigned g = lane >> 2, t = lane & 3u;
  for (unsigned e = 0; e < 2; ++e) {
    const unsigned n = 2 * t + e;
    double acc = c[e];
    for (unsigned k = 0; k < 4; ++k) acc = std::fma(w.mma_a[g * 4 + k][0], w.mma_b[n * 4 + k][0], acc);
    c[e] = acc;
  }
  if (lane == 0) mma_count.fetch_add(1, std::memory_order_relaxed);
  w.bar.arrive_and_wait();
}

// mma.sync.aligned.m16n8k8.row.col.f64 (sm_90), modelled from its documented fragments, not from the m8n8k4
// decomposition the kernels use on sm_80: lane l = 4 g + t gives A[g][t], A[g + 8][t], A[g][t + 4], A[g + 8][t + 4]
// and B[t][g], B[t + 4][g]; holds C[g][2 t + e] in c[e] and C[g + 8][2 t + e] in c[2 + e]; each output a chain of
// fused multiply-adds over k = 0 .. 7.
inline void dmma16x8x8(double (&c)[4], const double (&a)[4], const double (&b)[2]) {
  Warp& w = *g_block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x & 31u;
  for (int i = 0; i < 4; ++i) w.mma_a[lane][i] = a[i];
  w.mma_b[lane][0] = b[0];
  w.mma_b[lane][1] = b[1];
  w.bar.arrive_and_wait();
  auto A = [&](unsigned row, unsigned k) {  // the lane holding A[row][k] and its register
    return w.mma_a[4 * (row % 8) + k % 4][(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)];
  };
  auto B = [&](unsigned k, unsigned col) { return w.mma_b[4 * col + k % 4][k >= 4 ? 1 : 0]; };
  const unsigned g = lane >> 2, t = lane & 3u;
  for (unsigned h = 0; h < 2; ++h)
    for (unsigned e = 0; e < 2; ++e) {
      double acc = c[2 * h + e];
      for (unsigned k = 0; k < 8; ++k) acc = std::fma(A(g + 8 * h, k), B(k, 2 * t + e), acc);
      c[2 * h + e] = acc;
    }
  if (lane == 0) mma_count.fetch_add(4, std::memory_order_relaxed);  // in m8n8k4 units
  w.bar.arrive_and_wait();
}

}  // namespace gmw_emu
