// A bf16 linear layer (out = x W^T + b) on AMX tiles, for decode steps (PackedLinear gives it up
// to 64 rows). There every weight is read once per step and the layer is bound by memory
// bandwidth: oneDNN's AMX matmul streams the default model's weights at ~12-16 GB/s at 8-64 rows
// on these 2-core machines, this kernel at ~15-23 (`python bench/kernels.py --only linear`).
// The weight is packed once at load (`pack_for_amx` in server/models/packed_linear.py) into AMX
// B tiles of 32 input features x 16 outputs, one block of 16 outputs after another, so the whole
// matrix is one sequential stream for the hardware prefetchers. Two output blocks are computed
// together against one or two 16-row tiles of x, so each weight tile load feeds up to two
// products and each x tile load two. Accumulation is fp32, over the input features in one order
// whatever the number of rows: a row's result does not depend on the rows beside it.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define S1_HAVE_AMX 1
#endif

#include "isa.h"
#include "tile_linear_args.h"
#include "vec.h"

namespace s1serve {

// The CPU has AMX-TILE and AMX-BF16, Linux grants this process the tile state (ARCH_REQ_XCOMP_PERM
// for XTILEDATA, process-wide), and the AVX-512 build runs (a forced lower ISA turns AMX off too).
bool cpu_has_amx_bf16() {
#ifdef S1_HAVE_AMX
  static const bool has = [] {
    unsigned eax, ebx, ecx, edx;
    if (cpu_isa() != Isa::kAvx512 || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return tile && bf16 && syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return has;
#else
  return false;
#endif
}

namespace {

constexpr int64_t kTileRows = 16, kTileK = 32, kTileN = 16;  // an x tile: 16 rows x 32 features
constexpr int64_t kBlocksPerTask = 4;                         // output blocks of 16 per parallel task

#ifdef S1_HAVE_AMX
#define S1_TARGET_AMX __attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16")))

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Eight tiles of 16 rows x 64 bytes: 0-3 accumulators, 4-5 x, 6-7 weights.
S1_TARGET_AMX void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// Rows [m, m + 16 * MT) of x (padded to whole tiles) against NB output blocks whose weight tiles
// start at w (block j's K/32 tiles at w + j * 16 * K), into c: accumulator (row tile i, block j)
// is tile 2i + j, stored at c + 256 * (2i + j). (The tile intrinsics take register numbers as
// literals, hence the spelled-out cases.)
template <int MT, int NB>
S1_TARGET_AMX S1_INLINE void tile_products(float* c, const at::BFloat16* x, int64_t m, int64_t K,
                                           const at::BFloat16* w) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (MT > 1) _tile_zero(2);
  if constexpr (MT > 1 && NB > 1) _tile_zero(3);
  const int64_t x_stride = K * sizeof(at::BFloat16);
  for (int64_t k = 0; k < K; k += kTileK) {
    _tile_loadd(6, w + k * kTileN, 64);
    if constexpr (NB > 1) _tile_loadd(7, w + kTileN * K + k * kTileN, 64);
    _tile_loadd(4, x + m * K + k, x_stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT > 1) {
      _tile_loadd(5, x + (m + kTileRows) * K + k, x_stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  if constexpr (NB > 1) _tile_stored(1, c + 256, 64);
  if constexpr (MT > 1) _tile_stored(2, c + 512, 64);
  if constexpr (MT > 1 && NB > 1) _tile_stored(3, c + 768, 64);
}

// Rows [m, m + rows) of output block b from a 16 x 16 fp32 tile plus the bias, rounded to bf16
// (round to nearest even, as torch rounds).
S1_TARGET_AMX S1_INLINE void store_rows(at::BFloat16* out, int64_t N, const float* tile, const at::BFloat16* bias,
                                        int64_t m, int64_t rows, int64_t b) {
  const __m512 bias_v = bias == nullptr ? _mm512_setzero_ps() : static_cast<__m512>(load16(bias + b * kTileN));
  for (int64_t r = 0; r < rows; ++r)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m + r) * N + b * kTileN),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(tile + r * kTileN), bias_v)));
}

template <int NB>
S1_TARGET_AMX S1_INLINE void output_blocks(at::BFloat16* out, const at::BFloat16* x, const at::BFloat16* packed,
                                           const at::BFloat16* bias, int64_t M, int64_t M_padded, int64_t N,
                                           int64_t K, int64_t b, float* c) {
  for (int64_t m = 0; m < M_padded; m += 2 * kTileRows) {
    const int64_t row_tiles = std::min<int64_t>(2, (M_padded - m) / kTileRows);
    if (row_tiles == 2)
      tile_products<2, NB>(c, x, m, K, packed + b * kTileN * K);
    else
      tile_products<1, NB>(c, x, m, K, packed + b * kTileN * K);
    for (int64_t i = 0; i < row_tiles; ++i)
      for (int64_t j = 0; j < NB; ++j)
        store_rows(out, N, c + 256 * (2 * i + j), bias, m + kTileRows * i,
                   std::min<int64_t>(kTileRows, M - m - kTileRows * i), b + j);
  }
}

// Output blocks [b_begin, b_end) for all M rows, two blocks at a time.
S1_TARGET_AMX void linear_task(at::BFloat16* out, const at::BFloat16* x, const at::BFloat16* packed,
                               const at::BFloat16* bias, int64_t M, int64_t M_padded, int64_t N, int64_t K,
                               int64_t b_begin, int64_t b_end) {
  configure_tiles();
  alignas(64) float c[4 * kTileRows * kTileN];
  int64_t b = b_begin;
  for (; b + 2 <= b_end; b += 2) output_blocks<2>(out, x, packed, bias, M, M_padded, N, K, b, c);
  if (b < b_end) output_blocks<1>(out, x, packed, bias, M, M_padded, N, K, b, c);
  _tile_release();
}
#endif

void linear_amx(torch::Tensor out, const torch::Tensor& x, const torch::Tensor& packed,
                const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(cpu_has_amx_bf16(), "linear_amx needs AMX-BF16 (and the AVX-512 build)");
  [[maybe_unused]] const auto [M, K, N] = check_tile_linear_args(out, x, packed, bias);
#ifdef S1_HAVE_AMX
  const at::BFloat16* b = bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr;
  // Tiles load 16 rows of x: a batch that does not fill its last tile is copied, with zero rows
  // after it, into a buffer kept per thread (a padded tensor per call cost ~10% of a step's linears).
  const int64_t M_padded = (M + kTileRows - 1) / kTileRows * kTileRows;
  static thread_local std::vector<at::BFloat16> padded;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  if (M_padded != M) {
    padded.resize(M_padded * K);
    std::memcpy(padded.data(), xp, M * K * sizeof(at::BFloat16));
    std::memset(static_cast<void*>(padded.data() + M * K), 0, (M_padded - M) * K * sizeof(at::BFloat16));
    xp = padded.data();
  }
  at::parallel_for(0, N / kTileN, kBlocksPerTask, [&](int64_t begin, int64_t end) {
    linear_task(out.data_ptr<at::BFloat16>(), xp, packed.data_ptr<at::BFloat16>(), b, M, M_padded, N, K, begin, end);
  });
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(s1serve, CPU, m) { m.impl("linear_amx", &linear_amx); }

}  // namespace s1serve
