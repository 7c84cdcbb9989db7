// Varlen causal prefill on the CPU, reading K/V in place from the paged cache. Sequence i's
// queries are rows cu_seqlens_q[i]..cu_seqlens_q[i+1] of `query`, the last q_len of its
// ctx = cu_seqlens_k[i+1] - cu_seqlens_k[i] tokens (the rest came from the prefix cache or an
// earlier chunk), and each attends to every key at or before its own position: the causal mask
// is aligned bottom-right, as flash-attn's varlen kernels align it.
//
// A task is (sequence, tile of 16 query rows, kv head) and serves the GQA group of that head.
// Rows sit in vector lanes: Q is transposed into scratch (head_dim x 16), so a score row for one
// key is 2 vec8 FMAs per dimension, and the online softmax (max, exp, sum) runs on 16 rows at once.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention_checks.h"
#include "isa.h"
#include "vec.h"

namespace s1serve {
namespace {

constexpr int64_t kRows = 16;  // query rows per task: two vec8 of lanes

struct PrefillShape {
  int64_t num_heads, head_dim, block_size, group, slot_stride, block_stride, max_blocks;
  bool bf16_pairs;  // a bf16 cache on a CPU with VDPBF16PS, head_dim a multiple of 32: prefill_task<true>
};

// Per-thread buffers, held as floats and used through vec8 pointers: a std::vector<vec8> would
// drop the typedef's aligned(4) and let the compiler emit aligned 32-byte loads on 16-byte memory.
struct Scratch {
  std::vector<float> qt_, scores_, acc_, kv;
  vec8* qt;      // head_dim x 2: Q tile transposed (a row per lane), pre-scaled
  vec8* scores;  // block_size x 2: this block's scores, then probabilities
  vec8* acc;     // kRows x head_dim/8: unnormalised output rows
  // kv: a block's K then V rows for one kv head widened to fp32 (2 x block_size x head_dim), so a
  // half-precision cache is converted once per block, not once per query row and head
  Scratch(const PrefillShape& s, bool widen)
      : qt_(kRows * s.head_dim), scores_(kRows * s.block_size), acc_(kRows * s.head_dim),
        kv(widen ? 2 * s.block_size * s.head_dim : 0), qt(reinterpret_cast<vec8*>(qt_.data())),
        scores(reinterpret_cast<vec8*>(scores_.data())), acc(reinterpret_cast<vec8*>(acc_.data())) {}
};

// kPaired (bf16 on AVX512-BF16): Q's rows as bf16 pairs in lanes and each cached K pair broadcast,
// so one VDPBF16PS is two dimensions of 16 rows' scores with nothing widened; V rows paired for
// the PV products, the probabilities rounded to bf16 (as flash-attn rounds them).
template <bool kPaired, typename scalar_t>
S1_INLINE void prefill_task(const PrefillShape& s, const scalar_t* q_ptr, const scalar_t* k_ptr,
                            const scalar_t* v_ptr, scalar_t* out_ptr, const int64_t* table, int64_t q_len,
                            int64_t ctx, int64_t row0, int64_t kv, float scale, Scratch& w) {
  const int64_t rows = std::min(kRows, q_len - row0), chunks = s.head_dim / 8, bs = s.block_size;
  const int64_t first_pos = ctx - q_len + row0;  // position of the tile's first query row
  const int64_t num_keys = first_pos + rows;     // keys any row of the tile can see
  const vec8i lane_lo = {0, 1, 2, 3, 4, 5, 6, 7}, lane_hi = lane_lo + 8;
  const vec8 neg_inf = vec8{} - std::numeric_limits<float>::infinity();
  float* qt = reinterpret_cast<float*>(w.qt);
  for (int64_t g = 0; g < s.group; ++g) {
    const int64_t head = kv * s.group + g;
    std::fill(qt, qt + kRows * s.head_dim, 0.0f);  // rows past the tile stay zero: finite, never stored
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* src = q_ptr + ((row0 + r) * s.num_heads + head) * s.head_dim;
      if constexpr (kPaired)  // pair i of row r at word i * kRows + r
        for (int64_t i = 0; i < s.head_dim / 2; ++i) std::memcpy(qt + i * kRows + r, src + 2 * i, sizeof(float));
      else
        for (int64_t d = 0; d < s.head_dim; ++d) qt[d * kRows + r] = static_cast<float>(src[d]) * scale;
    }
    vec8 max_lo = neg_inf, max_hi = neg_inf, sum_lo{}, sum_hi{};
    for (int64_t i = 0; i < kRows * chunks; ++i) w.acc[i] = vec8{};

    for (int64_t b = 0; b * bs < num_keys; ++b) {
      const int64_t n = std::min(bs, num_keys - b * bs);
      const int64_t base = table[b] * s.block_stride + kv * s.head_dim;
      const float* k_rows = nullptr;
      const float* v_rows = nullptr;
      int64_t row_stride = 0;
      c10::BFloat16* v_pairs = reinterpret_cast<c10::BFloat16*>(w.kv.data());
      if constexpr (kPaired) {
        pair_rows_bf16(v_pairs, v_ptr + base, n, s.head_dim, s.slot_stride, {});
      } else {
        const BlockRows block = block_rows(k_ptr + base, v_ptr + base, n, s.head_dim, s.slot_stride, bs, w.kv.data());
        v_rows = block.v;
        row_stride = block.stride;
        k_rows = block.k;
      }
      vec8 block_max_lo = neg_inf, block_max_hi = neg_inf;
      // Several keys at a time, for independent chains: four on the FMA path (eight vec8 chains),
      // eight on VDPBF16PS (eight 16-row chains, to cover its latency).
      constexpr int64_t kKeys = kPaired ? 8 : 4;
      for (int64_t t = 0; t < n; t += kKeys) {
        const int64_t keys = std::min<int64_t>(kKeys, n - t);
        vec8 lo[kKeys] = {}, hi[kKeys] = {};
        if constexpr (kPaired) {
          const scalar_t* k[kKeys];
          for (int64_t j = 0; j < kKeys; ++j) k[j] = k_ptr + base + (t + std::min(j, keys - 1)) * s.slot_stride;
          vec16 sums[kKeys] = {};
          for (int64_t i = 0; i < s.head_dim / 2; ++i) {
            const u32x16 q_pairs = load_bf16_pairs(reinterpret_cast<const c10::BFloat16*>(qt + i * kRows));
            for (int j = 0; j < kKeys; ++j) {
              uint32_t k_pair;
              std::memcpy(&k_pair, k[j] + 2 * i, sizeof(k_pair));
              sums[j] = dot_bf16_pairs(sums[j], q_pairs, u32x16{} + k_pair);
            }
          }
          for (int j = 0; j < kKeys; ++j) {
            sums[j] *= scale;
            lo[j] = __builtin_shufflevector(sums[j], sums[j], 0, 1, 2, 3, 4, 5, 6, 7);
            hi[j] = __builtin_shufflevector(sums[j], sums[j], 8, 9, 10, 11, 12, 13, 14, 15);
          }
        } else {
          const float* k[kKeys];
          for (int64_t j = 0; j < kKeys; ++j) k[j] = k_rows + (t + std::min(j, keys - 1)) * row_stride;
          for (int64_t d = 0; d < s.head_dim; ++d) {
            const vec8 q_lo = w.qt[2 * d], q_hi = w.qt[2 * d + 1];
            for (int j = 0; j < kKeys; ++j) {
              const float kd = k[j][d];
              lo[j] += kd * q_lo;
              hi[j] += kd * q_hi;
            }
          }
        }
        for (int64_t j = 0; j < keys; ++j) {
          // Row r sees key position p iff p <= first_pos + r.
          const int32_t first_row = static_cast<int32_t>(b * bs + t + j - first_pos);
          const vec8 l = select8(lane_lo >= first_row, lo[j], neg_inf);
          const vec8 h = select8(lane_hi >= first_row, hi[j], neg_inf);
          w.scores[2 * (t + j)] = l;
          w.scores[2 * (t + j) + 1] = h;
          block_max_lo = select8(l > block_max_lo, l, block_max_lo);
          block_max_hi = select8(h > block_max_hi, h, block_max_hi);
        }
      }
      // Every row sees key 0, so after the first block each running max is finite.
      const vec8 new_lo = select8(block_max_lo > max_lo, block_max_lo, max_lo);
      const vec8 new_hi = select8(block_max_hi > max_hi, block_max_hi, max_hi);
      const vec8 corr_lo = exp_nonpositive8(max_lo - new_lo), corr_hi = exp_nonpositive8(max_hi - new_hi);
      max_lo = new_lo;
      max_hi = new_hi;
      sum_lo *= corr_lo;
      sum_hi *= corr_hi;
      for (int64_t t = 0; t < n; ++t) {  // masked lanes hold -inf: their probability is exactly 0
        const vec8 lo = w.scores[2 * t], hi = w.scores[2 * t + 1];
        const vec8 p_lo = select8(lo > neg_inf, exp_nonpositive8(lo - max_lo), vec8{});
        const vec8 p_hi = select8(hi > neg_inf, exp_nonpositive8(hi - max_hi), vec8{});
        w.scores[2 * t] = p_lo;
        w.scores[2 * t + 1] = p_hi;
        sum_lo += p_lo;
        sum_hi += p_hi;
      }
      float* probs = reinterpret_cast<float*>(w.scores);  // [t * kRows + r]
      int64_t pairs = 0;
      if constexpr (kPaired) {  // keys 2i and 2i+1 of row r as one word, at [i * kRows + r]
        for (int64_t i = 0; 2 * i < n; ++i) {
          const vec16 even = round_bf16(loadv<vec16>(probs + 2 * i * kRows));
          const vec16 odd = 2 * i + 1 < n ? round_bf16(loadv<vec16>(probs + (2 * i + 1) * kRows)) : vec16{};
          u32x16 e, o;
          std::memcpy(&e, &even, sizeof(e));
          std::memcpy(&o, &odd, sizeof(o));
          const u32x16 words = (e >> 16) | (o & 0xFFFF0000u);
          std::memcpy(probs + i * kRows, &words, sizeof(words));
          ++pairs;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* acc = reinterpret_cast<float*>(w.acc + r * chunks);
        const float corr = r < 8 ? corr_lo[r] : corr_hi[r - 8];
        if constexpr (kPaired)
          accumulate_pv_pairs_row(acc, s.head_dim, corr, probs + r, kRows, pairs, v_pairs, 2 * s.head_dim);
        else
          accumulate_pv_row<vec8>(acc, s.head_dim, corr, probs + r, kRows, v_rows, n, row_stride);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      if constexpr (kPaired) unpair_columns(reinterpret_cast<float*>(w.acc + r * chunks), s.head_dim);
      const float inv = 1.0f / (r < 8 ? sum_lo[r] : sum_hi[r - 8]);
      scalar_t* dst = out_ptr + ((row0 + r) * s.num_heads + head) * s.head_dim;
      const vec8* acc = w.acc + r * chunks;
      for (int64_t c = 0; c < chunks; ++c)
        for (int i = 0; i < 8; ++i) dst[8 * c + i] = static_cast<scalar_t>(acc[c][i] * inv);
    }
  }
}

struct Task {
  int64_t seq, row0, kv;
};

template <bool kPaired, typename T>
S1_INLINE void run_tasks(const PrefillShape& s, const std::vector<Task>& tasks, int64_t first, int64_t stride,
                         const T* q_ptr, const T* k_ptr, const T* v_ptr, T* out_ptr, const int64_t* tables,
                         const int32_t* cu_q, const int32_t* cu_k, float scale, Scratch& w) {
  for (int64_t i = first; i < static_cast<int64_t>(tasks.size()); i += stride) {
    const Task& task = tasks[i];
    const int64_t q_begin = cu_q[task.seq];
    prefill_task<kPaired, T>(s, q_ptr + q_begin * s.num_heads * s.head_dim, k_ptr, v_ptr,
                             out_ptr + q_begin * s.num_heads * s.head_dim, tables + task.seq * s.max_blocks,
                             cu_q[task.seq + 1] - q_begin, cu_k[task.seq + 1] - cu_k[task.seq], task.row0, task.kv,
                             scale, w);
  }
}

// The paired path where this ISA build and dtype have it and the shape takes it.
template <typename V, typename T>
S1_INLINE void run_isa(const PrefillShape& s, const std::vector<Task>& tasks, int64_t first, int64_t stride,
                       const T* q_ptr, const T* k_ptr, const T* v_ptr, T* out_ptr, const int64_t* tables,
                       const int32_t* cu_q, const int32_t* cu_k, float scale, Scratch& w) {
  if constexpr (kBf16Pairs<V, T>) {
    if (s.bf16_pairs)
      return run_tasks<true>(s, tasks, first, stride, q_ptr, k_ptr, v_ptr, out_ptr, tables, cu_q, cu_k, scale, w);
  }
  run_tasks<false>(s, tasks, first, stride, q_ptr, k_ptr, v_ptr, out_ptr, tables, cu_q, cu_k, scale, w);
}

// Tasks are dealt round-robin to threads: later tiles see more keys, so contiguous ranges of
// tasks would leave one thread with most of the work.
#define S1_DEFINE_PREFILL_TASKS(T)                                                                                \
  S1_ISA_VARIANTS(                                                                                                \
      prefill_tasks,                                                                                              \
      (const PrefillShape& s, const std::vector<Task>& tasks, int64_t first, int64_t stride, const T* q_ptr,      \
       const T* k_ptr, const T* v_ptr, T* out_ptr, const int64_t* tables, const int32_t* cu_q, const int32_t* cu_k, \
       float scale, Scratch& w),                                                                                  \
      (s, tasks, first, stride, q_ptr, k_ptr, v_ptr, out_ptr, tables, cu_q, cu_k, scale, w),                      \
      run_isa<isa_vec>(s, tasks, first, stride, q_ptr, k_ptr, v_ptr, out_ptr, tables, cu_q, cu_k, scale, w);)
S1_DEFINE_PREFILL_TASKS(float)
S1_DEFINE_PREFILL_TASKS(double)
S1_DEFINE_PREFILL_TASKS(at::BFloat16)
S1_DEFINE_PREFILL_TASKS(at::Half)

void paged_attention_prefill(torch::Tensor out, const torch::Tensor& query, const torch::Tensor& k_cache,
                             const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                             const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k, double scale) {
  check_prefill_args(out, query, k_cache, v_cache, block_tables, cu_seqlens_q, cu_seqlens_k);
  TORCH_CHECK(query.size(2) % 8 == 0, "head_dim must be a multiple of 8");
  const int64_t num_seqs = block_tables.size(0);

  PrefillShape s;
  s.num_heads = query.size(1);
  s.head_dim = query.size(2);
  s.block_size = k_cache.size(1);
  const int64_t num_kv_heads = k_cache.size(2);
  s.group = s.num_heads / num_kv_heads;
  s.slot_stride = num_kv_heads * s.head_dim;
  s.block_stride = s.block_size * s.slot_stride;
  s.max_blocks = block_tables.size(1);
  s.bf16_pairs = query.scalar_type() == torch::kBFloat16 && cpu_has_dpbf16() && s.head_dim % 32 == 0;

  const int32_t* cu_q = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* cu_k = cu_seqlens_k.data_ptr<int32_t>();
  TORCH_CHECK(cu_q[0] == 0 && cu_k[0] == 0 && cu_q[num_seqs] == query.size(0), "cu_seqlens must start at 0 and "
              "cu_seqlens_q must end at the number of query rows");
  std::vector<Task> tasks;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t q_len = cu_q[seq + 1] - cu_q[seq], ctx = cu_k[seq + 1] - cu_k[seq];
    TORCH_CHECK(q_len >= 1 && ctx >= q_len, "each sequence needs 1 <= query length <= context length");
    TORCH_CHECK((ctx + s.block_size - 1) / s.block_size <= s.max_blocks, "a context is longer than its block table");
    for (int64_t row0 = 0; row0 < q_len; row0 += kRows)
      for (int64_t kv = 0; kv < num_kv_heads; ++kv) tasks.push_back({seq, row0, kv});
  }
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks.size()));
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention_prefill", [&] {
    const scalar_t* q_ptr = query.data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      Scratch w(s, !std::is_same_v<scalar_t, float>);
      for (int64_t worker = begin; worker < end; ++worker)
        prefill_tasks(s, tasks, worker, workers, q_ptr, k_ptr, v_ptr, out_ptr, tables, cu_q, cu_k,
                      static_cast<float>(scale), w);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s1serve, CPU, m) { m.impl("paged_attention_prefill", &paged_attention_prefill); }

}  // namespace s1serve
