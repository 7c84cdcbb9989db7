// Launchers for the CUDA kernels. Plain C++ types only (no torch headers), so the kernel files
// compile with nvcc alone (CI checks that on machines without a GPU) and the torch binding
// (csrc/cuda_bindings.cpp) stays the only file that needs torch's CUDA headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace s1serve::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// The decode kernel splits each context into partitions of this many tokens (one thread block
// each) and merges them; at most this many query heads share a KV head.
constexpr int kDecodePartitionTokens = 512;
constexpr int kDecodeMaxGroup = 8;

// Partitions the longest context of a batch can have: the size of the merge workspace.
inline int decode_partitions(int64_t max_context) {
  return static_cast<int>((max_context + kDecodePartitionTokens - 1) / kDecodePartitionTokens);
}

struct DecodeArgs {
  void* out;                   // (num_seqs, num_heads, head_dim); 16-byte aligned, like the next three
  const void* query;           // (num_seqs, num_heads, head_dim)
  const void* k_cache;         // (num_blocks, block_size, num_kv_heads, head_dim)
  const void* v_cache;         // same
  const int64_t* block_tables;  // (num_seqs, max_blocks)
  const int64_t* context_lens;  // (num_seqs,), each >= 1 and <= max_blocks * block_size
  // fp32 workspace when max_partitions > 1 (else unused, may be null):
  float* partial_out;          // (num_seqs, num_heads, max_partitions, head_dim)
  float* partial_max;          // (num_seqs, num_heads, max_partitions)
  float* partial_sum;          // same
  int num_seqs, num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  int max_partitions;          // decode_partitions(max_blocks * block_size); grid z, <= 65535
  float scale;
};

// Whether the decode kernel covers a model's attention shape: head_dim in {16, 32, 64, 128, 256}
// and at most kDecodeMaxGroup query heads per KV head. Checked at start-up (the engine refuses
// the model) and per call by the binding.
bool decode_supported(int num_heads, int num_kv_heads, int head_dim);

// Returns cudaErrorInvalidValue for shapes `decode_supported` refuses (or a missing workspace),
// else the launch status.
cudaError_t paged_attention_decode(const DecodeArgs& args, DType dtype, cudaStream_t stream);

struct PrefillArgs {
  void* out;                    // (total_q, num_heads, head_dim); 16-byte aligned, like the next three
  const void* query;            // (total_q, num_heads, head_dim)
  const void* k_cache;          // (num_blocks, block_size, num_kv_heads, head_dim)
  const void* v_cache;          // same
  const int64_t* block_tables;  // (num_seqs, max_blocks)
  const int32_t* cu_seqlens_q;  // (num_seqs + 1,): sequence i's queries are rows [q[i], q[i+1])
  const int32_t* cu_seqlens_k;  // (num_seqs + 1,): its context (cached + new) is k[i+1] - k[i] tokens
  int num_seqs, total_q, num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  float scale;
};

// fp16 / bf16 on tensor cores, the shapes decode_supported covers; cudaErrorInvalidValue for the
// rest (fp32 included), else the launch status. Each query attends causally, bottom-right aligned,
// to its sequence's cache through the block table (the new tokens already written there).
cudaError_t paged_attention_prefill(const PrefillArgs& args, DType dtype, cudaStream_t stream);

struct CacheArgs {
  const void* key;              // (num_tokens, num_kv_heads, head_dim), rows `key_stride` apart
  const void* value;
  void* k_cache;                // (num_blocks, block_size, num_kv_heads, head_dim)
  void* v_cache;
  const int64_t* slot_mapping;  // (num_tokens,), negative = padding, skipped
  int num_tokens, row_elems;    // row_elems = num_kv_heads * head_dim
  int64_t key_stride, value_stride;  // elements between consecutive tokens of key / value
  int64_t num_slots;            // num_blocks * block_size: a slot at or past it writes nothing
};

cudaError_t reshape_and_cache(const CacheArgs& args, DType dtype, cudaStream_t stream);

}  // namespace s1serve::cuda
