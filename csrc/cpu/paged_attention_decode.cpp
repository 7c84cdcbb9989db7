// Paged-attention decode on the CPU: one query token per sequence attends to its K/V blocks,
// read in place through the block table (no gather into a padded copy, which is what makes the
// pure-torch reference memory-bound). One task per (sequence, kv head) serves the whole GQA
// group of query heads that share that kv head, so each K/V row is read once per step.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace s1serve {
namespace {

// Eight independent partial sums let the compiler vectorize without reassociating floats itself.
template <typename scalar_t>
inline float dot(const scalar_t* k, const float* q, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<float>(k[i + j]) * q[i + j];
  float sum = 0;
  for (; i < n; ++i) sum += static_cast<float>(k[i]) * q[i];
  for (int j = 0; j < 8; ++j) sum += acc[j];
  return sum;
}

template <typename scalar_t>
void decode(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& k_cache,
            const torch::Tensor& v_cache, const torch::Tensor& block_tables,
            const torch::Tensor& context_lens, double scale) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t slot_stride = num_kv_heads * head_dim;  // between consecutive tokens of a block
  const int64_t block_stride = block_size * slot_stride;

  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * head_dim), acc(group * head_dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / num_kv_heads, kv_head = task % num_kv_heads;
      const int64_t ctx = lens[seq];
      const int64_t* table = tables + seq * max_blocks;
      const int64_t head0 = kv_head * group;  // first query head of this group
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < head_dim; ++d)
          q[g * head_dim + d] =
              static_cast<float>(q_ptr[(seq * num_heads + head0 + g) * head_dim + d]) * static_cast<float>(scale);

      // scores: (group, ctx)
      scores.resize(group * ctx);
      for (int64_t pos = 0; pos < ctx; ++pos) {
        const scalar_t* k = k_ptr + table[pos / block_size] * block_stride + (pos % block_size) * slot_stride +
                            kv_head * head_dim;
        for (int64_t g = 0; g < group; ++g) scores[g * ctx + pos] = dot(k, &q[g * head_dim], head_dim);
      }
      std::vector<float> inv_sum(group);
      for (int64_t g = 0; g < group; ++g) {
        float* s = &scores[g * ctx];
        const float m = *std::max_element(s, s + ctx);
        float sum = 0;
        for (int64_t pos = 0; pos < ctx; ++pos) sum += (s[pos] = std::exp(s[pos] - m));
        inv_sum[g] = 1.0f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t pos = 0; pos < ctx; ++pos) {
        const scalar_t* v = v_ptr + table[pos / block_size] * block_stride + (pos % block_size) * slot_stride +
                            kv_head * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * ctx + pos];
          float* a = &acc[g * head_dim];
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(v[d]);
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < head_dim; ++d)
          out_ptr[(seq * num_heads + head0 + g) * head_dim + d] =
              static_cast<scalar_t>(acc[g * head_dim + d] * inv_sum[g]);
    }
  });
}

void paged_attention_decode(torch::Tensor out, const torch::Tensor& query, const torch::Tensor& k_cache,
                            const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                            const torch::Tensor& context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "query (seqs, heads, dim) and caches (blocks, block_size, kv_heads, dim) expected");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(query.size(2) == k_cache.size(3), "head_dim of query and cache differ");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(block_tables.size(0) == query.size(0) && context_lens.size(0) == query.size(0),
              "one block table and one context length per sequence");
  TORCH_CHECK(query.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  block_tables.is_contiguous() && context_lens.is_contiguous() && out.is_contiguous(),
              "contiguous tensors expected");
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type(), "out must match query");
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type(), "cache and query dtypes differ");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention_decode", [&] {
    decode<scalar_t>(out, query, k_cache, v_cache, block_tables, context_lens, scale);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s1serve, CPU, m) { m.impl("paged_attention_decode", &paged_attention_decode); }

}  // namespace s1serve
