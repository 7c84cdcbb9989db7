// The compile-time shapes the attention kernels are instantiated for: head_dim in
// {16, 32, 64, 128, 256} and the GQA group rounded up to 1, 2, 4 or 8 (decode_supported's rule).
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

namespace s1serve::cuda {

// Calls launch(std::integral_constant<int, HEAD_DIM>, std::integral_constant<int, GROUP>) for the
// runtime shape; cudaErrorInvalidValue for a head_dim outside the set.
template <typename Launch>
cudaError_t dispatch_shape(int head_dim, int group, Launch&& launch) {
  auto by_group = [&](auto dim) -> cudaError_t {
    if (group <= 1) return launch(dim, std::integral_constant<int, 1>{});
    if (group <= 2) return launch(dim, std::integral_constant<int, 2>{});
    if (group <= 4) return launch(dim, std::integral_constant<int, 4>{});
    return launch(dim, std::integral_constant<int, 8>{});
  };
  switch (head_dim) {
    case 16: return by_group(std::integral_constant<int, 16>{});
    case 32: return by_group(std::integral_constant<int, 32>{});
    case 64: return by_group(std::integral_constant<int, 64>{});
    case 128: return by_group(std::integral_constant<int, 128>{});
    case 256: return by_group(std::integral_constant<int, 256>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace s1serve::cuda
