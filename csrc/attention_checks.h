// The attention ops' argument checks that hold on every device: shapes, dtypes and layout. Each
// binding adds what its own kernel needs besides (the CPU's head_dim multiple and length values;
// CUDA's devices, alignment and supported shapes).
#pragma once

#include <torch/types.h>

namespace s1serve {

inline void check_attention_tensors(const torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& k_cache,
                                    const torch::Tensor& v_cache) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "query (rows, heads, dim) and caches (blocks, block_size, kv_heads, dim) expected");
  TORCH_CHECK(query.size(2) == k_cache.size(3), "head_dim of query and cache differ");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(query.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous(),
              "contiguous tensors expected");
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type(), "out must match query");
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() && v_cache.scalar_type() == query.scalar_type(),
              "cache and query dtypes differ");
}

inline void check_decode_args(const torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& k_cache,
                              const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                              const torch::Tensor& context_lens) {
  check_attention_tensors(out, query, k_cache, v_cache);
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == query.size(0) && context_lens.dim() == 1 &&
                  context_lens.size(0) == query.size(0),
              "block_tables (num_seqs, max_blocks) and context_lens (num_seqs,) must have one row per query");
  TORCH_CHECK(block_tables.is_contiguous() && context_lens.is_contiguous(), "contiguous tensors expected");
}

inline void check_prefill_args(const torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& k_cache,
                               const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                               const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k) {
  check_attention_tensors(out, query, k_cache, v_cache);
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && block_tables.dim() == 2, "block_tables must be 2-D int64");
  TORCH_CHECK(cu_seqlens_q.scalar_type() == torch::kInt && cu_seqlens_k.scalar_type() == torch::kInt,
              "cu_seqlens must be int32");
  const int64_t num_seqs = block_tables.size(0);
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.numel() == num_seqs + 1 && cu_seqlens_k.dim() == 1 &&
                  cu_seqlens_k.numel() == num_seqs + 1,
              "cu_seqlens need one entry per sequence (block table row) plus one");
  TORCH_CHECK(block_tables.is_contiguous() && cu_seqlens_q.is_contiguous() && cu_seqlens_k.is_contiguous(),
              "contiguous tensors expected");
}

}  // namespace s1serve
