// A few rows through a linear layer (out = x W^T + b, x of M rows): decode steps of one to a few
// dozen streams, where every weight is read once per step and the layer is bound by memory
// bandwidth, or close to it. oneDNN's packed GEMM reaches ~20 GB/s at one row on these 2-core
// machines and ~14 GB/s at 13; streaming the row-major weight four rows at a time, each load
// shared by up to six rows of x and the rows ahead prefetched, reaches ~29 GB/s at one row. bf16
// weights use AVX512-BF16's dot-product instruction where the CPU has it (bf16 products are exact
// in fp32, so only the summation order differs from oneDNN's); otherwise they are widened to fp32.
// Accumulation is fp32 throughout, and each output is summed in one order whatever M is: a row's
// result does not depend on the rows beside it.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define S1_HAVE_DPBF16 1
#endif

#include "isa.h"
#include "vec.h"

namespace s1serve {
namespace {

constexpr int64_t kRowsPerTask = 32;  // weight rows per parallel task

// How many weight rows share each load of x (R) and x rows share each load of the weight (MR),
// per vector type: the R * MR accumulators, R weight vectors and one x vector must fit in the
// ISA's registers, or every FMA spills (at 4-6 rows AVX2 ran 3-10x slower than oneDNN with the
// AVX-512 shape). vec16: 29 of AVX-512's 32 registers; vec8: 13 of AVX2's 16.
template <typename V>
struct TileShape;
template <>
struct TileShape<vec16> {
  static constexpr int R = 4, MR = 6;
};
template <>
struct TileShape<vec8> {
  static constexpr int R = 4, MR = 2;
};

// Rows [m, m + MR) of x (widened to fp32, K floats apart) times weight rows [n, n + R): R * MR
// sums, each accumulated in the same order whatever MR is, so a row's result does not depend on
// how many rows share the step.
template <typename T, typename V, int R, int MR>
S1_INLINE void tile(T* out, int64_t ldo, const float* xf, const T* w, const T* bias, int64_t n, int64_t m,
                    int64_t K) {
  constexpr int64_t L = kLanes<V>;
  const int64_t whole = K / L * L;
  V acc[R][MR] = {};
  for (int64_t k = 0; k < whole; k += L) {
    V wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = load_lanes<V>(w + (n + r) * K + k);
      __builtin_prefetch(w + (n + 2 * R + r) * K + k, 0, 2);  // the next rows' line: memory overlaps the FMAs
    }
    for (int i = 0; i < MR; ++i) {
      const V xv = loadv<V>(xf + (m + i) * K + k);
      for (int r = 0; r < R; ++r) acc[r][i] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MR; ++i) {
      float s = hsum_lanes(acc[r][i]);
      for (int64_t k = whole; k < K; ++k) s += static_cast<float>(w[(n + r) * K + k]) * xf[(m + i) * K + k];
      out[(m + i) * ldo + n + r] = static_cast<T>(bias == nullptr ? s : s + static_cast<float>(bias[n + r]));
    }
}

// Weight rows [n, n + R) against x rows [m, M), MR at a time and the remainder in one smaller
// tile: the R weight rows come from memory once and from L1 for the other x rows.
template <typename T, typename V, int R, int MR = TileShape<V>::MR>
S1_INLINE void weight_rows(T* out, int64_t ldo, const float* xf, const T* w, const T* bias, int64_t n, int64_t m,
                           int64_t M, int64_t K) {
  for (; m + MR <= M; m += MR) tile<T, V, R, MR>(out, ldo, xf, w, bias, n, m, K);
  if constexpr (MR > 1)
    if (m < M) weight_rows<T, V, R, MR - 1>(out, ldo, xf, w, bias, n, m, M, K);
}

// Output columns [n_begin, n_end) of out = x W^T + bias for all M rows of x.
template <typename T, typename V>
S1_INLINE void linear_task_body(T* out, const float* xf, const T* w, const T* bias, int64_t M, int64_t N,
                                int64_t n_begin, int64_t n_end, int64_t K) {
  constexpr int R = TileShape<V>::R;
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) weight_rows<T, V, R>(out, N, xf, w, bias, n, 0, M, K);
  for (; n < n_end; ++n) weight_rows<T, V, 1>(out, N, xf, w, bias, n, 0, M, K);
}

#define S1_DEFINE_LINEAR_TASK(T)                                                                             \
  S1_ISA_VARIANTS(linear_task,                                                                               \
                  (T * out, const float* xf, const T* w, const T* bias, int64_t M, int64_t N, int64_t b,     \
                   int64_t e, int64_t K),                                                                    \
                  (out, xf, w, bias, M, N, b, e, K), linear_task_body<T, isa_vec>(out, xf, w, bias, M, N, b, e, K);)
S1_DEFINE_LINEAR_TASK(float)
S1_DEFINE_LINEAR_TASK(at::BFloat16)

#ifdef S1_HAVE_DPBF16
#define S1_TARGET_DPBF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))

// As tile(), with VDPBF16PS: 32 bf16 products per instruction, x kept in bf16 (it is the model's
// bf16 activation). K must be a multiple of 32 (checked by the caller).
template <int R, int MR>
S1_TARGET_DPBF16 S1_INLINE void tile_dpbf16(at::BFloat16* out, int64_t ldo, const at::BFloat16* x,
                                            const at::BFloat16* w, const at::BFloat16* bias, int64_t n, int64_t m,
                                            int64_t K) {
  __m512 acc[R][MR];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MR; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
      __builtin_prefetch(w + (n + 2 * R + r) * K + k, 0, 2);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m + i) * K + k);
      for (int r = 0; r < R; ++r) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], wv[r], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MR; ++i) {
      const float s = _mm512_reduce_add_ps(acc[r][i]);
      out[(m + i) * ldo + n + r] = static_cast<at::BFloat16>(bias == nullptr ? s : s + static_cast<float>(bias[n + r]));
    }
}

template <int R, int MR = TileShape<vec16>::MR>
S1_TARGET_DPBF16 S1_INLINE void weight_rows_dpbf16(at::BFloat16* out, int64_t ldo, const at::BFloat16* x,
                                                   const at::BFloat16* w, const at::BFloat16* bias, int64_t n,
                                                   int64_t m, int64_t M, int64_t K) {
  for (; m + MR <= M; m += MR) tile_dpbf16<R, MR>(out, ldo, x, w, bias, n, m, K);
  if constexpr (MR > 1)
    if (m < M) weight_rows_dpbf16<R, MR - 1>(out, ldo, x, w, bias, n, m, M, K);
}

S1_TARGET_DPBF16 void linear_task_dpbf16(at::BFloat16* out, const at::BFloat16* x, const at::BFloat16* w,
                                         const at::BFloat16* bias, int64_t M, int64_t N, int64_t n_begin,
                                         int64_t n_end, int64_t K) {
  constexpr int R = TileShape<vec16>::R;
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) weight_rows_dpbf16<R>(out, N, x, w, bias, n, 0, M, K);
  for (; n < n_end; ++n) weight_rows_dpbf16<1>(out, N, x, w, bias, n, 0, M, K);
}

#endif

void linear_few_rows(torch::Tensor out, const torch::Tensor& x, const torch::Tensor& weight,
                     const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.is_contiguous(), "x must be contiguous rows (M, in_features)");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1),
              "weight must be a contiguous (out_features, in_features) matrix matching x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "x and weight must both be float32 or both bfloat16");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == weight.size(0) && out.is_contiguous() &&
                  out.scalar_type() == x.scalar_type(),
              "out must be contiguous (M, out_features) in x's dtype");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "bias must be (out_features,) in x's dtype");
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  if (x.scalar_type() == torch::kFloat) {
    const float* xf = x.data_ptr<float>();
    const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
      linear_task(out.data_ptr<float>(), xf, weight.data_ptr<float>(), b, M, N, begin, end, K);
    });
    return;
  }
  const at::BFloat16* b = bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr;
#ifdef S1_HAVE_DPBF16
  if (cpu_has_dpbf16() && K % 32 == 0) {
    at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
      linear_task_dpbf16(out.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), b,
                         M, N, begin, end, K);
    });
    return;
  }
#endif
  const torch::Tensor xf = x.to(torch::kFloat);
  at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
    linear_task(out.data_ptr<at::BFloat16>(), xf.data_ptr<float>(), weight.data_ptr<at::BFloat16>(), b, M, N, begin,
                end, K);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s1serve, CPU, m) { m.impl("linear_few_rows", &linear_few_rows); }

}  // namespace s1serve
