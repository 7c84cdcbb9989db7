"""fp32 and bf16 linear layers on the CPU through oneDNN with weights packed once at load.

torch's default CPU GEMM (MKL sgemm) re-packs the weight matrix on every call; at decode batch
sizes that copy is a fifth of the step (perf: `sgemm_scopy_right16`). oneDNN's linear takes a
weight reordered once into its blocked layout, which measured 1.2-2x faster per layer from
batch 1 to 2048 on these CPUs. Results differ from sgemm's only in summation order (~1e-5
relative), like any change of GEMM kernel or batch size. bf16 weights packed the same way run
oneDNN's AVX512-BF16 / AMX kernels: on these Sapphire Rapids cores a bf16 engine decodes 1.6x
faster than fp32 at batch 1 and 1.8x at 32 sequences (torch's own bf16 linear is slower than fp32).

A few rows (the decode steps of one to a few streams) instead stream the plain row-major weight
through csrc's `linear_few_rows`, which reads weights at ~29 GB/s at one row here against
oneDNN's ~20; it stays ahead up to 8 rows in fp32 and 3 in bf16 (`FEW_ROWS`, measured on the
default model's layer shapes: `python bench/kernels.py --only linear`), where oneDNN's blocked
(AMX) kernels take over. The layer keeps both layouts, so its weights take twice the memory.
"""

import torch
from torch import nn

from .paged_attention import has_csrc_kernel


PACKED_DTYPES = (torch.float32, torch.bfloat16)
FEW_ROWS = {torch.float32: 16, torch.bfloat16: 8}  # the most rows linear_few_rows takes, per dtype


def few_rows_available() -> bool:
    return has_csrc_kernel("linear_few_rows", "cpu")


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """Drop-in for an fp32 `nn.Linear` at inference; holds only the packed weight (and bias)."""

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.out_features = linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.weight = linear.weight.detach().contiguous() if few_rows_available() else None  # for few-row steps
        self.few_rows = FEW_ROWS[linear.weight.dtype] if self.weight is not None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= self.few_rows:
            out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype)
            torch.ops.s1serve.linear_few_rows(out, rows.contiguous(), self.weight, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module, batch_hint: int) -> int:
    """Replaces every fp32 or bf16 CPU `nn.Linear` in `model` with a `PackedLinear`; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu" and child.weight.dtype in PACKED_DTYPES:
                setattr(parent, name, PackedLinear(child, batch_hint))
                replaced += 1
    return replaced
