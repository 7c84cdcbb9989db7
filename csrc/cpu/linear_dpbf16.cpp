// A bf16 linear layer (out = x W^T + b) in AVX512-BF16 registers, for decode steps on CPUs that
// have VDPBF16PS but no AMX (AMD Zen 4 and later, Intel Cooper Lake). It reads the weight in
// pack_for_amx's layout (server/models/packed_linear.py): for each pair of input features, the two
// weights of 16 outputs side by side in one 64-byte vector. One VDPBF16PS of that vector against the
// pair of x broadcast to every lane adds both products to 16 outputs at once, so a block's sums stay
// in one register from the first feature to the last and go straight to memory. linear_few_rows'
// row-major dot products instead end every output in a 16-lane horizontal sum, a third of the work
// at the default model's 576 inputs, and oneDNN's bf16 GEMM reaches ~240 GFLOP/s at 32 rows on these
// 2-core Zen 4 machines, two thirds of what it reaches at 512.
//
// A tile is 6 rows of x times 4 output blocks (24 accumulators, 4 weight vectors and a broadcast:
// 29 of the 32 registers); one task's blocks stay in L2 while every group of 6 rows passes over
// them, so the weight comes from memory once per step. The first group of rows waits on that read;
// the later groups, which find the weight in L2, request the next blocks' weight meanwhile, so that
// memory and arithmetic overlap (the default model's linears at 24 / 32 rows: 14.3 / 18.1 -> 9.4 / 11.8
// ms a step on a Zen 5 EPYC, bench/results/kernels-*-dpbf16-prefetch-ab.log; 1-6 rows, a single
// group, run the code they ran before). Accumulation is fp32, over the input
// features in one order whatever the number of rows: a row's result does not depend on the rows
// beside it.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define S1_HAVE_DPBF16 1
#endif

#include "isa.h"
#include "tile_linear_args.h"
#include "vec.h"

namespace s1serve {
namespace {

constexpr int64_t kBlock = 16;  // outputs per weight vector
constexpr int kTileRows = 6, kTileBlocks = 4;
constexpr int64_t kBlocksPerTask = 4;

#ifdef S1_HAVE_DPBF16
#define S1_TARGET_DPBF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))

// Rows [m, m + MR) of x against output blocks [b, b + NB), whose weight vectors start at
// w + b * 16 * K (one block's K/2 vectors back to back), into out with the bias, rounded to bf16
// (round to nearest even, as torch rounds).
// `ahead` lines of the weights from `next` on are requested into L2 meanwhile, spread over the loop.
template <int MR, int NB, bool kAhead>
S1_TARGET_DPBF16 S1_INLINE void tile(at::BFloat16* out, int64_t N, const at::BFloat16* x, const at::BFloat16* w,
                                     const at::BFloat16* bias, int64_t m, int64_t b, int64_t K, const char* next,
                                     int64_t ahead) {
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const at::BFloat16* wb = w + b * kBlock * K;
  const int32_t* xr[MR];  // each row's input features as pairs
  for (int i = 0; i < MR; ++i) xr[i] = reinterpret_cast<const int32_t*>(x + (m + i) * K);
  int64_t owed = 0;  // ahead / (K / 2) lines per step, carried as a running remainder
  for (int64_t p = 0; p < K / 2; ++p) {
    if constexpr (kAhead)
      for (owed += ahead; owed >= K / 2; owed -= K / 2, next += 64) _mm_prefetch(next, _MM_HINT_T1);
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wb + j * kBlock * K + p * 2 * kBlock);
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(xr[i][p]);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xv);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const __m512 bias_v = bias == nullptr ? _mm512_setzero_ps() : static_cast<__m512>(load16(bias + (b + j) * kBlock));
    for (int i = 0; i < MR; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m + i) * N + (b + j) * kBlock),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[i][j], bias_v)));
  }
}

// Output blocks [b, b + NB) for rows [m, M), MR rows at a time and the remainder in one smaller tile.
// The first tile reads the blocks' weights from memory; the later ones read them from L2 and
// meanwhile request the next blocks' weights (`next_lines` lines from `next`), so that the memory
// streams while the later tiles compute instead of only during the first.
template <int NB, int MR = kTileRows>
S1_TARGET_DPBF16 S1_INLINE void blocks(at::BFloat16* out, int64_t N, const at::BFloat16* x, const at::BFloat16* w,
                                       const at::BFloat16* bias, int64_t m, int64_t M, int64_t b, int64_t K,
                                       const char* next, int64_t next_lines) {
  for (; m + MR <= M; m += MR) {
    const int64_t ahead = m == 0 ? 0 : next_lines / ((M - m + MR - 1) / MR);  // an even share of what is left
    if (ahead > 0)
      tile<MR, NB, true>(out, N, x, w, bias, m, b, K, next, ahead);
    else
      tile<MR, NB, false>(out, N, x, w, bias, m, b, K, next, 0);
    next += 64 * ahead;
    next_lines -= ahead;
  }
  if constexpr (MR > 1)
    if (m < M) blocks<NB, MR - 1>(out, N, x, w, bias, m, M, b, K, next, next_lines);
}

// Output blocks [b_begin, b_end) for all M rows, kTileBlocks at a time and the remainder one by one.
S1_TARGET_DPBF16 void linear_task(at::BFloat16* out, const at::BFloat16* x, const at::BFloat16* w,
                                  const at::BFloat16* bias, int64_t M, int64_t N, int64_t K, int64_t b_begin,
                                  int64_t b_end) {
  const auto weights = [&](int64_t block) { return reinterpret_cast<const char*>(w + block * kBlock * K); };
  const int64_t group_lines = kTileBlocks * kBlock * K * 2 / 64;  // one group's weights, in cache lines
  int64_t b = b_begin;
  for (; b + kTileBlocks <= b_end; b += kTileBlocks) {
    const int64_t next_lines = std::min(group_lines, (b_end - b - kTileBlocks) * kBlock * K * 2 / 64);
    blocks<kTileBlocks>(out, N, x, w, bias, 0, M, b, K, weights(b + kTileBlocks), next_lines);
  }
  for (; b < b_end; ++b) blocks<1>(out, N, x, w, bias, 0, M, b, K, nullptr, 0);
}
#endif

void linear_dpbf16(torch::Tensor out, const torch::Tensor& x, const torch::Tensor& packed,
                   const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(cpu_has_dpbf16(), "linear_dpbf16 needs AVX512-BF16 (and the AVX-512 build)");
  [[maybe_unused]] const auto [M, K, N] = check_tile_linear_args(out, x, packed, bias);
#ifdef S1_HAVE_DPBF16
  const at::BFloat16* b = bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, N / kBlock, kBlocksPerTask, [&](int64_t begin, int64_t end) {
    linear_task(out.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), packed.data_ptr<at::BFloat16>(), b, M, N,
                K, begin, end);
  });
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(s1serve, CPU, m) { m.impl("linear_dpbf16", &linear_dpbf16); }

}  // namespace s1serve
