// One token through a linear layer (out = x W^T + b, x of one row): the decode step of a single
// stream, where every weight is read once per token and the layer is bound by memory bandwidth.
// oneDNN's packed GEMM reaches ~20 GB/s there on these 2-core machines; streaming the row-major
// weight four output rows at a time with 64-byte loads reaches ~29 GB/s, so one stream's tokens
// come 1.3-1.5x faster. bf16 weights use AVX512-BF16's dot-product instruction where the CPU
// has it (bf16 products are exact in fp32, so only the summation order differs from oneDNN's);
// otherwise they are widened to fp32. Accumulation is fp32 throughout.
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



constexpr int64_t kRowsPerStep = 4;   // output rows sharing each 64-byte load of x
constexpr int64_t kRowsPerTask = 32;  // output rows per parallel task

// Output rows [n_begin, n_end) of out = x W^T + bias, x already widened to fp32 (xf, K floats).
template <typename T>
S1_INLINE void gemv_rows(T* out, const float* xf, const T* w, const T* bias, int64_t n_begin, int64_t n_end,
                         int64_t K) {
  const int64_t whole = K / 16 * 16;
  int64_t n = n_begin;
  for (; n + kRowsPerStep <= n_end; n += kRowsPerStep) {
    vec16 acc[kRowsPerStep] = {};
    for (int64_t k = 0; k < whole; k += 16) {
      const vec16 xv = load16(xf + k);
      for (int r = 0; r < kRowsPerStep; ++r) acc[r] += load16(w + (n + r) * K + k) * xv;
    }
    for (int r = 0; r < kRowsPerStep; ++r) {
      float s = hsum16(acc[r]);
      for (int64_t k = whole; k < K; ++k) s += static_cast<float>(w[(n + r) * K + k]) * xf[k];
      out[n + r] = static_cast<T>(bias == nullptr ? s : s + static_cast<float>(bias[n + r]));
    }
  }
  for (; n < n_end; ++n) {
    vec16 acc{};
    for (int64_t k = 0; k < whole; k += 16) acc += load16(w + n * K + k) * load16(xf + k);
    float s = hsum16(acc);
    for (int64_t k = whole; k < K; ++k) s += static_cast<float>(w[n * K + k]) * xf[k];
    out[n] = static_cast<T>(bias == nullptr ? s : s + static_cast<float>(bias[n]));
  }
}

#define S1_DEFINE_GEMV(T)                                                                                      \
  S1_ISA_VARIANTS(gemv_task, (T * out, const float* xf, const T* w, const T* bias, int64_t b, int64_t e, int64_t K), \
                  (out, xf, w, bias, b, e, K), gemv_rows<T>(out, xf, w, bias, b, e, K);)
S1_DEFINE_GEMV(float)
S1_DEFINE_GEMV(at::BFloat16)

#ifdef S1_HAVE_DPBF16
S1_INLINE void finish_dpbf16(at::BFloat16* out, const at::BFloat16* bias, int64_t row, float sum) {
  out[row] = static_cast<at::BFloat16>(bias == nullptr ? sum : sum + static_cast<float>(bias[row]));
}

// bf16 rows with VDPBF16PS: 32 bf16 products per instruction, x kept in bf16 (it is the model's
// bf16 activation). K must be a multiple of 32 (checked by the caller).
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void gemv_task_dpbf16(at::BFloat16* out, const at::BFloat16* x,
                                                                           const at::BFloat16* w,
                                                                           const at::BFloat16* bias, int64_t n_begin,
                                                                           int64_t n_end, int64_t K) {
  int64_t n = n_begin;
  for (; n + kRowsPerStep <= n_end; n += kRowsPerStep) {
    __m512 acc[kRowsPerStep] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < K; k += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      for (int r = 0; r < kRowsPerStep; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k), xv);
    }
    for (int r = 0; r < kRowsPerStep; ++r) finish_dpbf16(out, bias, n + r, _mm512_reduce_add_ps(acc[r]));
  }
  for (; n < n_end; ++n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w + n * K + k), (__m512bh)_mm512_loadu_si512(x + k));
    finish_dpbf16(out, bias, n, _mm512_reduce_add_ps(acc));
  }
}

bool cpu_has_dpbf16() {
  static const bool has = cpu_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  return has;
}
#endif

void linear_gemv(torch::Tensor out, const torch::Tensor& x, const torch::Tensor& weight,
                 const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.is_contiguous(), "x must be one contiguous row (1, in_features)");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1),
              "weight must be a contiguous (out_features, in_features) matrix matching x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "x and weight must both be float32 or both bfloat16");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == 1 && out.size(1) == weight.size(0) && out.is_contiguous() &&
                  out.scalar_type() == x.scalar_type(),
              "out must be a contiguous (1, out_features) row in x's dtype");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "bias must be (out_features,) in x's dtype");
  const int64_t N = weight.size(0), K = weight.size(1);
  if (x.scalar_type() == torch::kFloat) {
    const float* xf = x.data_ptr<float>();
    const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
      gemv_task(out.data_ptr<float>(), xf, weight.data_ptr<float>(), b, begin, end, K);
    });
    return;
  }
  const at::BFloat16* b = bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr;
#ifdef S1_HAVE_DPBF16
  if (cpu_has_dpbf16() && K % 32 == 0) {
    at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
      gemv_task_dpbf16(out.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), b,
                       begin, end, K);
    });
    return;
  }
#endif
  const torch::Tensor xf = x.to(torch::kFloat);
  at::parallel_for(0, N, kRowsPerTask, [&](int64_t begin, int64_t end) {
    gemv_task(out.data_ptr<at::BFloat16>(), xf.data_ptr<float>(), weight.data_ptr<at::BFloat16>(), b, begin, end, K);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s1serve, CPU, m) { m.impl("linear_gemv", &linear_gemv); }

}  // namespace s1serve
