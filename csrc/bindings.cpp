// The one place op schemas live. Outputs are written in place (`Tensor(a!)`), so callers
// allocate them and the ops stay allocation-free on the hot path.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(s1serve, m) {
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention_decode(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor context_lens, float scale) -> ()");
  m.def(
      "paged_attention_prefill(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor cu_seqlens_q, Tensor cu_seqlens_k, float scale) -> ()");
}

// Importing `server._C` loads this library, which registers the ops above with torch.
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "s1serve ops (torch.ops.s1serve)", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
