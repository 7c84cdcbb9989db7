// The one place op schemas live. Outputs are written in place (`Tensor(a!)`), so callers
// allocate them and the ops stay allocation-free on the hot path.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"

TORCH_LIBRARY(s1serve, m) {
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention_decode(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor context_lens, float scale) -> ()");
  m.def(
      "paged_attention_prefill(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor cu_seqlens_q, Tensor cu_seqlens_k, float scale) -> ()");
  // The decoder's fused element-wise ops (CPU): residual add + RMSNorm, SiLU * up, RoPE in place.
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) out, Tensor(b!) residual, Tensor x, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor gate_up) -> ()");
  m.def("rotary_embedding(Tensor(a!) query, Tensor(b!) key, Tensor cos, Tensor sin) -> ()");
  // Each row's first maximum (greedy sampling) without widening bf16 logits to fp32.
  m.def("argmax_rows(Tensor(a!) out, Tensor logits) -> ()");
  // A few rows through a linear layer, streaming the row-major weight (CPU decode of a few streams).
  m.def("linear_few_rows(Tensor(a!) out, Tensor x, Tensor weight, Tensor? bias) -> ()");
  // A bf16 linear on AMX tiles over pack_for_amx's weight layout (CPU decode steps of a batch).
  m.def("linear_amx(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.def("cpu_has_amx_bf16() -> bool", [] { return s1serve::cpu_has_amx_bf16(); });
  // The same layout through AVX512-BF16 registers, where the CPU has VDPBF16PS but no AMX.
  m.def("linear_dpbf16(Tensor(a!) out, Tensor x, Tensor packed, Tensor? bias) -> ()");
  m.def("cpu_has_dpbf16() -> bool", [] { return s1serve::cpu_has_dpbf16(); });
  // Which vector ISA the CPU kernels run (avx512 | avx2 | baseline; $S1SERVE_CPU_ISA can lower it).
  m.def("cpu_isa() -> str", [] { return std::string(s1serve::isa_name(s1serve::cpu_isa())); });
}

// Importing `server._C` loads this library, which registers the ops above with torch.
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "s1serve ops (torch.ops.s1serve)", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
