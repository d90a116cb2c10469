// Prints the CUDA tiling plan of csrc/imq_mmd_cuda_kernels.cuh (host code only, no kernel runs) for the cases
// given on stdin, one per line: "self grad N M d elem [budget]" (elem 4 or 8; budget in bytes, default the
// kernels' slot budget).  One JSON object per case on stdout; tests/test_cuda_planner.py builds and drives it:
//
//   g++ -std=c++20 -O1 -pthread -Icsrc csrc/testing/imq_plan_dump.cpp -o /tmp/imq_plan && echo "1 1 65536 0 64 4" |
//   /tmp/imq_plan
#include "cuda_emu.h"
#include "../imq_mmd_cuda_kernels.cuh"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

using namespace gmwae_fast::imq_cuda;

namespace {

template <class T>
void dump(bool self, bool grad, int64_t N, int64_t M, int64_t d, double budget) {
  TileArgs<T> A{};
  A.N = N;
  A.M = self ? N : M;
  A.d = d;
  A.b_grad = true;
  const TilePlan P = plan_tiles(A, self, grad, budget);
  const std::vector<Wave> waves = plan_waves(A, self, P);
  // Waves: contiguous, in order, covering every block once; sizes; rows each fold visits per block row held.
  bool contiguous = !waves.empty() && waves.front().b0 == 0 && waves.back().b1 == P.blocks;
  int64_t min_wave = P.blocks, max_wave = 0;
  double max_fold_ratio = 0.0;
  for (size_t w = 0; w < waves.size(); ++w) {
    const Wave& x = waves[w];
    contiguous = contiguous && x.b1 > x.b0 && (w == 0 || x.b0 == waves[w - 1].b1);
    contiguous = contiguous && x.first == (w == 0) && x.last == (w + 1 == waves.size());
    if (w + 1 < waves.size()) min_wave = std::min(min_wave, x.b1 - x.b0);
    max_wave = std::max(max_wave, x.b1 - x.b0);
    if (w + 1 < waves.size()) {
      const double held = double(x.b1 - x.b0) * double(std::max(A.PSI, A.PSJ)) * kBT;
      max_fold_ratio = std::max(max_fold_ratio, double(x.ra1 - x.ra0 + x.rb1 - x.rb0) / held);
    }
  }
  // block_panels is the inverse of the grid enumeration (checked exhaustively on small grids).
  bool panels_ok = true;
  if (P.blocks <= 200000) {
    int64_t id = 0;
    for (int p = 0; p < A.PI && panels_ok; ++p) {
      for (int q = self ? p : 0; q < A.PJ; ++q, ++id) {
        int pp, qq;
        block_panels(id, self, A.PI, A.PJ, pp, qq);
        panels_ok = panels_ok && pp == p && qq == q;
      }
    }
    panels_ok = panels_ok && id == P.blocks;
  }
  const double tile_pairs = self ? double(A.TI) * (A.TI + 1) / 2 : double(A.TI) * A.TJ;
  std::printf(
      "{\"TI\": %d, \"TJ\": %d, \"PI\": %d, \"PJ\": %d, \"PSI\": %d, \"PSJ\": %d, \"blocks\": %lld, "
      "\"tile_pairs\": %.0f, \"wave_blocks\": %lld, \"slot_bytes\": %.0f, \"block_slot_bytes\": %.0f, "
      "\"waves\": %zu, \"min_wave\": %lld, \"max_wave\": %lld, \"last_wave\": %lld, \"contiguous\": %s, "
      "\"panels_ok\": %s, \"max_fold_ratio\": %.3f}\n",
      A.TI, A.TJ, A.PI, A.PJ, A.PSI, A.PSJ, (long long)P.blocks, tile_pairs, (long long)P.wave_blocks,
      double(P.wave_blocks) * P.block_slot_bytes, P.block_slot_bytes, waves.size(), (long long)min_wave,
      (long long)max_wave, (long long)(waves.back().b1 - waves.back().b0), contiguous ? "true" : "false",
      panels_ok ? "true" : "false", max_fold_ratio);
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    int self = 0, grad = 0, elem = 4;
    long long N = 0, M = 0, d = 0;
    double budget = kSlotBudgetBytes;
    if (!(in >> self >> grad >> N >> M >> d >> elem)) continue;
    in >> budget;
    if (elem == 8)
      dump<double>(self, grad, N, M, d, budget);
    else
      dump<float>(self, grad, N, M, d, budget);
    std::fflush(stdout);
  }
  return 0;
}
