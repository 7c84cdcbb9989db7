// Paged-attention decode on the CPU: one query token per sequence attends to its K/V blocks,
// read in place through the block table (no gather into a padded copy, which is what makes the
// pure-torch reference memory-bound). One task per (sequence, kv head) serves the whole GQA
// group of query heads that share that kv head, so each K/V row is read once per step, and the
// softmax is computed online block by block (flash-decoding style), so no buffer grows with the
// context. A bf16 cache on a CPU with AVX512-BF16 runs both products on VDPBF16PS (K as cached,
// V rows paired, the probabilities rounded to bf16); elsewhere K and V are widened to fp32. The
// task body is compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (isa.h).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention_checks.h"
#include "isa.h"
#include "vec.h"

namespace s1serve {
namespace {

struct Shape {
  int64_t num_heads, head_dim, block_size, num_kv_heads, group, max_blocks, slot_stride, block_stride;
  int64_t slices, kv_per_slice;  // kv heads are split into `slices` tasks per sequence
  int64_t partitions, blocks_per_partition;  // and the context into `partitions`, merged at the end
  bool bf16_pairs;  // a bf16 cache on a CPU with VDPBF16PS, head_dim a multiple of 32: the paired path
  int64_t step_blocks, step_keys;  // the paired path's blocks (and keys) per softmax step
  int64_t score_stride;  // floats of score scratch per head: step_keys (>= block_size) rounded up to 16
};

// Where a task's result goes: straight to `out` (one partition), or normalized to `partial`
// (heads x head_dim floats) with its running max and sum in `stats` (2 x heads) for the merge.
struct Sink {
  float* partial;
  float* stats;
};

// One block's scores for `heads` query heads: the pre-scaled fp32 query (head_dim apart) against
// widened K rows `row_stride` apart, into scores (block_size apart per head).
template <typename V>
S1_INLINE void block_scores(const Shape& s, float* __restrict scores, const float* q, const float* k_rows,
                            int64_t row_stride, int64_t n, int64_t heads) {
  constexpr int64_t L = kLanes<V>;
  const int64_t lane_chunks = s.head_dim / L;
  for (int64_t h = 0; h < heads; ++h) {
    const float* k_head = k_rows + (h / s.group) * s.head_dim;
    const float* qh = q + h * s.head_dim;
    float* sc = scores + h * s.block_size;
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {  // eight keys at a time: eight independent chains, one vector of sums
      V part[8] = {};
      for (int64_t c = 0; c < lane_chunks; ++c) {
        const V qc = loadv<V>(qh + L * c);
        for (int j = 0; j < 8; ++j) part[j] += loadv<V>(k_head + (t + j) * row_stride + L * c) * qc;
      }
      vec8 folded[8];
      for (int j = 0; j < 8; ++j) folded[j] = fold8(part[j]);
      store8(sc + t, hsum8x8(folded));
    }
    for (; t < n; ++t) {
      V sum{};
      for (int64_t c = 0; c < lane_chunks; ++c) sum += loadv<V>(k_head + t * row_stride + L * c) * loadv<V>(qh + L * c);
      sc[t] = hsum(fold8(sum));
    }
  }
}

#ifdef S1_HAVE_DOT_BF16_PAIRS
// The paired path's scores of up to 16 keys (rows `row_stride` apart, m of them) against one bf16
// query, as one vector (lane t: key t; lanes from m on: 0): 16 chains of VDPBF16PS, folded at once.
template <bool kFull>
S1_INLINE vec16 run_scores(const c10::BFloat16* q, const c10::BFloat16* k, int64_t row_stride, int64_t head_dim,
                           int64_t m) {
  vec16 acc[16] = {};
  for (int64_t c = 0; c < head_dim; c += 32) {
    const u32x16 qc = load_bf16_pairs(q + c);
    for (int j = 0; j < 16; ++j)
      if (kFull || j < m) acc[j] = dot_bf16_pairs(acc[j], load_bf16_pairs(k + j * row_stride + c), qc);
  }
  return hsum16x16(acc);
}

// One step of the paired path (a bf16 cache on VDPBF16PS) over n keys (s.step_keys at most, in
// runs of 16 rows from k_runs[r], the task's first kv head), every head of the task: scores in
// vectors of 16 keys, each head's max, the running maxima and their corrections for all heads at
// once, then per head exp, sum and PV on the probabilities rounded to bf16 pairs (as flash-attn
// rounds P). scores holds 16-float runs per head (s.score_stride apart); v_pairs is the step's V
// in pair_rows_bf16's layout; maxima/corrections hold round_up_16(heads) floats.
S1_INLINE void paired_step(const Shape& s, int64_t heads, const c10::BFloat16* q, const c10::BFloat16* const* k_runs,
                           const c10::BFloat16* v_pairs, int64_t width, int64_t n, float scale,
                           float* __restrict scores, float* __restrict acc, float* __restrict running_max,
                           float* __restrict running_sum, float* __restrict maxima) {
  constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
  const vec16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int64_t runs = (n + 15) / 16;
  for (int64_t h = 0; h < heads; ++h) {
    float block_max = kMinusInf;
    for (int64_t r = 0; r < runs; ++r) {
      const int64_t m = std::min<int64_t>(16, n - 16 * r);
      const c10::BFloat16* k = k_runs[r] + (h / s.group) * s.head_dim;
      vec16 sc = (m == 16 ? run_scores<true>(q + h * s.head_dim, k, s.slot_stride, s.head_dim, m)
                          : run_scores<false>(q + h * s.head_dim, k, s.slot_stride, s.head_dim, m)) * scale;
      if (m < 16) sc = select_lanes(lane < static_cast<float>(m), sc, vec16{} + kMinusInf);
      storev(scores + h * s.score_stride + 16 * r, sc);
      block_max = std::max(block_max, hmax16(sc));
    }
    maxima[h] = block_max;
  }
  for (int64_t h = 0; h < heads; h += 16) {  // maxima becomes each head's correction
    const vec16 old_max = loadv<vec16>(running_max + h);
    const vec16 block = loadv<vec16>(maxima + h);
    const vec16 new_max = block > old_max ? block : old_max;
    storev(maxima + h, exp_nonpositive_lanes(old_max - new_max));  // exp(-inf) -> 0 via clamp
    storev(running_max + h, new_max);
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* sc = scores + h * s.score_stride;
    vec16 sum{};
    for (int64_t r = 0; r < runs; ++r) {
      const vec16 x = loadv<vec16>(sc + 16 * r) - running_max[h];
      const vec16 p = select_lanes(lane < static_cast<float>(n - 16 * r), exp_nonpositive_lanes(x), vec16{});
      sum += p;
      u32x16 bits;  // rounded to bf16 and packed two to a word, in place: dot_bf16_pairs' operand
      const vec16 rounded = round_bf16(p);
      std::memcpy(&bits, &rounded, sizeof(bits));
      const u16x16 halves = __builtin_convertvector(bits >> 16, u16x16);
      std::memcpy(sc + 8 * r, &halves, sizeof(halves));
    }
    running_sum[h] = running_sum[h] * maxima[h] + hsum16(sum);
    accumulate_pv_pairs_row(acc + h * s.head_dim, s.head_dim, maxima[h], sc, 1, (n + 1) / 2,
                            v_pairs + (h / s.group) * 2 * s.head_dim, 2 * width);
  }
}
#endif

// Score scratch per head and the running arrays' length are rounded up to whole vec16s, so the
// paired path reads and updates them a vector at a time.
S1_INLINE int64_t round_up_16(int64_t n) { return (n + 15) / 16 * 16; }

// One sequence, kv heads [kv_begin, kv_end) and the query heads they serve. Taking all kv heads
// of a sequence at once reads each cached token's K/V row as one contiguous run, which is what
// keeps the memory system streaming (per-head tasks read 1/num_kv_heads of each row and run
// several times slower here). q/acc are scratch of num_heads*head_dim floats, scores of
// num_heads*s.score_stride floats, running of 3*round_up_16(num_heads) floats.
//
// V is the vector the dot products and the PV sums run on: vec16 in the AVX-512 build (head_dim a
// multiple of 16), vec8 elsewhere; the widening path's softmax over a block's scores stays on vec8.
template <typename V, typename scalar_t>
S1_INLINE void decode_task(const Shape& s, int64_t seq, int64_t kv_begin, int64_t kv_end, int64_t block_begin,
                           int64_t block_end, const scalar_t* q_ptr, const scalar_t* k_ptr, const scalar_t* v_ptr,
                           scalar_t* out_ptr, Sink sink, const int64_t* table, int64_t ctx, float scale,
                           float* __restrict q, float* __restrict acc, float* __restrict scores,
                           float* __restrict running, float* __restrict kv_f32) {
  const int64_t chunks = s.head_dim / 8;
  const int64_t head0 = kv_begin * s.group, heads = (kv_end - kv_begin) * s.group;
  const int64_t width = (kv_end - kv_begin) * s.head_dim;  // one token's K (or V) row for these kv heads
  const int64_t bs = s.block_size;
  // A bf16 cache on AVX512-BF16: K dotted as it is cached against the query as it is, and V rows
  // paired (bf16, in the widening scratch), both on VDPBF16PS; otherwise the query is scaled
  // into fp32 scratch and K and V are widened to fp32.
  const bool paired = kBf16Pairs<V, scalar_t> && s.bf16_pairs;
  for (int64_t h = 0; h < heads && !paired; ++h) {
    const scalar_t* src = q_ptr + (seq * s.num_heads + head0 + h) * s.head_dim;
    for (int64_t c = 0; c < chunks; ++c) store8(q + h * s.head_dim + 8 * c, load8(src + 8 * c) * scale);
  }
  std::fill(acc, acc + heads * s.head_dim, 0.0f);
  const int64_t padded = round_up_16(heads);
  float* running_max = running;
  float* running_sum = running + padded;
  std::fill(running_max, running_max + padded, -std::numeric_limits<float>::infinity());
  std::fill(running_sum, running_sum + padded, 0.0f);

  const int64_t num_blocks = std::min((ctx + bs - 1) / bs, block_end);
  auto next_block = [&](int64_t b) {  // the rows to request while block b - 1 is read
    NextBlock<scalar_t> next;
    if (b < num_blocks) {
      const int64_t at = table[b] * s.block_stride + kv_begin * s.head_dim;
      next = {k_ptr + at, v_ptr + at, std::min(bs, ctx - b * bs)};
    }
    return next;
  };
  if constexpr (kBf16Pairs<V, scalar_t>) {
    // s.step_blocks blocks per step: the softmax bookkeeping and the PV accumulators' loads and
    // stores are per step, so fewer, longer steps cost less per key
    // (the run pointers are gathered once per step: recomputing them per head, with a division
    // by the block size, measured ~4% slower)
    c10::BFloat16* v_pairs = reinterpret_cast<c10::BFloat16*>(kv_f32);
    std::vector<const c10::BFloat16*> k_runs(s.score_stride / 16);
    for (int64_t b = block_begin; paired && b < num_blocks; b += s.step_blocks) {
      int64_t n = 0;
      for (int64_t j = b; j < std::min(b + s.step_blocks, num_blocks); ++j) {
        const int64_t nj = std::min(bs, ctx - j * bs), at = table[j] * s.block_stride + kv_begin * s.head_dim;
        pair_rows_bf16(v_pairs + n * width, v_ptr + at, nj, width, s.slot_stride, next_block(j + 1));
        for (int64_t r = 0; 16 * r < nj; ++r) k_runs[n / 16 + r] = k_ptr + at + 16 * r * s.slot_stride;
        n += nj;
      }
      paired_step(s, heads, q_ptr + (seq * s.num_heads + head0) * s.head_dim, k_runs.data(), v_pairs, width, n, scale,
                  scores, acc, running_max, running_sum, running + 2 * padded);
    }
  }
  for (int64_t b = block_begin; !paired && b < num_blocks; ++b) {
    const int64_t n = std::min(bs, ctx - b * bs);
    const int64_t base = table[b] * s.block_stride + kv_begin * s.head_dim;
    const NextBlock<scalar_t> next = next_block(b + 1);
    // (the bf16 conversion, done per query head of the group, was what bounded bf16 decode)
    const BlockRows rows = block_rows(k_ptr + base, v_ptr + base, n, width, s.slot_stride, bs, kv_f32, next);
    block_scores<V>(s, scores, q, rows.k, rows.stride, n, heads);  // q is pre-scaled
    for (int64_t h = 0; h < heads; ++h) {
      float* sc = scores + h * bs;
      const int64_t whole = n / 8 * 8;  // eight scores per vector, then a scalar tail
      float block_max = sc[0];
      if (whole) {
        vec8 max8 = load8(sc);
        for (int64_t t = 8; t < whole; t += 8) max8 = select8(load8(sc + t) > max8, load8(sc + t), max8);
        for (int i = 0; i < 8; ++i) block_max = std::max(block_max, max8[i]);
      }
      for (int64_t t = whole; t < n; ++t) block_max = std::max(block_max, sc[t]);
      const float new_max = std::max(running_max[h], block_max);
      const float correction = exp_nonpositive(running_max[h] - new_max);  // exp(-inf) -> 0 via clamp
      vec8 sum8{};
      for (int64_t t = 0; t < whole; t += 8) {
        const vec8 p = exp_nonpositive8(load8(sc + t) - new_max);
        store8(sc + t, p);
        sum8 += p;
      }
      float sum = hsum(sum8);
      for (int64_t t = whole; t < n; ++t) sum += (sc[t] = exp_nonpositive(sc[t] - new_max));
      running_sum[h] = running_sum[h] * correction + sum;
      running_max[h] = new_max;
      accumulate_pv_row<V>(acc + h * s.head_dim, s.head_dim, correction, sc, 1, rows.v + (h / s.group) * s.head_dim,
                           n, rows.stride);
    }
  }
  if (paired) unpair_columns(acc, heads * s.head_dim);
  for (int64_t h = 0; h < heads; ++h) {
    const float inv = running_sum[h] > 0 ? 1.0f / running_sum[h] : 0.0f;  // 0: a partition past the context
    if (sink.partial != nullptr) {
      for (int64_t c = 0; c < chunks; ++c) store8(sink.partial + h * s.head_dim + 8 * c, load8(acc + h * s.head_dim + 8 * c) * inv);
      sink.stats[h] = running_max[h];
      sink.stats[heads + h] = running_sum[h];
      continue;
    }
    scalar_t* dst = out_ptr + (seq * s.num_heads + head0 + h) * s.head_dim;
    for (int64_t d = 0; d < s.head_dim; ++d) dst[d] = static_cast<scalar_t>(acc[h * s.head_dim + d] * inv);
  }
}

// Combines a (sequence, kv slice)'s partitions, each weighted by its sum x exp(its max - the
// max). `tasks` holds the partitions' Sink blocks back to back: heads x head_dim outputs, then
// heads maxima and heads sums.
template <typename scalar_t>
void merge_partitions(const Shape& s, int64_t seq, int64_t kv_begin, const float* tasks, scalar_t* out_ptr) {
  const int64_t heads = s.kv_per_slice * s.group, head0 = kv_begin * s.group;
  const int64_t task_size = heads * (s.head_dim + 2), stats = heads * s.head_dim;
  std::vector<float> merged(s.head_dim);
  for (int64_t h = 0; h < heads; ++h) {
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < s.partitions; ++p) {
      const float* t = tasks + p * task_size + stats;
      if (t[heads + h] > 0) max_score = std::max(max_score, t[h]);
    }
    std::fill(merged.begin(), merged.end(), 0.0f);
    float total = 0.0f;
    for (int64_t p = 0; p < s.partitions; ++p) {
      const float* t = tasks + p * task_size;
      const float sum = t[stats + heads + h];
      if (sum == 0) continue;  // a partition past this sequence's context
      const float w = sum * exp_nonpositive(t[stats + h] - max_score);
      total += w;
      for (int64_t d = 0; d < s.head_dim; ++d) merged[d] += w * t[h * s.head_dim + d];
    }
    scalar_t* dst = out_ptr + (seq * s.num_heads + head0 + h) * s.head_dim;
    for (int64_t d = 0; d < s.head_dim; ++d) dst[d] = static_cast<scalar_t>(merged[d] / total);
  }
}

// A task is (sequence, slice of kv heads, partition of the context); see decode() for the split.
template <typename V, typename T>
S1_INLINE void decode_tasks(const Shape& s, int64_t begin, int64_t end, const T* q_ptr, const T* k_ptr,
                            const T* v_ptr, T* out_ptr, float* partial, const int64_t* tables, const int64_t* lens,
                            float scale, float* q, float* acc, float* scores, float* running, float* kv_f32) {
  const int64_t heads = s.kv_per_slice * s.group;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t part = task % s.partitions, seq = task / s.partitions / s.slices;
    const int64_t kv_begin = task / s.partitions % s.slices * s.kv_per_slice;
    const Sink sink = partial == nullptr ? Sink{nullptr, nullptr}
                                         : Sink{partial + task * heads * (s.head_dim + 2),
                                                partial + task * heads * (s.head_dim + 2) + heads * s.head_dim};
    decode_task<V, T>(s, seq, kv_begin, kv_begin + s.kv_per_slice, part * s.blocks_per_partition,
                      (part + 1) * s.blocks_per_partition, q_ptr, k_ptr, v_ptr, out_ptr, sink,
                      tables + seq * s.max_blocks, lens[seq], scale, q, acc, scores, running, kv_f32);
  }
}

// The dot products run on the ISA's widest vector (vec16 on AVX-512) when head_dim is a multiple
// of its lanes, else on vec8.
#define S1_DEFINE_TASK_RANGE(T)                                                                                  \
  S1_ISA_VARIANTS(                                                                                               \
      task_range,                                                                                                \
      (const Shape& s, int64_t b, int64_t e, const T* q_ptr, const T* k_ptr, const T* v_ptr, T* out_ptr,         \
       float* partial, const int64_t* tables, const int64_t* lens, float scale, float* q, float* acc, float* sc, \
       float* running, float* kv),                                                                               \
      (s, b, e, q_ptr, k_ptr, v_ptr, out_ptr, partial, tables, lens, scale, q, acc, sc, running, kv),            \
      if (s.head_dim % kLanes<isa_vec> == 0)                                                                     \
          decode_tasks<isa_vec>(s, b, e, q_ptr, k_ptr, v_ptr, out_ptr, partial, tables, lens, scale, q, acc, sc, \
                                running, kv);                                                                    \
      else decode_tasks<vec8>(s, b, e, q_ptr, k_ptr, v_ptr, out_ptr, partial, tables, lens, scale, q, acc, sc,   \
                              running, kv);)
// One overload per dtype, each compiled per ISA (isa.h).
S1_DEFINE_TASK_RANGE(float)
S1_DEFINE_TASK_RANGE(double)
S1_DEFINE_TASK_RANGE(at::BFloat16)
S1_DEFINE_TASK_RANGE(at::Half)

template <typename scalar_t>
void decode(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& k_cache,
            const torch::Tensor& v_cache, const torch::Tensor& block_tables, const torch::Tensor& context_lens,
            double scale) {
  Shape s;
  s.num_heads = query.size(1);
  s.head_dim = query.size(2);
  s.block_size = k_cache.size(1);
  s.num_kv_heads = k_cache.size(2);
  s.group = s.num_heads / s.num_kv_heads;
  s.max_blocks = block_tables.size(1);
  s.slot_stride = s.num_kv_heads * s.head_dim;  // between consecutive tokens of a block
  s.block_stride = s.block_size * s.slot_stride;
  s.bf16_pairs = std::is_same_v<scalar_t, at::BFloat16> && cpu_has_dpbf16() && s.head_dim % 32 == 0;
  // Runs of 16 keys never cross a block when blocks are a multiple of 16 long: then steps of
  // kStepKeys keys, else a block per step.
  constexpr int64_t kStepKeys = 32;
  s.step_blocks = s.block_size % 16 == 0 ? std::max<int64_t>(1, kStepKeys / s.block_size) : 1;
  s.step_keys = s.step_blocks * s.block_size;
  s.score_stride = round_up_16(s.step_keys);
  const int64_t num_seqs = query.size(0), want_tasks = 4 * at::get_num_threads();
  // Enough sequences: one task each. Few sequences with long contexts (the s1 regime: one
  // stream, thousands of thinking tokens): whole K/V rows, the context split into partitions of
  // at least kMinPartitionTokens, merged after. Few and short: a task per kv head.
  constexpr int64_t kMinPartitionTokens = 256;
  const int64_t min_partition_blocks = (kMinPartitionTokens + s.block_size - 1) / s.block_size;
  s.slices = 1;
  s.partitions = 1;
  if (num_seqs < want_tasks) {
    const int64_t partitions = std::min((want_tasks + num_seqs - 1) / num_seqs, s.max_blocks / min_partition_blocks);
    if (partitions >= 2)
      s.partitions = partitions;
    else
      s.slices = s.num_kv_heads;
  }
  s.kv_per_slice = s.num_kv_heads / s.slices;
  s.blocks_per_partition = (s.max_blocks + s.partitions - 1) / s.partitions;
  const int64_t num_tasks = num_seqs * s.slices * s.partitions;
  const int64_t task_heads = s.kv_per_slice * s.group;
  std::vector<float> partial(s.partitions > 1 ? num_tasks * task_heads * (s.head_dim + 2) : 0);

  const scalar_t* q_ptr = query.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  // Each thread takes the next task when it is done with one: tasks differ by their context length
  // and, with K/V cold (as in the engine, a cache per layer), by memory stalls. Against a static
  // split: ~6-11% faster at 32 sequences of 100-200 tokens cold, unchanged warm (Zen 5).
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_tasks), 1, [&](int64_t, int64_t) {
    const int64_t heads = s.kv_per_slice * s.group;
    std::vector<float> q(heads * s.head_dim), acc(heads * s.head_dim);
    std::vector<float> scores(heads * s.score_stride), running(3 * round_up_16(heads));
    std::vector<float> kv_f32(std::is_same_v<scalar_t, float> ? 0 : 2 * s.step_keys * s.kv_per_slice * s.head_dim);
    for (int64_t task; (task = next_task.fetch_add(1, std::memory_order_relaxed)) < num_tasks;)
      task_range(s, task, task + 1, q_ptr, k_ptr, v_ptr, out_ptr, partial.empty() ? nullptr : partial.data(), tables,
                 lens, static_cast<float>(scale), q.data(), acc.data(), scores.data(), running.data(), kv_f32.data());
  });
  if (partial.empty()) return;
  at::parallel_for(0, num_seqs * s.slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      merge_partitions<scalar_t>(s, i / s.slices, i % s.slices * s.kv_per_slice,
                                 partial.data() + i * s.partitions * task_heads * (s.head_dim + 2), out_ptr);
  });
}

void paged_attention_decode(torch::Tensor out, const torch::Tensor& query, const torch::Tensor& k_cache,
                            const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                            const torch::Tensor& context_lens, double scale) {
  check_decode_args(out, query, k_cache, v_cache, block_tables, context_lens);
  TORCH_CHECK(query.size(2) % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(context_lens.numel() == 0 || context_lens.min().item<int64_t>() >= 1, "context lengths must be >= 1");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention_decode", [&] {
    decode<scalar_t>(out, query, k_cache, v_cache, block_tables, context_lens, scale);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(s1serve, CPU, m) { m.impl("paged_attention_decode", &paged_attention_decode); }

}  // namespace s1serve
