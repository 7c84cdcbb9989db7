// Paged-attention prefill on CUDA: a varlen batch of query chunks attends causally (bottom-right
// aligned) to its sequences' cached K/V, read through the block tables in place, so a chunk after
// a long cached context (budget forcing's every Wait and forced end, a follow-up turn) costs no
// per-layer gather of that context. One thread block per (tile of query rows, kv head); its 64 rows
// are (token, head of the GQA group) pairs, so every K/V tile is loaded into shared memory once for
// the whole group. QK^T and PV run on tensor cores (WMMA 16x16x16, fp32 accumulators); the softmax
// is online over tiles of 64 keys (32 at head_dim 256), each warp owning 16 rows, two lanes per row.
// fp16 and bf16 only: an fp32 model runs SDPA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>

#include "dispatch.cuh"
#include "kernels.h"

namespace s1serve::cuda {
namespace {

using namespace nvcuda;

constexpr int kWarpSize = 32;
constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * kWarpSize;
constexpr int kRows = 16 * kNumWarps;  // query rows of a tile: 16 per warp, one WMMA row block

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Shared-memory layout of one tile. Rows are padded (8 halves, 4 floats) so the WMMA loads of
// consecutive rows fall in different banks; every array starts 32-byte aligned, as WMMA needs.
template <int HEAD_DIM, int GROUP>
struct Tile {
  static constexpr int kKeys = HEAD_DIM == 256 ? 32 : 64;  // keys per step (256: to fit A100's shared memory)
  static constexpr int kTokens = kRows / GROUP;            // query tokens per tile
  static constexpr int kLdh = HEAD_DIM + 8;                // halves per Q/K/V row
  static constexpr int kLds = kKeys + 4;                   // floats per score row
  static constexpr int kLdp = kKeys + 8;                   // halves per probability row
  static constexpr int kLdo = HEAD_DIM + 4;                // floats per output row
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kRows * kLdh * 2;
  static constexpr int kV = kK + kKeys * kLdh * 2;
  static constexpr int kS = kV + kKeys * kLdh * 2;
  static constexpr int kP = kS + kRows * kLds * 4;
  static constexpr int kO = kP + kRows * kLdp * 2;
  static constexpr int kBytes = kO + kRows * kLdo * 4;
  static_assert(kK % 32 == 0 && kV % 32 == 0 && kS % 32 == 0 && kP % 32 == 0 && kO % 32 == 0, "WMMA alignment");
};

struct KernelArgs {
  const int64_t* block_tables;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int num_seqs, num_heads, num_kv_heads, group, block_size, max_blocks;
  float scale;
};

// `rows` rows of HEAD_DIM elements into shared memory (ld halves apart), 16 bytes per thread per
// step; row r comes from src_of(r), or is zeroed where that is null (padding rows, keys past the
// context: a zero V row keeps 0 * garbage from turning into NaN).
template <typename T, int HEAD_DIM, typename SrcOf>
__device__ __forceinline__ void load_tile(T* dst, int rows, int ld, SrcOf src_of) {
  constexpr int kVecs = HEAD_DIM * sizeof(T) / 16;
  for (int i = threadIdx.x; i < rows * kVecs; i += kThreads) {
    const int r = i / kVecs, c = i % kVecs * (16 / sizeof(T));
    const T* src = src_of(r);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = src ? *reinterpret_cast<const uint4*>(src + c) : make_uint4(0, 0, 0, 0);
  }
}

// GROUP is the group size rounded up to 1, 2, 4 or 8; rows of heads past the real group are
// computed on zeros and never written.
template <typename T, int HEAD_DIM, int GROUP>
__global__ void __launch_bounds__(kThreads)
    prefill_kernel(T* __restrict__ out, const T* __restrict__ query, const T* __restrict__ k_cache,
                   const T* __restrict__ v_cache, const KernelArgs a) {
  using L = Tile<HEAD_DIM, GROUP>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  T* v_s = reinterpret_cast<T*>(smem + L::kV);
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  T* p_s = reinterpret_cast<T*>(smem + L::kP);
  float* o_s = reinterpret_cast<float*>(smem + L::kO);

  // Which sequence and which of its tiles: each sequence has ceil(q_len / kTokens) tiles, in order.
  int tile = blockIdx.x, seq = 0;
  for (; seq < a.num_seqs; ++seq) {
    const int tiles = (a.cu_seqlens_q[seq + 1] - a.cu_seqlens_q[seq] + L::kTokens - 1) / L::kTokens;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (seq == a.num_seqs) return;  // past the batch's last tile (the grid is an upper bound)
  const int q0 = a.cu_seqlens_q[seq], q_len = a.cu_seqlens_q[seq + 1] - q0;
  const int ctx = a.cu_seqlens_k[seq + 1] - a.cu_seqlens_k[seq];
  const int tok0 = tile * L::kTokens;
  const int kv_head = blockIdx.y, head0 = kv_head * a.group;
  const int64_t* table = a.block_tables + static_cast<int64_t>(seq) * a.max_blocks;
  const int64_t row_elems = static_cast<int64_t>(a.num_kv_heads) * HEAD_DIM;
  // Keys up to the tile's last token's position: positions ctx - q_len + token are queries.
  const int num_keys = ctx - q_len + min(tok0 + L::kTokens, q_len);

  load_tile<T, HEAD_DIM>(q_s, kRows, L::kLdh, [&](int r) -> const T* {
    const int tok = tok0 + r / GROUP, g = r % GROUP;
    if (tok >= q_len || g >= a.group) return nullptr;
    return query + (static_cast<int64_t>(q0 + tok) * a.num_heads + head0 + g) * HEAD_DIM;
  });
  for (int i = threadIdx.x; i < kRows * L::kLdo; i += kThreads) o_s[i] = 0.f;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int row = warp * 16 + lane / 2, half = lane % 2;  // this lane's row, and which half of its columns
  const int row_pos = ctx - q_len + min(tok0 + row / GROUP, q_len - 1);  // padding rows: the last token's
  float run_max = -INFINITY, run_sum = 0.f;

  for (int key0 = 0; key0 < num_keys; key0 += L::kKeys) {
    __syncthreads();  // the previous step is done with K/V (and, first time, Q and O are stored)
    auto key_row = [&](const T* cache) {
      return [=](int j) -> const T* {
        const int pos = key0 + j;
        if (pos >= num_keys) return nullptr;
        const int64_t slot = table[pos / a.block_size] * a.block_size + pos % a.block_size;
        return cache + slot * row_elems + kv_head * HEAD_DIM;
      };
    };
    load_tile<T, HEAD_DIM>(k_s, L::kKeys, L::kLdh, key_row(k_cache));
    load_tile<T, HEAD_DIM>(v_s, L::kKeys, L::kLdh, key_row(v_cache));
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag[L::kKeys / 16];
#pragma unroll
    for (int j = 0; j < L::kKeys / 16; ++j) wmma::fill_fragment(s_frag[j], 0.f);
#pragma unroll
    for (int d = 0; d < HEAD_DIM; d += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag;
      wmma::load_matrix_sync(q_frag, q_s + warp * 16 * L::kLdh + d, L::kLdh);
#pragma unroll
      for (int j = 0; j < L::kKeys / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;  // K rows are K^T's columns
        wmma::load_matrix_sync(k_frag, k_s + j * 16 * L::kLdh + d, L::kLdh);
        wmma::mma_sync(s_frag[j], q_frag, k_frag, s_frag[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < L::kKeys / 16; ++j)
      wmma::store_matrix_sync(s_s + warp * 16 * L::kLds + j * 16, s_frag[j], L::kLds, wmma::mem_row_major);
    __syncwarp();

    // Online softmax: two lanes per row, half the step's keys each; masked keys score -inf.
    constexpr int kHalf = L::kKeys / 2;
    float* s_row = s_s + row * L::kLds + half * kHalf;
    float step_max = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < kHalf; ++c) {
      const int pos = key0 + half * kHalf + c;
      const float x = pos <= row_pos ? s_row[c] * a.scale : -INFINITY;
      s_row[c] = x;
      step_max = fmaxf(step_max, x);
    }
    step_max = fmaxf(step_max, __shfl_xor_sync(0xffffffffu, step_max, 1));
    const float new_max = fmaxf(run_max, step_max);  // finite: key 0 is visible to every row
    const float correction = __expf(run_max - new_max);
    float step_sum = 0.f;
    T* p_row = p_s + row * L::kLdp + half * kHalf;
#pragma unroll 8
    for (int c = 0; c < kHalf; ++c) {
      const float p = __expf(s_row[c] - new_max);
      step_sum += p;
      p_row[c] = from_float<T>(p);  // P rounded to the model's dtype for the PV product, as flash-attn does
    }
    step_sum += __shfl_xor_sync(0xffffffffu, step_sum, 1);
    run_sum = run_sum * correction + step_sum;
    run_max = new_max;
    float* o_row = o_s + row * L::kLdo + half * (HEAD_DIM / 2);
#pragma unroll 8
    for (int d = 0; d < HEAD_DIM / 2; ++d) o_row[d] *= correction;
    __syncwarp();

    // O += P V, accumulated in shared memory (a WMMA accumulator's rows are opaque, so the
    // correction above is applied there).
#pragma unroll
    for (int d = 0; d < HEAD_DIM; d += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::load_matrix_sync(o_frag, o_s + warp * 16 * L::kLdo + d, L::kLdo, wmma::mem_row_major);
#pragma unroll
      for (int j = 0; j < L::kKeys / 16; ++j) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, p_s + warp * 16 * L::kLdp + j * 16, L::kLdp);
        wmma::load_matrix_sync(v_frag, v_s + j * 16 * L::kLdh + d, L::kLdh);
        wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
      }
      wmma::store_matrix_sync(o_s + warp * 16 * L::kLdo + d, o_frag, L::kLdo, wmma::mem_row_major);
    }
    __syncwarp();
  }

  const int tok = tok0 + row / GROUP, g = row % GROUP;
  if (tok >= q_len || g >= a.group) return;
  const float inv = 1.f / run_sum;
  const float* o_row = o_s + row * L::kLdo + half * (HEAD_DIM / 2);
  T* dst = out + (static_cast<int64_t>(q0 + tok) * a.num_heads + head0 + g) * HEAD_DIM + half * (HEAD_DIM / 2);
  for (int d = 0; d < HEAD_DIM / 2; ++d) dst[d] = from_float<T>(o_row[d] * inv);
}

template <typename T, int HEAD_DIM, int GROUP>
cudaError_t launch(const PrefillArgs& p, const KernelArgs& a, cudaStream_t stream) {
  using L = Tile<HEAD_DIM, GROUP>;
  auto kernel = prefill_kernel<T, HEAD_DIM, GROUP>;
  // Above 48 KiB of dynamic shared memory needs the opt-in (per device, so on every launch).
  const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes);
  if (attr != cudaSuccess) return attr;
  // An upper bound on the tiles: sum of ceil(q_len / kTokens) <= total_q / kTokens + num_seqs.
  const dim3 grid(p.total_q / L::kTokens + p.num_seqs, p.num_kv_heads);
  kernel<<<grid, kThreads, L::kBytes, stream>>>(static_cast<T*>(p.out), static_cast<const T*>(p.query),
                                                static_cast<const T*>(p.k_cache), static_cast<const T*>(p.v_cache), a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const PrefillArgs& p, const KernelArgs& a, cudaStream_t stream) {
  return dispatch_shape(p.head_dim, a.group, [&](auto dim, auto group) {
    return launch<T, decltype(dim)::value, decltype(group)::value>(p, a, stream);
  });
}

}  // namespace

cudaError_t paged_attention_prefill(const PrefillArgs& p, DType dtype, cudaStream_t stream) {
  if (!decode_supported(p.num_heads, p.num_kv_heads, p.head_dim)) return cudaErrorInvalidValue;
  if (p.num_seqs == 0 || p.total_q == 0) return cudaSuccess;
  const KernelArgs a{p.block_tables, p.cu_seqlens_q, p.cu_seqlens_k, p.num_seqs, p.num_heads, p.num_kv_heads,
                     p.num_heads / p.num_kv_heads, p.block_size, p.max_blocks, p.scale};
  switch (dtype) {
    case DType::kFloat16: return dispatch_head_dim<__half>(p, a, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, a, stream);
    case DType::kFloat32: return cudaErrorInvalidValue;  // tensor cores take 16-bit inputs here; fp32 runs SDPA
  }
  return cudaErrorInvalidValue;
}

}  // namespace s1serve::cuda
