// Paged-attention decode on CUDA: one thread block per (sequence, kv head) serves the GQA group
// of query heads sharing that kv head, so each K/V row is read from HBM once. Each warp takes
// every NUM_WARPS-th token of the context, its lanes split head_dim (coalesced 32-wide reads),
// and keeps an online softmax per query head; the warps' partial results are merged in shared
// memory at the end. Half types are widened to fp32 for every multiply-add.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "kernels.h"

namespace s1serve::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kNumWarps = 4;
constexpr int kMaxGroup = 8;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kNumWarps * kWarpSize)
    decode_kernel(T* __restrict__ out, const T* __restrict__ query, const T* __restrict__ k_cache,
                  const T* __restrict__ v_cache, const int64_t* __restrict__ block_tables,
                  const int64_t* __restrict__ context_lens, int num_heads, int num_kv_heads, int block_size,
                  int max_blocks, float scale) {
  constexpr int kElems = (HEAD_DIM + kWarpSize - 1) / kWarpSize;  // head_dim elements per lane
  const int kv_head = blockIdx.x, seq = blockIdx.y;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int group = num_heads / num_kv_heads, head0 = kv_head * group;
  const int64_t ctx = context_lens[seq];
  const int64_t* table = block_tables + static_cast<int64_t>(seq) * max_blocks;
  const int64_t slot_stride = static_cast<int64_t>(num_kv_heads) * HEAD_DIM;

  float q[kMaxGroup][kElems], acc[kMaxGroup][kElems], m[kMaxGroup], l[kMaxGroup];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -FLT_MAX;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int d = e * kWarpSize + lane;
      const bool valid = g < group && d < HEAD_DIM;
      q[g][e] = valid ? to_float(query[(static_cast<int64_t>(seq) * num_heads + head0 + g) * HEAD_DIM + d]) * scale
                      : 0.f;
      acc[g][e] = 0.f;
    }
  }

  for (int64_t pos = warp; pos < ctx; pos += kNumWarps) {
    const int64_t row = (table[pos / block_size] * block_size + pos % block_size) * slot_stride +
                        static_cast<int64_t>(kv_head) * HEAD_DIM;
    float k[kElems], v[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int d = e * kWarpSize + lane;
      k[e] = d < HEAD_DIM ? to_float(k_cache[row + d]) : 0.f;
      v[e] = d < HEAD_DIM ? to_float(v_cache[row + d]) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= group) break;
      float partial = 0.f;
#pragma unroll
      for (int e = 0; e < kElems; ++e) partial += q[g][e] * k[e];
      const float score = warp_sum(partial);
      const float new_m = fmaxf(m[g], score);
      const float correction = __expf(m[g] - new_m), p = __expf(score - new_m);
      l[g] = l[g] * correction + p;
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[g][e] = acc[g][e] * correction + p * v[e];
      m[g] = new_m;
    }
  }

  // Merge the warps: every warp publishes (m, l, acc) per head; warp 0 combines them.
  __shared__ float s_m[kNumWarps][kMaxGroup], s_l[kNumWarps][kMaxGroup];
  __shared__ float s_acc[kNumWarps][kMaxGroup][kElems * kWarpSize];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (lane == 0) {
      s_m[warp][g] = m[g];
      s_l[warp][g] = l[g];
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) s_acc[warp][g][e * kWarpSize + lane] = acc[g][e];
  }
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= group) break;
    float total_m = -FLT_MAX;
    for (int w = 0; w < kNumWarps; ++w) total_m = fmaxf(total_m, s_m[w][g]);
    float total_l = 0.f, merged[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) merged[e] = 0.f;
    for (int w = 0; w < kNumWarps; ++w) {
      if (s_l[w][g] == 0.f) continue;  // a warp that saw no token (context shorter than kNumWarps)
      const float f = __expf(s_m[w][g] - total_m);
      total_l += s_l[w][g] * f;
#pragma unroll
      for (int e = 0; e < kElems; ++e) merged[e] += s_acc[w][g][e * kWarpSize + lane] * f;
    }
    const float inv = 1.f / total_l;
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int d = e * kWarpSize + lane;
      if (d < HEAD_DIM) out[(static_cast<int64_t>(seq) * num_heads + head0 + g) * HEAD_DIM + d] = from_float<T>(merged[e] * inv);
    }
  }
}

template <typename T, int HEAD_DIM>
cudaError_t launch(const DecodeArgs& a, cudaStream_t stream) {
  const dim3 grid(a.num_kv_heads, a.num_seqs), block(kNumWarps * kWarpSize);
  decode_kernel<T, HEAD_DIM><<<grid, block, 0, stream>>>(
      static_cast<T*>(a.out), static_cast<const T*>(a.query), static_cast<const T*>(a.k_cache),
      static_cast<const T*>(a.v_cache), a.block_tables, a.context_lens, a.num_heads, a.num_kv_heads, a.block_size,
      a.max_blocks, a.scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const DecodeArgs& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 16: return launch<T, 16>(a, stream);
    case 32: return launch<T, 32>(a, stream);
    case 64: return launch<T, 64>(a, stream);
    case 128: return launch<T, 128>(a, stream);
    case 256: return launch<T, 256>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool decode_supported(int num_heads, int num_kv_heads, int head_dim) {
  const bool dim_ok = head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
  return dim_ok && num_kv_heads > 0 && num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= kMaxGroup;
}

cudaError_t paged_attention_decode(const DecodeArgs& args, DType dtype, cudaStream_t stream) {
  if (!decode_supported(args.num_heads, args.num_kv_heads, args.head_dim)) return cudaErrorInvalidValue;
  if (args.num_seqs == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return dispatch_head_dim<float>(args, stream);
    case DType::kFloat16: return dispatch_head_dim<__half>(args, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace s1serve::cuda
