// Which x86 vector ISA the CPU kernels run: the best the CPU has (AVX-512, AVX2+FMA or the
// baseline), or the one $S1SERVE_CPU_ISA names (avx512 | avx2 | baseline) when the CPU has it,
// so tests can force each path. Read once, at the first kernel call.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "vec.h"

namespace s1serve {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  Isa best = avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
  if (const char* want = std::getenv("S1SERVE_CPU_ISA")) {
    const Isa asked = std::strcmp(want, "avx512") == 0 ? Isa::kAvx512
                      : std::strcmp(want, "avx2") == 0 ? Isa::kAvx2
                                                       : Isa::kBaseline;
    if (asked < best) best = asked;  // never one the CPU lacks
  }
  return best;
#else
  return Isa::kBaseline;
#endif
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// AVX512-BF16's VDPBF16PS, where the AVX-512 build runs (not on a forced lower ISA).
inline bool cpu_has_dpbf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = cpu_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// AMX-BF16 usable by this process (csrc/cpu/linear_amx.cpp), where the AVX-512 build runs.
bool cpu_has_amx_bf16();

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

}  // namespace s1serve

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define S1_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define S1_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define S1_TARGET_AVX512
#define S1_TARGET_AVX2
#endif

// Defines NAME_avx512, NAME_avx2 and NAME_baseline, each with the body given last compiled for
// its ISA (the always-inline helpers it calls are compiled into it), and NAME, which calls the one
// cpu_isa() picks. PARAMS and ARGS are parenthesized: the parameter list and the names in it. In
// the body, `isa_vec` is the widest float vector the ISA holds in one register (vec.h's vec16 on
// AVX-512, vec8 elsewhere), for kernels templated on the vector type.
#define S1_ISA_VARIANTS(NAME, PARAMS, ARGS, ...)                                                 \
  S1_TARGET_AVX512 void NAME##_avx512 PARAMS {                                                   \
    using isa_vec [[maybe_unused]] = ::s1serve::vec16;                                           \
    __VA_ARGS__                                                                                  \
  }                                                                                              \
  S1_TARGET_AVX2 void NAME##_avx2 PARAMS {                                                       \
    using isa_vec [[maybe_unused]] = ::s1serve::vec8;                                            \
    __VA_ARGS__                                                                                  \
  }                                                                                              \
  void NAME##_baseline PARAMS {                                                                  \
    using isa_vec [[maybe_unused]] = ::s1serve::vec8;                                            \
    __VA_ARGS__                                                                                  \
  }                                                                                              \
  void NAME PARAMS {                                                                             \
    switch (::s1serve::cpu_isa()) {                                                              \
      case ::s1serve::Isa::kAvx512: return NAME##_avx512 ARGS;                                   \
      case ::s1serve::Isa::kAvx2: return NAME##_avx2 ARGS;                                       \
      default: return NAME##_baseline ARGS;                                                      \
    }                                                                                            \
  }
