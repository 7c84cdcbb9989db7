// Vector helpers shared by the CPU attention kernels: eight floats as one GCC vector (AVX
// registers in the x86-64-v3 clone of a kernel, SSE pairs in the baseline), loads that convert
// any storage type to fp32, and a branch-free exp for the online softmax.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define S1_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define S1_MULTIVERSION
#endif
#define S1_INLINE inline __attribute__((always_inline))

namespace s1serve {

// Eight floats as one GCC vector: AVX registers in the x86-64-v3 clone, SSE pairs in the baseline.
typedef float vec8 __attribute__((vector_size(32), aligned(4)));  // scratch may be unaligned

S1_INLINE vec8 load8(const float* p) {
  vec8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
template <typename other_t>  // fp64 / bf16 / fp16: convert to fp32, accumulate in fp32
S1_INLINE vec8 load8(const other_t* p) {
  vec8 r;
  for (int i = 0; i < 8; ++i) r[i] = static_cast<float>(p[i]);
  return r;
}

S1_INLINE float hsum(vec8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp(x) for x <= 0 (a score minus the running max), Cephes' expf polynomial after Cody-Waite
// range reduction: ~1 ulp, branch-free, so loops over it vectorize (std::exp does not).
S1_INLINE float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return p * pow2n;
}

typedef int32_t vec8i __attribute__((vector_size(32), aligned(4)));

S1_INLINE vec8 select8(vec8i mask, vec8 a, vec8 b) {  // mask lanes are -1 (take a) or 0 (take b)
  vec8i ai, bi;
  std::memcpy(&ai, &a, sizeof(ai));
  std::memcpy(&bi, &b, sizeof(bi));
  const vec8i r = (ai & mask) | (bi & ~mask);
  vec8 out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}

// exp_nonpositive on eight lanes at once (same polynomial, same ~1 ulp).
S1_INLINE vec8 exp_nonpositive8(vec8 x) {
  x = select8(x < -87.0f, vec8{} - 87.0f, x);
  const vec8 y = x * 1.44269504088896341f + 0.5f;
  vec8 n = __builtin_convertvector(__builtin_convertvector(y, vec8i), vec8);  // truncates toward zero
  n += __builtin_convertvector(n > y, vec8);                                   // -1 where that rounded up: floor
  const vec8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vec8 p = vec8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vec8i bits = (__builtin_convertvector(n, vec8i) + 127) << 23;
  vec8 pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return p * pow2n;
}

}  // namespace s1serve
