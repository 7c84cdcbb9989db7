// Writes new K/V rows into the paged cache at their slots; one thread block per token, threads
// over the row's elements. A negative slot is padding and writes nothing; so does a slot past the
// cache (bounds are checked here, on the device, so the binding needs no host sync per layer).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace s1serve::cuda {
namespace {

template <typename T>
__global__ void cache_kernel(const T* __restrict__ key, const T* __restrict__ value, T* __restrict__ k_cache,
                             T* __restrict__ v_cache, const int64_t* __restrict__ slot_mapping, int row_elems,
                             int64_t key_stride, int64_t value_stride, int64_t num_slots) {
  const int64_t token = blockIdx.x, slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;
  for (int i = threadIdx.x; i < row_elems; i += blockDim.x) {
    k_cache[slot * row_elems + i] = key[token * key_stride + i];
    v_cache[slot * row_elems + i] = value[token * value_stride + i];
  }
}

template <typename T>
cudaError_t launch(const CacheArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  const int threads = a.row_elems < 256 ? ((a.row_elems + 31) / 32) * 32 : 256;
  cache_kernel<T><<<a.num_tokens, threads, 0, stream>>>(
      static_cast<const T*>(a.key), static_cast<const T*>(a.value), static_cast<T*>(a.k_cache),
      static_cast<T*>(a.v_cache), a.slot_mapping, a.row_elems, a.key_stride, a.value_stride, a.num_slots);
  return cudaGetLastError();
}

}  // namespace

cudaError_t reshape_and_cache(const CacheArgs& args, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch<float>(args, stream);
    case DType::kFloat16: return launch<__half>(args, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace s1serve::cuda
