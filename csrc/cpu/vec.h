// Vector helpers shared by the CPU kernels: eight floats as one GCC vector (AVX registers in a
// kernel's AVX2 and AVX-512 builds, SSE pairs in the baseline; see isa.h), loads that convert
// any storage type to fp32, and a branch-free exp for the online softmax.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>

#define S1_INLINE inline __attribute__((always_inline))

namespace s1serve {

// Eight floats as one GCC vector: AVX registers in the AVX2 / AVX-512 builds, SSE pairs in the baseline.
typedef float vec8 __attribute__((vector_size(32), aligned(4)));  // scratch may be unaligned

S1_INLINE vec8 load8(const float* p) {
  vec8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
template <typename other_t>  // fp64 / fp16: convert to fp32, accumulate in fp32
S1_INLINE vec8 load8(const other_t* p) {
  vec8 r;
  for (int i = 0; i < 8; ++i) r[i] = static_cast<float>(p[i]);
  return r;
}
// Sixteen floats: one AVX-512 register in a kernel's AVX-512 build (two AVX or four SSE registers
// elsewhere). Kernels templated on the vector type use it there and vec8 in the other builds.
typedef float vec16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32), aligned(4)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64), aligned(4)));

template <typename V>
struct Bf16Bits;  // the 16- and 32-bit integer vectors with V's lane count
template <>
struct Bf16Bits<vec8> {
  typedef u16x8 u16;
  typedef u32x8 u32;
};
template <>
struct Bf16Bits<vec16> {
  typedef u16x16 u16;
  typedef u32x16 u32;
};

// bf16 is the top half of an fp32: widen the 16-bit lanes and shift. V is vec8 or vec16.
template <typename V>
S1_INLINE V load_bf16(const c10::BFloat16* p) {
  typename Bf16Bits<V>::u16 h;
  std::memcpy(&h, p, sizeof(h));
  const typename Bf16Bits<V>::u32 w = __builtin_convertvector(h, typename Bf16Bits<V>::u32) << 16;
  V r;
  std::memcpy(&r, &w, sizeof(r));
  return r;
}
S1_INLINE vec8 load8(const c10::BFloat16* p) { return load_bf16<vec8>(p); }

S1_INLINE float hsum(vec8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// e^(x - n ln2) for n = round(x / ln2): Cody-Waite range reduction (ln2 split in two parts) and
// Cephes' expf polynomial, shared by the scalar and eight-lane exps below; they scale by 2^n.
template <typename T>
S1_INLINE T exp_reduced(T x, T n) {
  const T r = x - n * 0.693359375f + n * 2.12194440e-4f;
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp(x) for x <= 0 (a score minus the running max): ~1 ulp, branch-free, so loops over it
// vectorize (std::exp does not).
S1_INLINE float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float p = exp_reduced(x, n);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return p * pow2n;
}

typedef int32_t vec8i __attribute__((vector_size(32), aligned(4)));
typedef int32_t vec16i __attribute__((vector_size(64), aligned(4)));

// Lane-wise mask ? a : b for vec8 or vec16; mask lanes are -1 (take a) or 0 (take b), as a
// comparison of two vectors gives them.
template <typename V, typename M>
S1_INLINE V select_lanes(M mask, V a, V b) {
  M ai, bi;
  std::memcpy(&ai, &a, sizeof(ai));
  std::memcpy(&bi, &b, sizeof(bi));
  const M r = (ai & mask) | (bi & ~mask);
  V out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}
S1_INLINE vec8 select8(vec8i mask, vec8 a, vec8 b) { return select_lanes(mask, a, b); }

// exp_nonpositive on every lane of a vec8 or vec16 at once (same polynomial, same ~1 ulp).
template <typename V>
S1_INLINE V exp_nonpositive_lanes(V x) {
  using M = decltype(x < x);
  x = select_lanes(x < -87.0f, V{} - 87.0f, x);
  const V y = x * 1.44269504088896341f + 0.5f;
  V n = __builtin_convertvector(__builtin_convertvector(y, M), V);  // truncates toward zero
  n += __builtin_convertvector(n > y, V);                           // -1 where that rounded up: floor
  const V p = exp_reduced(x, n);
  const M bits = (__builtin_convertvector(n, M) + 127) << 23;
  V pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return p * pow2n;
}
S1_INLINE vec8 exp_nonpositive8(vec8 x) { return exp_nonpositive_lanes(x); }

S1_INLINE void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// The eight horizontal sums of v[0..8) as one vector ({sum(v[0]), ..., sum(v[7])}): three rounds
// of pairwise shuffles and adds instead of eight separate horizontal sums.
S1_INLINE vec8 hsum8x8(const vec8* v) {
  vec8 pairs[4], quads[2];
  for (int i = 0; i < 4; ++i)  // {a01, b01, a23, b23, a45, b45, a67, b67} for a = v[2i], b = v[2i+1]
    pairs[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int i = 0; i < 2; ++i)  // {a0-3, b0-3, c0-3, d0-3, a4-7, b4-7, c4-7, d4-7}
    quads[i] = __builtin_shufflevector(pairs[2 * i], pairs[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(pairs[2 * i], pairs[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(quads[0], quads[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(quads[0], quads[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

template <typename V>
constexpr int64_t kLanes = sizeof(V) / sizeof(float);

template <typename V>
S1_INLINE V loadv(const float* p) {
  V r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
template <typename V>
S1_INLINE void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
// Each lane rounded to the nearest bf16 (ties to even, as c10::BFloat16 rounds), kept as fp32.
template <typename V>
S1_INLINE V round_bf16(V v) {
  typename Bf16Bits<V>::u32 w;
  std::memcpy(&w, &v, sizeof(w));
  w = (w + 0x7FFFu + ((w >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// Loads and stores of V's lane count from / to fp32 or bf16 memory (bf16: widened on load,
// rounded to nearest even on store). Kernels templated on the ISA's vector (isa_vec) use these:
// a vec16 in an AVX2 build is two registers that GCC spills through the stack at every compare
// and select, which made the AVX2 argmax and few-row linear several times slower than torch's.
template <typename V>
S1_INLINE V load_lanes(const float* p) { return loadv<V>(p); }
template <typename V>
S1_INLINE V load_lanes(const c10::BFloat16* p) { return load_bf16<V>(p); }
template <typename V>
S1_INLINE void store_lanes(float* p, V v) { storev(p, v); }
template <typename V>
S1_INLINE void store_lanes(c10::BFloat16* p, V v) {
  typename Bf16Bits<V>::u32 w;
  const V rounded = round_bf16(v);
  std::memcpy(&w, &rounded, sizeof(w));
  const typename Bf16Bits<V>::u16 h = __builtin_convertvector(w >> 16, typename Bf16Bits<V>::u16);
  std::memcpy(p, &h, sizeof(h));
}
S1_INLINE vec16 load16(const float* p) { return loadv<vec16>(p); }
S1_INLINE vec16 load16(const c10::BFloat16* p) { return load_bf16<vec16>(p); }
S1_INLINE void store16(float* p, vec16 v) { storev(p, v); }
S1_INLINE void store16(c10::BFloat16* p, vec16 v) { store_lanes(p, v); }
S1_INLINE float hsum16(vec16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
S1_INLINE float hsum_lanes(vec8 v) { return hsum(v); }
S1_INLINE float hsum_lanes(vec16 v) { return hsum16(v); }

// The largest lane: halves folded with max, four rounds of shuffles.
S1_INLINE float hmax16(vec16 v) {
  const vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const vec8 b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vec8 m = a > b ? a : b;
  typedef float vec4 __attribute__((vector_size(16)));
  const vec4 lo = __builtin_shufflevector(m, m, 0, 1, 2, 3), hi = __builtin_shufflevector(m, m, 4, 5, 6, 7);
  vec4 q = lo > hi ? lo : hi;
  q = q > __builtin_shufflevector(q, q, 2, 3, 0, 1) ? q : __builtin_shufflevector(q, q, 2, 3, 0, 1);
  return std::max(q[0], q[1]);
}

// The sixteen horizontal sums of v[0..16) as one vector (lane i: sum(v[i])): four rounds that each
// halve the vectors, whole 256-bit, 128-bit, 64-bit and 32-bit groups of two vectors shuffled side
// by side and added. Reading the inputs in `order` puts every sum in its own lane.
S1_INLINE vec16 hsum16x16(const vec16* v) {
  constexpr int order[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  vec16 halves[8], quarters[4], eighths[2];
  for (int i = 0; i < 8; ++i) {  // {a 8 partials, b 8 partials}
    const vec16 a = v[order[2 * i]], b = v[order[2 * i + 1]];
    halves[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {  // four sums of four partials each, one per 128 bits
    const vec16 a = halves[2 * i], b = halves[2 * i + 1];
    quarters[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {  // per 128 bits: two partials of one sum, then two of another
    const vec16 a = quarters[2 * i], b = quarters[2 * i + 1];
    eighths[i] = __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
                 __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  const vec16 a = eighths[0], b = eighths[1];
  return __builtin_shufflevector(a, b, 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, 13, 15, 29, 31);
}

// Asks for n rows of `width` elements, `stride` apart, to be brought into L2 ahead of use: the
// next cached block lies anywhere in the pool, where the hardware prefetchers do not look, and
// without this the attention kernels wait on memory at every block boundary.
template <typename T>
S1_INLINE void prefetch_rows(const T* src, int64_t n, int64_t width, int64_t stride) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t e = 0; e < width; e += kLine) __builtin_prefetch(src + t * stride + e, 0, 2);
}

// The block whose rows to request while this one is read (its first `n` rows; none when n is 0).
template <typename T>
struct NextBlock {
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t n = 0;
};

// n rows of `width` elements (a multiple of 8), `stride` apart in src, widened to fp32 rows packed
// in dst; row t of `ahead` is requested beside row t, so the requests trickle out with the work
// instead of queueing up at once.
template <typename T>
S1_INLINE void widen_rows(float* dst, const T* src, int64_t n, int64_t width, int64_t stride, const T* ahead,
                          int64_t ahead_n) {
  for (int64_t t = 0; t < n; ++t) {
    if (t < ahead_n) prefetch_rows(ahead + t * stride, 1, width, stride);
    int64_t e = 0;
    if constexpr (std::is_same_v<T, c10::BFloat16>)  // the CPU's serving dtype: 16 lanes at a time
      for (; e + 16 <= width; e += 16) store16(dst + t * width + e, load16(src + t * stride + e));
    for (; e < width; e += 8) store8(dst + t * width + e, load8(src + t * stride + e));
  }
}

// One cached block's K and V rows as fp32 for the kernels' inner loops: an fp32 cache in place, any
// other widened once into scratch (2 x block_size x width floats), not once per query head or row.
// The next block's rows are requested meanwhile.
struct BlockRows {
  const float* k;
  const float* v;
  int64_t stride;  // between consecutive rows
};
template <typename T>
S1_INLINE BlockRows block_rows(const T* k, const T* v, int64_t n, int64_t width, int64_t stride, int64_t block_size,
                               float* scratch, NextBlock<T> next = {}) {
  if constexpr (std::is_same_v<T, float>) {
    prefetch_rows(next.k, next.n, width, stride);
    prefetch_rows(next.v, next.n, width, stride);
    return {k, v, stride};
  } else {
    widen_rows(scratch, k, n, width, stride, next.k, next.n);
    widen_rows(scratch + block_size * width, v, n, width, stride, next.v, next.n);
    return {scratch, scratch + block_size * width, width};
  }
}

// A vector's lanes summed down to eight: vec8 as it is, vec16 as its two halves added.
S1_INLINE vec8 fold8(vec8 v) { return v; }
S1_INLINE vec8 fold8(vec16 v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}

// One output row's N vectors of V: acc = acc * corr + sum over t < n of probs[t * prob_stride] *
// V[t], with V[t] at v + t * slot_stride. N independent chains held in registers.
template <int N, typename V>
S1_INLINE void accumulate_pv(float* __restrict acc, float corr, const float* probs, int64_t prob_stride,
                             const float* v, int64_t n, int64_t slot_stride) {
  constexpr int64_t L = kLanes<V>;
  V a[N];
  for (int i = 0; i < N; ++i) a[i] = loadv<V>(acc + L * i) * corr;
  for (int64_t t = 0; t < n; ++t) {
    const float p = probs[t * prob_stride];
    for (int i = 0; i < N; ++i) a[i] += p * loadv<V>(v + t * slot_stride + L * i);
  }
  for (int i = 0; i < N; ++i) storev(acc + L * i, a[i]);
}

// accumulate_pv over a whole row of `dim` floats (a multiple of V's lanes), in runs of 8, 4, 2 and 1 vectors.
template <typename V>
S1_INLINE void accumulate_pv_row(float* acc, int64_t dim, float corr, const float* probs, int64_t prob_stride,
                                 const float* v, int64_t n, int64_t slot_stride) {
  constexpr int64_t L = kLanes<V>;
  const int64_t chunks = dim / L;
  int64_t c = 0;
  for (; c + 8 <= chunks; c += 8) accumulate_pv<8, V>(acc + L * c, corr, probs, prob_stride, v + L * c, n, slot_stride);
  for (; c + 4 <= chunks; c += 4) accumulate_pv<4, V>(acc + L * c, corr, probs, prob_stride, v + L * c, n, slot_stride);
  for (; c + 2 <= chunks; c += 2) accumulate_pv<2, V>(acc + L * c, corr, probs, prob_stride, v + L * c, n, slot_stride);
  for (; c < chunks; ++c) accumulate_pv<1, V>(acc + L * c, corr, probs, prob_stride, v + L * c, n, slot_stride);
}

S1_INLINE u32x16 load_bf16_pairs(const c10::BFloat16* p) {
  u32x16 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}

#if defined(__x86_64__) && defined(__GNUC__)
// acc + a[2i] * b[2i] + a[2i+1] * b[2i+1] in each fp32 lane i, a and b holding 32 bf16 each:
// AVX512-BF16's VDPBF16PS (bf16 products are exact in fp32). Inline assembly, so a kernel's plain
// AVX-512 build can run it behind cpu_has_dpbf16(): an intrinsic would need the kernel compiled
// for avx512bf16, and GCC does not inline across that target mismatch.
S1_INLINE vec16 dot_bf16_pairs(vec16 acc, u32x16 a, u32x16 b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
#define S1_HAVE_DOT_BF16_PAIRS 1

// Whether a kernel built for vector V on storage T can take the bf16-pair paths (the AVX-512
// build on a bf16 cache); cpu_has_dpbf16() then decides at run time.
template <typename V, typename T>
constexpr bool kBf16Pairs = std::is_same_v<V, vec16> && std::is_same_v<T, c10::BFloat16>;

typedef uint16_t u16x32 __attribute__((vector_size(64), aligned(2)));

// Rows t and t+1 of n bf16 rows (`width` a multiple of 32, `stride` apart in src) interleaved for
// dot_bf16_pairs: each pair of rows becomes 2 x width bf16 in dst, per 32 columns a vector of
// (row t, row t+1) pairs for columns {0-3, 8-11, 16-19, 24-27} and one for {4-7, ..., 28-31}
// (VPUNPCKLWD / VPUNPCKHWD order); an odd last row is paired with zeros. Row t of the next
// block's K and V is requested beside row t.
S1_INLINE void pair_rows_bf16(c10::BFloat16* dst, const c10::BFloat16* src, int64_t n, int64_t width, int64_t stride,
                              NextBlock<c10::BFloat16> next) {
  for (int64_t t = 0; t < n; t += 2) {
    for (int64_t r = t; r < std::min(t + 2, next.n); ++r) {
      prefetch_rows(next.k + r * stride, 1, width, stride);
      prefetch_rows(next.v + r * stride, 1, width, stride);
    }
    for (int64_t e = 0; e < width; e += 32) {
      u16x32 a, b{};
      std::memcpy(&a, src + t * stride + e, sizeof(a));
      if (t + 1 < n) std::memcpy(&b, src + (t + 1) * stride + e, sizeof(b));
      const u16x32 lo = __builtin_shufflevector(a, b, 0, 32, 1, 33, 2, 34, 3, 35, 8, 40, 9, 41, 10, 42, 11, 43, 16, 48,
                                                17, 49, 18, 50, 19, 51, 24, 56, 25, 57, 26, 58, 27, 59);
      const u16x32 hi = __builtin_shufflevector(a, b, 4, 36, 5, 37, 6, 38, 7, 39, 12, 44, 13, 45, 14, 46, 15, 47, 20,
                                                52, 21, 53, 22, 54, 23, 55, 28, 60, 29, 61, 30, 62, 31, 63);
      std::memcpy(dst + t * width + 2 * e, &lo, sizeof(lo));
      std::memcpy(dst + t * width + 2 * e + 32, &hi, sizeof(hi));
    }
  }
}

// Rows accumulated from pair_rows_bf16's vectors hold, per 32 columns, columns {0-3, 8-11, ...}
// then {4-7, 12-15, ...}: put n floats (a multiple of 32) back in column order.
S1_INLINE void unpair_columns(float* row, int64_t n) {
  float paired[32];
  for (int64_t c = 0; c < n; c += 32) {
    std::memcpy(paired, row + c, sizeof(paired));
    for (int64_t lane = 0; lane < 16; ++lane) {
      row[c + lane / 4 * 8 + lane % 4] = paired[lane];
      row[c + lane / 4 * 8 + 4 + lane % 4] = paired[16 + lane];
    }
  }
}

// One output row acc (N x 32 floats in pair_rows_bf16's column order) = acc * corr + sum over
// pairs i of the probability pair i (bf16 halves of a 32-bit word, p_stride words apart) times pair i of V rows
// (v + i * pair_stride, pair_rows_bf16's layout).
template <int N>
S1_INLINE void accumulate_pv_pairs(float* __restrict acc, float corr, const float* p_pairs, int64_t p_stride,
                                   int64_t pairs, const c10::BFloat16* v, int64_t pair_stride) {
  vec16 a[2 * N], b[2 * N] = {};  // even and odd pairs: twice the chains, to cover VDPBF16PS's latency
  for (int i = 0; i < 2 * N; ++i) a[i] = loadv<vec16>(acc + 16 * i) * corr;
  auto step = [&](vec16* sums, int64_t i) {
    uint32_t word;
    std::memcpy(&word, p_pairs + i * p_stride, sizeof(word));
    const u32x16 p = u32x16{} + word;
    for (int k = 0; k < 2 * N; ++k) sums[k] = dot_bf16_pairs(sums[k], load_bf16_pairs(v + i * pair_stride + 32 * k), p);
  };
  int64_t i = 0;
  for (; i + 2 <= pairs; i += 2) {
    step(a, i);
    step(b, i + 1);
  }
  if (i < pairs) step(a, i);
  for (int k = 0; k < 2 * N; ++k) storev(acc + 16 * k, a[k] + b[k]);
}

// accumulate_pv_pairs over a row of `dim` columns (a multiple of 32), in runs of 4, 2 and 1 x 32.
S1_INLINE void accumulate_pv_pairs_row(float* acc, int64_t dim, float corr, const float* p_pairs, int64_t p_stride,
                                       int64_t pairs, const c10::BFloat16* v, int64_t pair_stride) {
  int64_t c = 0;
  for (; c + 128 <= dim; c += 128)
    accumulate_pv_pairs<4>(acc + c, corr, p_pairs, p_stride, pairs, v + 2 * c, pair_stride);
  for (; c + 64 <= dim; c += 64) accumulate_pv_pairs<2>(acc + c, corr, p_pairs, p_stride, pairs, v + 2 * c, pair_stride);
  for (; c < dim; c += 32) accumulate_pv_pairs<1>(acc + c, corr, p_pairs, p_stride, pairs, v + 2 * c, pair_stride);
}
#else
template <typename V, typename T>
constexpr bool kBf16Pairs = false;
#endif

}  // namespace s1serve
