// Writes the new tokens' K/V rows into the paged cache at their slots (slot = block * block_size
// + offset). A negative slot means "padding, write nothing", so a padded batch (CUDA graphs pad
// to a captured size) needs no separate path.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstring>

namespace s1serve {
namespace {

void reshape_and_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor k_cache,
                       torch::Tensor v_cache, const torch::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "key/value (tokens, kv_heads, head_dim) expected");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "caches (blocks, block_size, kv_heads, head_dim) expected");
  TORCH_CHECK(key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3), "key and cache head shapes differ");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == key.size(0),
              "slot_mapping must be int64 with one slot per token");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == v_cache.scalar_type(),
              "key/value and cache dtypes differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slot_mapping.is_contiguous(),
              "caches and slot_mapping must be contiguous");
  const torch::Tensor k = key.contiguous(), v = value.contiguous();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t row_bytes = k.size(1) * k.size(2) * k.element_size();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < slot_mapping.size(0); ++i)
    TORCH_CHECK(slots[i] < num_slots, "slot ", slots[i], " is outside the cache (", num_slots, " slots)");
  const char* k_src = static_cast<const char*>(k.data_ptr());
  const char* v_src = static_cast<const char*>(v.data_ptr());
  char* k_dst = static_cast<char*>(k_cache.data_ptr());
  char* v_dst = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, k.size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (slots[i] < 0) continue;
      std::memcpy(k_dst + slots[i] * row_bytes, k_src + i * row_bytes, row_bytes);
      std::memcpy(v_dst + slots[i] * row_bytes, v_src + i * row_bytes, row_bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s1serve, CPU, m) { m.impl("reshape_and_cache", &reshape_and_cache); }

}  // namespace s1serve
