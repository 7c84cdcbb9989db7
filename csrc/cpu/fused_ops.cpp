// The decoder's small per-layer ops fused, one pass each over memory the step just wrote:
// residual add + RMSNorm, SiLU(gate) * up, and rotary embedding in place on q and k. On the CPU
// at batch 1 a layer's linears take ~0.4 ms and its ~30 element-wise torch ops add ~0.15 ms of
// dispatch and memory passes; these replace them with three calls. Every intermediate is
// rounded to the tensor's dtype where the torch reference (decoder.py) rounds it, so results
// match it to within fp32 summation order. Each body is compiled for AVX-512, AVX2+FMA and the
// baseline and picked by cpu_isa() (isa.h), which $S1SERVE_CPU_ISA can force for tests.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "isa.h"
#include "vec.h"

namespace s1serve {
namespace {

// fp32 leaves values as they are; bf16 rounds them like a bf16 torch op's result.
template <typename V>
S1_INLINE V round_as(V v, const float*) { return v; }
template <typename V>
S1_INLINE V round_as(V v, const at::BFloat16*) { return round_bf16(v); }
template <typename T>
S1_INLINE float round1(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// The kernels below run on V, the ISA's vector (isa.h's isa_vec): vec16 on AVX-512, vec8 elsewhere.

// out[r] = norm(x'[r]) * weight with x' = x + residual (written back to residual) or x alone.
template <typename V, typename T>
S1_INLINE void rms_norm_rows(T* out, T* residual, const T* x, const T* weight, int64_t rows_begin,
                             int64_t rows_end, int64_t dim, int64_t x_stride, float eps) {
  constexpr int64_t L = kLanes<V>;
  const int64_t whole = dim / L * L;
  for (int64_t r = rows_begin; r < rows_end; ++r) {
    const T* xr = x + r * x_stride;
    T* res = residual == nullptr ? nullptr : residual + r * dim;
    const T* src = xr;
    V sq{};
    float tail = 0.0f;
    if (res != nullptr) {  // residual = round(x + residual): the add HF does in the model's dtype
      for (int64_t d = 0; d < whole; d += L) {
        const V v = round_as(load_lanes<V>(xr + d) + load_lanes<V>(res + d), xr);
        store_lanes(res + d, v);
        sq += v * v;
      }
      for (int64_t d = whole; d < dim; ++d) {
        const float v = round1<T>(static_cast<float>(xr[d]) + static_cast<float>(res[d]));
        res[d] = static_cast<T>(v);
        tail += v * v;
      }
      src = res;
    } else {
      for (int64_t d = 0; d < whole; d += L) {
        const V v = load_lanes<V>(xr + d);
        sq += v * v;
      }
      for (int64_t d = whole; d < dim; ++d) tail += static_cast<float>(xr[d]) * static_cast<float>(xr[d]);
    }
    const float inv = 1.0f / std::sqrt((hsum_lanes(sq) + tail) / static_cast<float>(dim) + eps);
    T* o = out + r * dim;
    for (int64_t d = 0; d < whole; d += L)
      store_lanes(o + d, round_as(load_lanes<V>(src + d) * inv, src) * load_lanes<V>(weight + d));
    for (int64_t d = whole; d < dim; ++d)
      o[d] = static_cast<T>(round1<T>(static_cast<float>(src[d]) * inv) * static_cast<float>(weight[d]));
  }
}

// silu(x) = x * sigmoid(x), with sigmoid from exp(-|x|) so the exp's argument is never positive.
S1_INLINE float silu1(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  const float inv = 1.0f / (1.0f + e);
  return x * (x >= 0 ? inv : e * inv);
}

// silu1 on every lane, with vec.h's lane-wise exp.
template <typename V>
S1_INLINE V silu_lanes(V x) {
  using M = decltype(x < x);
  M bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= 0x7FFFFFFF;
  V abs_x;
  std::memcpy(&abs_x, &bits, sizeof(abs_x));
  const V e = exp_nonpositive_lanes(V{} - abs_x);  // exp(-|x|)
  const V inv = 1.0f / (1.0f + e);
  return x * select_lanes(x >= 0.0f, inv, e * inv);
}

// out[r] = round(round(silu(gate)) * up), gate_up[r] = [gate | up] of width 2 * dim.
template <typename V, typename T>
S1_INLINE void silu_and_mul_rows(T* out, const T* gate_up, int64_t rows_begin, int64_t rows_end, int64_t dim,
                                 int64_t stride) {
  for (int64_t r = rows_begin; r < rows_end; ++r) {
    const T* g = gate_up + r * stride;
    const T* u = g + dim;
    T* o = out + r * dim;
    int64_t d = 0;
    for (; d + kLanes<V> <= dim; d += kLanes<V>)
      store_lanes(o + d, round_as(round_as(silu_lanes(load_lanes<V>(g + d)), g) * load_lanes<V>(u + d), g));
    for (; d < dim; ++d) o[d] = static_cast<T>(round1<T>(silu1(static_cast<float>(g[d]))) * static_cast<float>(u[d]));
  }
}

// Rotate-half RoPE in place on one head row: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s], each
// product rounded to T before the add (as `q * cos + rotate_half(q) * sin` does in T).
template <typename V, typename T>
S1_INLINE void rope_row(T* x, const T* cos, const T* sin, int64_t half) {
  int64_t d = 0;
  for (; d + kLanes<V> <= half; d += kLanes<V>) {
    const V x1 = load_lanes<V>(x + d), x2 = load_lanes<V>(x + half + d);
    const V c1 = load_lanes<V>(cos + d), s1 = load_lanes<V>(sin + d), c2 = load_lanes<V>(cos + half + d),
            s2 = load_lanes<V>(sin + half + d);
    store_lanes(x + d, round_as(x1 * c1, x) - round_as(x2 * s1, x));
    store_lanes(x + half + d, round_as(x2 * c2, x) + round_as(x1 * s2, x));
  }
  for (; d < half; ++d) {
    const float x1 = static_cast<float>(x[d]), x2 = static_cast<float>(x[half + d]);
    x[d] = static_cast<T>(round1<T>(x1 * static_cast<float>(cos[d])) - round1<T>(x2 * static_cast<float>(sin[d])));
    x[half + d] = static_cast<T>(round1<T>(x2 * static_cast<float>(cos[half + d])) +
                                 round1<T>(x1 * static_cast<float>(sin[half + d])));
  }
}

template <typename V, typename T>
S1_INLINE void rope_tokens(T* q, T* k, const T* cos, const T* sin, int64_t begin, int64_t end, int64_t q_heads,
                           int64_t k_heads, int64_t head_dim, int64_t q_stride, int64_t k_stride) {
  for (int64_t t = begin; t < end; ++t) {
    const T* c = cos + t * head_dim;
    const T* s = sin + t * head_dim;
    for (int64_t h = 0; h < q_heads; ++h) rope_row<V>(q + t * q_stride + h * head_dim, c, s, head_dim / 2);
    for (int64_t h = 0; h < k_heads; ++h) rope_row<V>(k + t * k_stride + h * head_dim, c, s, head_dim / 2);
  }
}

// The index of a row's first maximum (torch.max's), a vector at a time: each lane keeps its own
// first maximum, then the lanes' largest value with the smallest index wins. A NaN never wins.
template <typename V, typename T>
S1_INLINE int64_t argmax_row(const T* x, int64_t n) {
  using M = decltype(V{} < V{});
  constexpr int64_t L = kLanes<V>;
  int64_t best = 0, d = 1;
  float best_value = static_cast<float>(x[0]);
  if (n >= 2 * L) {
    V top = load_lanes<V>(x);
    M index, at;
    for (int lane = 0; lane < L; ++lane) index[lane] = lane;
    at = index;
    for (d = L; d + L <= n; d += L) {
      at += static_cast<int32_t>(L);
      const V v = load_lanes<V>(x + d);
      const M greater = v > top;
      top = select_lanes(greater, v, top);
      index = select_lanes(greater, at, index);
    }
    best_value = -std::numeric_limits<float>::infinity();
    for (int lane = 0; lane < L; ++lane)
      if (top[lane] > best_value || (top[lane] == best_value && index[lane] < best)) {
        best_value = top[lane];
        best = index[lane];
      }
  }
  for (; d < n; ++d) {
    const float v = static_cast<float>(x[d]);
    if (v > best_value) {
      best_value = v;
      best = d;
    }
  }
  return best;
}

// One ISA-dispatched entry per kernel, overloaded by dtype.
#define S1_FUSED_KERNELS(T)                                                                                      \
  S1_ISA_VARIANTS(rms_norm_task,                                                                                 \
                  (T * out, T * residual, const T* x, const T* weight, int64_t b, int64_t e, int64_t dim,        \
                   int64_t x_stride, float eps),                                                                 \
                  (out, residual, x, weight, b, e, dim, x_stride, eps),                                          \
                  rms_norm_rows<isa_vec>(out, residual, x, weight, b, e, dim, x_stride, eps);)                         \
  S1_ISA_VARIANTS(silu_and_mul_task, (T * out, const T* gate_up, int64_t b, int64_t e, int64_t dim, int64_t stride), \
                  (out, gate_up, b, e, dim, stride), silu_and_mul_rows<isa_vec>(out, gate_up, b, e, dim, stride);)    \
  S1_ISA_VARIANTS(rope_task,                                                                                     \
                  (T * q, T * k, const T* cos, const T* sin, int64_t b, int64_t e, int64_t qh, int64_t kh,       \
                   int64_t hd, int64_t qs, int64_t ks),                                                          \
                  (q, k, cos, sin, b, e, qh, kh, hd, qs, ks), rope_tokens<isa_vec>(q, k, cos, sin, b, e, qh, kh, hd, qs, ks);) \
  S1_ISA_VARIANTS(argmax_task, (int64_t * out, const T* x, int64_t b, int64_t e, int64_t n, int64_t stride),       \
                  (out, x, b, e, n, stride), for (int64_t r = b; r < e; ++r) out[r] = argmax_row<isa_vec>(x + r * stride, n);)
S1_FUSED_KERNELS(float)
S1_FUSED_KERNELS(at::BFloat16)

constexpr int64_t kRowsPerTask = 16;  // rows of a few hundred elements: smaller tasks cost more than they save

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be (rows, dim) with dense rows");
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16, name,
              ": float32 or bfloat16 expected, got ", t.scalar_type());
}

#define S1_DISPATCH_FLOAT_AND_BF16(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

void rms_norm_impl(torch::Tensor& out, torch::Tensor* residual, const torch::Tensor& x, const torch::Tensor& weight,
                   double eps) {
  check_rows(x, "x");
  TORCH_CHECK(out.sizes() == x.sizes() && out.is_contiguous() && out.scalar_type() == x.scalar_type(),
              "out must be a contiguous tensor shaped like x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              "weight must be (dim,) in x's dtype");
  if (residual != nullptr)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() && residual->scalar_type() == x.scalar_type(),
                "residual must be a contiguous tensor shaped like x");
  S1_DISPATCH_FLOAT_AND_BF16(x.scalar_type(), "rms_norm", [&] {
    scalar_t* res = residual == nullptr ? nullptr : residual->data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0), kRowsPerTask, [&](int64_t b, int64_t e) {
      rms_norm_task(out.data_ptr<scalar_t>(), res, x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                  b, e, x.size(1), x.stride(0), static_cast<float>(eps));
    });
  });
}

void rms_norm(torch::Tensor out, const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  rms_norm_impl(out, nullptr, x, weight, eps);
}

void fused_add_rms_norm(torch::Tensor out, torch::Tensor residual, const torch::Tensor& x, const torch::Tensor& weight,
                        double eps) {
  rms_norm_impl(out, &residual, x, weight, eps);
}

void silu_and_mul(torch::Tensor out, const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must hold gate and up side by side");
  const int64_t dim = gate_up.size(1) / 2;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == gate_up.size(0) && out.size(1) == dim && out.is_contiguous() &&
                  out.scalar_type() == gate_up.scalar_type(),
              "out must be a contiguous (rows, dim) tensor in gate_up's dtype");
  S1_DISPATCH_FLOAT_AND_BF16(gate_up.scalar_type(), "silu_and_mul", [&] {
    at::parallel_for(0, gate_up.size(0), kRowsPerTask, [&](int64_t b, int64_t e) {
      silu_and_mul_task(out.data_ptr<scalar_t>(), gate_up.data_ptr<scalar_t>(), b, e, dim,
                                      gate_up.stride(0));
    });
  });
}

void rotary_embedding(torch::Tensor query, torch::Tensor key, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && query.size(0) == key.size(0) && query.size(2) == key.size(2),
              "query (tokens, heads, head_dim) and key (tokens, kv_heads, head_dim) expected");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2) && key.stride(2) == 1 &&
                  key.stride(1) == key.size(2),
              "query/key heads must be dense within a token");
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(head_dim % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.numel() == query.size(0) * head_dim && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "cos/sin must be contiguous with head_dim values per token");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && cos.scalar_type() == query.scalar_type() &&
                  sin.scalar_type() == query.scalar_type(),
              "query, key, cos and sin must share a dtype");
  TORCH_CHECK(query.scalar_type() == torch::kFloat || query.scalar_type() == torch::kBFloat16,
              "float32 or bfloat16 expected");
  S1_DISPATCH_FLOAT_AND_BF16(query.scalar_type(), "rotary_embedding", [&] {
    at::parallel_for(0, query.size(0), kRowsPerTask, [&](int64_t b, int64_t e) {
      rope_task(query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                              sin.data_ptr<scalar_t>(), b, e, query.size(1), key.size(1), head_dim, query.stride(0),
                              key.stride(0));
    });
  });
}

void argmax_rows(torch::Tensor out, const torch::Tensor& x) {
  check_rows(x, "logits");
  TORCH_CHECK(x.size(1) >= 1, "logits need at least one column");
  TORCH_CHECK(out.dim() == 1 && out.size(0) == x.size(0) && out.is_contiguous() && out.scalar_type() == torch::kLong,
              "out must be a contiguous int64 (rows,) tensor");
  S1_DISPATCH_FLOAT_AND_BF16(x.scalar_type(), "argmax_rows", [&] {
    at::parallel_for(0, x.size(0), 8, [&](int64_t b, int64_t e) {
      argmax_task(out.data_ptr<int64_t>(), x.data_ptr<scalar_t>(), b, e, x.size(1), x.stride(0));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s1serve, CPU, m) {
  m.impl("argmax_rows", &argmax_rows);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_embedding", &rotary_embedding);
}

}  // namespace s1serve
