// Paged-attention decode on CUDA, split over the context (flash-decoding): one thread block per
// (kv head, sequence, 512-token partition) serves the GQA group of query heads that share the kv
// head, so each K/V row is read from HBM once, and a batch of one long sequence still fills the
// GPU (a 32k context is 64 partitions per kv head). A second kernel merges the partitions'
// softmax-weighted results. Within a block, every token's row is read with 16-byte loads by a
// few adjacent lanes; the partition's scores go to shared memory, so the softmax takes one exp
// per score (not per lane), and the probabilities then weight the V rows. Index arithmetic is
// int32 (a sequence has < 2^31 tokens); half types are widened to fp32 for every multiply-add.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "dispatch.cuh"
#include "kernels.h"

namespace s1serve::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * kWarpSize;
constexpr int kPartition = kDecodePartitionTokens;

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

// 16 bytes of T (8 halves or 4 floats), loaded in one instruction and widened to fp32.
template <typename T>
struct Vec {
  static constexpr int kElems = 16 / sizeof(T);
  union {
    uint4 raw;
    T elems[kElems];
  };
  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ float operator[](int i) const { return to_float(elems[i]); }
};

// How the lanes of a warp cover token rows of HEAD_DIM elements: kLanes adjacent lanes per row
// (one 16-byte vector each, kVecs times), so one warp instruction reads kTokens whole rows.
template <typename T, int HEAD_DIM>
struct RowLayout {
  static constexpr int kElems = Vec<T>::kElems;
  static constexpr int kLanes = HEAD_DIM / kElems < kWarpSize ? HEAD_DIM / kElems : kWarpSize;
  static constexpr int kVecs = HEAD_DIM / (kElems * kLanes);
  static constexpr int kTokens = kWarpSize / kLanes;  // rows per warp instruction
  static_assert(kVecs * kElems * kLanes == HEAD_DIM, "head_dim must be a multiple of 16 bytes per lane");
};

constexpr int kUnroll = 4;  // token rows a lane group loads before the first multiply

// A step's kUnroll token rows of `cache` for this lane group (row t at cache + row_of(t)), all
// loads issued before any is used; rows at or past n are left unloaded.
template <typename T, typename L, typename RowOf>
__device__ __forceinline__ void load_rows(Vec<T> (&rows)[kUnroll][L::kVecs], const T* cache, int base, int n,
                                          int row_in_warp, int row_lane, RowOf row_of) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int t = base + u * L::kTokens + row_in_warp;
    if (t >= n) continue;
    const T* row = cache + row_of(t);
#pragma unroll
    for (int v = 0; v < L::kVecs; ++v) rows[u][v].load(row + (v * L::kLanes + row_lane) * L::kElems);
  }
}

template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {  // over WIDTH adjacent lanes (a power of two)
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Block-wide max (or sum) of every thread's value for each of GROUP heads; all threads get it.
template <int GROUP, bool MAX>
__device__ __forceinline__ void block_reduce(float (&x)[GROUP], float (&scratch)[kNumWarps][GROUP]) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, x[g], offset);
      x[g] = MAX ? fmaxf(x[g], other) : x[g] + other;
    }
    if (lane == 0) scratch[warp][g] = x[g];
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    x[g] = scratch[0][g];
#pragma unroll
    for (int w = 1; w < kNumWarps; ++w) x[g] = MAX ? fmaxf(x[g], scratch[w][g]) : x[g] + scratch[w][g];
  }
  __syncthreads();  // scratch is reused by the next reduction
}

struct KernelArgs {
  const int64_t* block_tables;
  const int64_t* context_lens;
  float* partial_out;
  float* partial_max;
  float* partial_sum;
  int num_heads, num_kv_heads, group, block_size, max_blocks, max_partitions;
  float scale;
};

// GROUP is the group size rounded up to 1, 2, 4 or 8 (registers and shared memory are sized for
// it); heads past the real group are computed on zeros and never written.
template <typename T, int HEAD_DIM, int GROUP>
__global__ void __launch_bounds__(kThreads)
    partition_kernel(T* __restrict__ out, const T* __restrict__ query, const T* __restrict__ k_cache,
                     const T* __restrict__ v_cache, const KernelArgs a) {
  using L = RowLayout<T, HEAD_DIM>;
  constexpr int kStep = kUnroll * L::kTokens;  // token rows per warp per step
  static_assert(kPartition % kStep == 0, "a step never crosses the partition's score buffer");
  constexpr int kShared = GROUP * kPartition > kNumWarps * GROUP * HEAD_DIM ? GROUP * kPartition
                                                                            : kNumWarps * GROUP * HEAD_DIM;
  __shared__ float smem[kShared];  // scores [GROUP][kPartition], then the warps' sums [warp][GROUP][HEAD_DIM]
  __shared__ float scratch[kNumWarps][GROUP];

  const int kv_head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
  const int ctx = static_cast<int>(a.context_lens[seq]);
  const int start = part * kPartition;
  if (start >= ctx) return;  // the whole block: this partition lies past the sequence's end
  const int n = min(kPartition, ctx - start);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int row_lane = lane % L::kLanes, row_in_warp = lane / L::kLanes;
  const int head0 = kv_head * a.group;
  const int64_t* table = a.block_tables + static_cast<int64_t>(seq) * a.max_blocks;
  const int row_elems = a.num_kv_heads * HEAD_DIM;

  float q[GROUP][L::kVecs][L::kElems];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
#pragma unroll
    for (int v = 0; v < L::kVecs; ++v) {
      Vec<T> x;
      const int d = (v * L::kLanes + row_lane) * L::kElems;
      if (g < a.group) x.load(query + (static_cast<int64_t>(seq) * a.num_heads + head0 + g) * HEAD_DIM + d);
#pragma unroll
      for (int e = 0; e < L::kElems; ++e) q[g][v][e] = g < a.group ? x[e] * a.scale : 0.f;
    }
  }

  // The cache offset of token t of this partition's row for our kv head (t < n).
  auto row_of = [&](int t) {
    const int pos = start + t;
    const int slot = static_cast<int>(table[pos / a.block_size]) * a.block_size + pos % a.block_size;
    return static_cast<int64_t>(slot) * row_elems + kv_head * HEAD_DIM;
  };  // int32 slots: the binding checks that the cache has fewer than 2^31
  float(*scores)[kPartition] = reinterpret_cast<float(*)[kPartition]>(smem);

  // 1. Scores: each group of kLanes lanes takes kUnroll token rows per step, loading them all
  // before the first multiply (several 16-byte loads in flight per lane). `base` is warp-uniform,
  // so every lane reaches every shuffle; rows past n load nothing and are not stored.
  for (int base = warp * kStep; base < n; base += kNumWarps * kStep) {
    Vec<T> k[kUnroll][L::kVecs];
    load_rows<T, L>(k, k_cache, base, n, row_in_warp, row_lane, row_of);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * L::kTokens + row_in_warp;
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        float partial = 0.f;
        if (t < n) {
#pragma unroll
          for (int v = 0; v < L::kVecs; ++v)
#pragma unroll
            for (int e = 0; e < L::kElems; ++e) partial += q[g][v][e] * k[u][v][e];
        }
        const float score = group_sum<L::kLanes>(partial);
        if (t < n && row_lane == 0) scores[g][t] = score;
      }
    }
  }
  __syncthreads();

  // 2. Softmax over the partition: max, one exp per score, sum.
  float stat[GROUP];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) stat[g] = -FLT_MAX;
  for (int t = threadIdx.x; t < n; t += kThreads)
#pragma unroll
    for (int g = 0; g < GROUP; ++g) stat[g] = fmaxf(stat[g], scores[g][t]);
  block_reduce<GROUP, true>(stat, scratch);
  float max_score[GROUP], sum[GROUP];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    max_score[g] = stat[g];
    sum[g] = 0.f;
  }
  for (int t = threadIdx.x; t < n; t += kThreads)
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      const float p = __expf(scores[g][t] - max_score[g]);
      scores[g][t] = p;
      sum[g] += p;
    }
  block_reduce<GROUP, false>(sum, scratch);  // its barrier also publishes the probabilities

  // 3. Probability-weighted V rows, same walk as the scores.
  float acc[GROUP][L::kVecs][L::kElems] = {};
  for (int base = warp * kStep; base < n; base += kNumWarps * kStep) {
    Vec<T> val[kUnroll][L::kVecs];
    load_rows<T, L>(val, v_cache, base, n, row_in_warp, row_lane, row_of);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * L::kTokens + row_in_warp;
      if (t >= n) continue;  // no shuffles in this loop
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        const float p = scores[g][t];
#pragma unroll
        for (int v = 0; v < L::kVecs; ++v)
#pragma unroll
          for (int e = 0; e < L::kElems; ++e) acc[g][v][e] += p * val[u][v][e];
      }
    }
  }
  // Sum the rows a warp held side by side (lanes kLanes apart), then the warps, in shared memory.
#pragma unroll
  for (int g = 0; g < GROUP; ++g)
#pragma unroll
    for (int v = 0; v < L::kVecs; ++v)
#pragma unroll
      for (int e = 0; e < L::kElems; ++e)
#pragma unroll
        for (int offset = L::kLanes; offset < kWarpSize; offset *= 2)
          acc[g][v][e] += __shfl_xor_sync(0xffffffffu, acc[g][v][e], offset);
  __syncthreads();  // every warp is done reading the probabilities: smem now holds the sums
  float* sums = smem;
  if (row_in_warp == 0) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
      for (int v = 0; v < L::kVecs; ++v)
#pragma unroll
        for (int e = 0; e < L::kElems; ++e)
          sums[(warp * GROUP + g) * HEAD_DIM + (v * L::kLanes + row_lane) * L::kElems + e] = acc[g][v][e];
  }
  __syncthreads();

  const bool whole_sequence = ctx <= kPartition;  // one partition: write the output, no merge
  for (int i = threadIdx.x; i < a.group * HEAD_DIM; i += kThreads) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) o += sums[(w * GROUP + g) * HEAD_DIM + d];
    float total = 0.f;  // sum[g] with a runtime g, without dynamic register indexing
#pragma unroll
    for (int h = 0; h < GROUP; ++h) total = h == g ? sum[h] : total;
    const int64_t head = static_cast<int64_t>(seq) * a.num_heads + head0 + g;
    if (whole_sequence) {
      out[head * HEAD_DIM + d] = from_float<T>(o / total);
    } else {
      a.partial_out[(head * a.max_partitions + part) * HEAD_DIM + d] = o / total;
    }
  }
  if (!whole_sequence && threadIdx.x < a.group) {
    const int g = threadIdx.x;
    float m = 0.f, l = 0.f;
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
      m = h == g ? max_score[h] : m;
      l = h == g ? sum[h] : l;
    }
    const int64_t at = (static_cast<int64_t>(seq) * a.num_heads + head0 + g) * a.max_partitions + part;
    a.partial_max[at] = m;
    a.partial_sum[at] = l;
  }
}

// out = sum over partitions of partial_out * sum_p * exp(max_p - max) / (the same weights' sum).
// One block per (query head, sequence); sequences of one partition were written directly.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(T* __restrict__ out, const KernelArgs a, int head_dim) {
  const int head = blockIdx.x, seq = blockIdx.y;
  const int ctx = static_cast<int>(a.context_lens[seq]);
  const int parts = (ctx + kPartition - 1) / kPartition;
  if (parts <= 1) return;
  const int64_t base = (static_cast<int64_t>(seq) * a.num_heads + head) * a.max_partitions;
  float max_score = -FLT_MAX;
  for (int p = 0; p < parts; ++p) max_score = fmaxf(max_score, a.partial_max[base + p]);
  float total = 0.f;
  for (int p = 0; p < parts; ++p) total += a.partial_sum[base + p] * __expf(a.partial_max[base + p] - max_score);
  const float inv = 1.f / total;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float o = 0.f;
    for (int p = 0; p < parts; ++p)
      o += a.partial_out[(base + p) * head_dim + d] * a.partial_sum[base + p] *
           __expf(a.partial_max[base + p] - max_score);
    out[(static_cast<int64_t>(seq) * a.num_heads + head) * head_dim + d] = from_float<T>(o * inv);
  }
}

template <typename T, int HEAD_DIM, int GROUP>
cudaError_t launch(const DecodeArgs& d, const KernelArgs& a, cudaStream_t stream) {
  const dim3 grid(d.num_kv_heads, d.num_seqs, d.max_partitions);
  partition_kernel<T, HEAD_DIM, GROUP><<<grid, kThreads, 0, stream>>>(
      static_cast<T*>(d.out), static_cast<const T*>(d.query), static_cast<const T*>(d.k_cache),
      static_cast<const T*>(d.v_cache), a);
  if (d.max_partitions > 1)
    merge_kernel<T><<<dim3(d.num_heads, d.num_seqs), kThreads, 0, stream>>>(static_cast<T*>(d.out), a, HEAD_DIM);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const DecodeArgs& d, const KernelArgs& a, cudaStream_t stream) {
  return dispatch_shape(d.head_dim, a.group, [&](auto dim, auto group) {
    return launch<T, decltype(dim)::value, decltype(group)::value>(d, a, stream);
  });
}

}  // namespace

bool decode_supported(int num_heads, int num_kv_heads, int head_dim) {
  const bool dim_ok = head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
  return dim_ok && num_kv_heads > 0 && num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= kDecodeMaxGroup;
}

cudaError_t paged_attention_decode(const DecodeArgs& d, DType dtype, cudaStream_t stream) {
  if (!decode_supported(d.num_heads, d.num_kv_heads, d.head_dim)) return cudaErrorInvalidValue;
  if (d.max_partitions > 1 && (d.partial_out == nullptr || d.partial_max == nullptr || d.partial_sum == nullptr))
    return cudaErrorInvalidValue;
  if (d.num_seqs == 0) return cudaSuccess;
  const KernelArgs a{d.block_tables, d.context_lens, d.partial_out, d.partial_max, d.partial_sum,
                     d.num_heads, d.num_kv_heads, d.num_heads / d.num_kv_heads, d.block_size, d.max_blocks,
                     d.max_partitions, d.scale};
  switch (dtype) {
    case DType::kFloat32: return dispatch_head_dim<float>(d, a, stream);
    case DType::kFloat16: return dispatch_head_dim<__half>(d, a, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(d, a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace s1serve::cuda
