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
// them, so the weight comes from memory once per step. Accumulation is fp32, over the input
// features in one order whatever the number of rows: a row's result does not depend on the rows
// beside it.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

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
template <int MR, int NB>
S1_TARGET_DPBF16 S1_INLINE void tile(at::BFloat16* out, int64_t N, const at::BFloat16* x, const at::BFloat16* w,
                                     const at::BFloat16* bias, int64_t m, int64_t b, int64_t K) {
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const at::BFloat16* wb = w + b * kBlock * K;
  const int32_t* xr[MR];  // each row's input features as pairs
  for (int i = 0; i < MR; ++i) xr[i] = reinterpret_cast<const int32_t*>(x + (m + i) * K);
  for (int64_t p = 0; p < K / 2; ++p) {
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
template <int NB, int MR = kTileRows>
S1_TARGET_DPBF16 S1_INLINE void blocks(at::BFloat16* out, int64_t N, const at::BFloat16* x, const at::BFloat16* w,
                                       const at::BFloat16* bias, int64_t m, int64_t M, int64_t b, int64_t K) {
  for (; m + MR <= M; m += MR) tile<MR, NB>(out, N, x, w, bias, m, b, K);
  if constexpr (MR > 1)
    if (m < M) blocks<NB, MR - 1>(out, N, x, w, bias, m, M, b, K);
}

// Output blocks [b_begin, b_end) for all M rows, kTileBlocks at a time and the remainder one by one.
S1_TARGET_DPBF16 void linear_task(at::BFloat16* out, const at::BFloat16* x, const at::BFloat16* w,
                                  const at::BFloat16* bias, int64_t M, int64_t N, int64_t K, int64_t b_begin,
                                  int64_t b_end) {
  int64_t b = b_begin;
  for (; b + kTileBlocks <= b_end; b += kTileBlocks) blocks<kTileBlocks>(out, N, x, w, bias, 0, M, b, K);
  for (; b < b_end; ++b) blocks<1>(out, N, x, w, bias, 0, M, b, K);
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
