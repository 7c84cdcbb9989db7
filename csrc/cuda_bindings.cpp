// The CUDA implementations of the s1serve ops: argument checks in torch terms, then the plain
// CUDA launchers of csrc/cuda/. Built only when the installed torch has CUDA (see setup.py).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "attention_checks.h"
#include "cuda/kernels.h"

namespace s1serve {
namespace {

cuda::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return cuda::DType::kFloat32;
    case torch::kHalf: return cuda::DType::kFloat16;
    case torch::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "s1serve CUDA ops support float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

// Every tensor on the CUDA device of the first: a CPU block table reaching a kernel is an illegal address.
void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const torch::Tensor*>> tensors) {
  const torch::Tensor& first = *tensors.begin()->second;
  TORCH_CHECK(first.is_cuda(), op, ": ", tensors.begin()->first, " must be a CUDA tensor");
  for (const auto& [name, t] : tensors)
    TORCH_CHECK(t->device() == first.device(), op, ": ", name, " is on ", t->device(), ", expected ", first.device());
}

constexpr int64_t kMaxGridY = 65535;  // gridDim.y / z carry a decode launch's sequences / partitions

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status != cudaErrorInvalidValue, op, ": shape not supported by the CUDA kernel");
  TORCH_CHECK(status == cudaSuccess, op, ": ", cudaGetErrorString(status));
}

// The attention kernels' compile-time shapes (kernels.h decode_supported; the engine refuses other
// models at start-up).
void check_kernel_shape(const char* op, const torch::Tensor& query, const torch::Tensor& k_cache) {
  TORCH_CHECK(cuda::decode_supported(static_cast<int>(query.size(1)), static_cast<int>(k_cache.size(2)),
                                     static_cast<int>(query.size(2))),
              op, ": ", query.size(1), " heads over ", k_cache.size(2), " KV heads of dim ", query.size(2),
              " is not supported by the CUDA kernel (GQA group <= ", cuda::kDecodeMaxGroup,
              ", head_dim in 16/32/64/128/256)");
}

void paged_attention_decode(torch::Tensor out, const torch::Tensor& query, const torch::Tensor& k_cache,
                            const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                            const torch::Tensor& context_lens, double scale) {
  check_same_device("paged_attention_decode", {{"query", &query}, {"out", &out}, {"k_cache", &k_cache},
                                              {"v_cache", &v_cache}, {"block_tables", &block_tables},
                                              {"context_lens", &context_lens}});
  check_decode_args(out, query, k_cache, v_cache, block_tables, context_lens);
  check_kernel_shape("paged_attention_decode", query, k_cache);
  TORCH_CHECK(query.size(0) <= kMaxGridY, "paged_attention_decode: at most ", kMaxGridY, " sequences per call");
  TORCH_CHECK(k_cache.size(0) * k_cache.size(1) < (int64_t{1} << 31), "paged_attention_decode: at most 2^31 cache slots");
  // The kernel reads 16 bytes at a time.
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&out, &query, &k_cache, &v_cache})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "paged_attention_decode: tensors must be 16-byte aligned");
  // Partitions of the longest possible context (the table's width), so sizing the workspace
  // needs no host sync on context_lens.
  const int64_t max_context = block_tables.size(1) * k_cache.size(1);
  const int partitions = cuda::decode_partitions(max_context);
  TORCH_CHECK(partitions <= kMaxGridY, "paged_attention_decode: contexts of at most ",
              kMaxGridY * cuda::kDecodePartitionTokens, " tokens");
  const c10::cuda::CUDAGuard guard(query.device());
  torch::Tensor partial_out, partial_stats;
  if (partitions > 1) {
    const auto options = query.options().dtype(torch::kFloat);
    partial_out = torch::empty({query.size(0), query.size(1), partitions, query.size(2)}, options);
    partial_stats = torch::empty({2, query.size(0), query.size(1), partitions}, options);
  }
  float* stats = partitions > 1 ? partial_stats.data_ptr<float>() : nullptr;
  cuda::DecodeArgs args{out.data_ptr(), query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                        block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                        partitions > 1 ? partial_out.data_ptr<float>() : nullptr, stats,
                        stats == nullptr ? nullptr : stats + partial_stats[0].numel(),
                        static_cast<int>(query.size(0)), static_cast<int>(query.size(1)),
                        static_cast<int>(k_cache.size(2)), static_cast<int>(query.size(2)),
                        static_cast<int>(k_cache.size(1)), static_cast<int>(block_tables.size(1)),
                        partitions, static_cast<float>(scale)};
  check_launch(cuda::paged_attention_decode(args, dtype_of(query), c10::cuda::getCurrentCUDAStream()),
               "paged_attention_decode");
}

void paged_attention_prefill(torch::Tensor out, const torch::Tensor& query, const torch::Tensor& k_cache,
                             const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                             const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k, double scale) {
  check_same_device("paged_attention_prefill", {{"query", &query}, {"out", &out}, {"k_cache", &k_cache},
                                               {"v_cache", &v_cache}, {"block_tables", &block_tables},
                                               {"cu_seqlens_q", &cu_seqlens_q}, {"cu_seqlens_k", &cu_seqlens_k}});
  check_prefill_args(out, query, k_cache, v_cache, block_tables, cu_seqlens_q, cu_seqlens_k);
  TORCH_CHECK(query.scalar_type() == torch::kHalf || query.scalar_type() == torch::kBFloat16,
              "paged_attention_prefill on CUDA takes float16 or bfloat16 (fp32 runs SDPA), got ", query.scalar_type());
  check_kernel_shape("paged_attention_prefill", query, k_cache);
  const int64_t num_seqs = block_tables.size(0);
  TORCH_CHECK(query.size(0) < (int64_t{1} << 31), "paged_attention_prefill: fewer than 2^31 query rows");
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&out, &query, &k_cache, &v_cache})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "paged_attention_prefill: tensors must be 16-byte aligned");
  // Lengths stay on the device (checking them would sync every layer); the engine builds them,
  // and the kernel reads no table entry past a context's ceil(ctx / block_size).
  const c10::cuda::CUDAGuard guard(query.device());
  cuda::PrefillArgs args{out.data_ptr(), query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                         block_tables.data_ptr<int64_t>(), cu_seqlens_q.data_ptr<int32_t>(),
                         cu_seqlens_k.data_ptr<int32_t>(), static_cast<int>(num_seqs),
                         static_cast<int>(query.size(0)), static_cast<int>(query.size(1)),
                         static_cast<int>(k_cache.size(2)), static_cast<int>(query.size(2)),
                         static_cast<int>(k_cache.size(1)), static_cast<int>(block_tables.size(1)),
                         static_cast<float>(scale)};
  check_launch(cuda::paged_attention_prefill(args, dtype_of(query), c10::cuda::getCurrentCUDAStream()),
               "paged_attention_prefill");
}

void reshape_and_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor k_cache,
                       torch::Tensor v_cache, const torch::Tensor& slot_mapping) {
  check_same_device("reshape_and_cache", {{"key", &key}, {"value", &value}, {"k_cache", &k_cache},
                                         {"v_cache", &v_cache}, {"slot_mapping", &slot_mapping}});
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "key/value (tokens, kv_heads, head_dim) expected");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && key.size(1) == k_cache.size(2) &&
                  key.size(2) == k_cache.size(3),
              "caches (blocks, block_size, kv_heads, head_dim) matching key expected");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.size(0) == key.size(0),
              "slot_mapping must be int64 with one slot per token");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == v_cache.scalar_type(),
              "key/value and cache dtypes differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  // Rows may be strided (a slice of the fused qkv projection); within a row, elements are dense.
  TORCH_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 &&
                  value.stride(1) == value.size(2),
              "key/value rows must be contiguous");
  const c10::cuda::CUDAGuard guard(key.device());
  cuda::CacheArgs args{key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                       slot_mapping.data_ptr<int64_t>(), static_cast<int>(key.size(0)),
                       static_cast<int>(key.size(1) * key.size(2)), key.stride(0), value.stride(0),
                       k_cache.size(0) * k_cache.size(1)};
  check_launch(cuda::reshape_and_cache(args, dtype_of(key), c10::cuda::getCurrentCUDAStream()), "reshape_and_cache");
}

}  // namespace

TORCH_LIBRARY_IMPL(s1serve, CUDA, m) {
  m.impl("paged_attention_decode", &paged_attention_decode);
  m.impl("paged_attention_prefill", &paged_attention_prefill);
  m.impl("reshape_and_cache", &reshape_and_cache);
}

}  // namespace s1serve
