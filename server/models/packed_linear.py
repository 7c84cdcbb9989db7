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
oneDNN's ~20; it stays ahead up to 16 rows in fp32 and 8 in bf16 on AVX-512 (`FEW_ROWS`, measured
on the default model's layer shapes: `python bench/kernels.py --only linear`), and up to 8 in fp32
on an AVX2 EPYC (1.6x oneDNN at one row there), where oneDNN's blocked (AMX) kernels take over. The layer keeps both layouts, so its weights take twice the memory.
On a CPU with AMX, bf16 steps of up to AMX_ROWS rows (a decode batch) run csrc's `linear_amx`
on weights packed into AMX tiles instead (`pack_for_amx`): one sequential stream, 20-30% faster
than oneDNN from 4 to 64 rows and than `linear_few_rows` from 4 rows, 10-15% slower than
`linear_few_rows` at one or two rows. On a CPU with AVX512-BF16 but no AMX (AMD Zen 4), the same
packed layout goes through csrc's `linear_dpbf16` up to DPBF16_ROWS rows: on a 2-core Zen 4 the
default model's linears at 32 rows take 25 ms against oneDNN's 34 and `linear_few_rows`' 36, and
as long as `linear_few_rows` at one to eight rows. The packed copy replaces the plain one, so the
weights still take twice their size rather than three times.

With `--quantization int4` (bf16 only) a step of up to INT4_ROWS rows runs on 4-bit weights
(int4.py) and larger ones on oneDNN over their dequantization; no plain copy is kept.
"""

import torch
from torch import nn

from .int4 import Int4Weight, dequantize_int4, int4_supported, quantize_int4
from .paged_attention import has_csrc_kernel


FEW_ROWS = {torch.float32: 16, torch.bfloat16: 8}  # the most rows linear_few_rows takes, per dtype, on AVX-512
FEW_ROWS_AVX2 = 8  # on AVX2 (16 registers, 4x2 tiles) oneDNN is ahead from ~12 rows (an AVX2 EPYC, fp32)
INT4_ROWS = 4  # the most rows the int4 kernel takes (it is slower than oneDNN's bf16 from about 8)
AMX_ROWS = 64  # the most rows linear_amx takes (oneDNN catches up by ~96 and is ahead at prefill sizes)
DPBF16_ROWS = 64  # the most rows linear_dpbf16 takes (1.2x oneDNN at 64 rows on a Zen 4, 0.9x at 96)
TILE_ROWS = {"amx": AMX_ROWS, "dpbf16": DPBF16_ROWS}  # per tile_kernel_for's answer


def few_rows_available() -> bool:
    return has_csrc_kernel("linear_few_rows", "cpu")


def few_rows_limit(dtype: torch.dtype) -> int:
    """The most rows a layer sends to linear_few_rows: where it stays ahead of oneDNN on this ISA."""
    return FEW_ROWS[dtype] if torch.ops.s1serve.cpu_isa() == "avx512" else min(FEW_ROWS[dtype], FEW_ROWS_AVX2)


def amx_available() -> bool:
    return has_csrc_kernel("linear_amx", "cpu") and torch.ops.s1serve.cpu_has_amx_bf16()


def pack_for_amx(weight: torch.Tensor) -> torch.Tensor:
    """An (out, in) bf16 weight as AMX B tiles: per block of 16 outputs, in/32 tiles of 16 rows
    (input-feature pairs) x 16 outputs x 2 features, blocks back to back."""
    out_features, in_features = weight.shape
    tiles = weight.reshape(out_features // 16, 16, in_features // 32, 16, 2)
    return tiles.permute(0, 2, 3, 1, 4).contiguous()


def dpbf16_available() -> bool:
    return has_csrc_kernel("linear_dpbf16", "cpu") and torch.ops.s1serve.cpu_has_dpbf16()


def tile_kernel_for(weight: torch.Tensor) -> str | None:
    """Which csrc kernel takes this weight's decode steps in pack_for_amx's layout: "amx" on AMX
    CPUs, "dpbf16" on CPUs with AVX512-BF16 only, None for other weights and CPUs."""
    out_features, in_features = weight.shape
    if weight.dtype != torch.bfloat16 or out_features % 16 or in_features % 32:
        return None
    return "amx" if amx_available() else "dpbf16" if dpbf16_available() else None


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 / AMX, where oneDNN's bf16 kernels (and csrc's linear_few_rows) run natively."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN takes this dtype's weights here: fp32 always, bf16 only where the CPU has
    native bf16 (oneDNN refuses to reorder bf16 weights on an AVX2 CPU, where a bf16 model runs
    torch's own linear instead)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16())


class PackedLinear(nn.Module):
    """Drop-in for an fp32 or bf16 `nn.Linear` at inference: the weight packed for oneDNN, and for
    decode steps the weight packed for AMX or AVX512-BF16 (bf16 on CPUs with either), the plain
    weight (few rows) or (int4) its 4-bit form."""

    def __init__(self, linear: nn.Linear, batch_hint: int, int4: bool = False):
        super().__init__()
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.int4, self.int4_rows, self.weight, self.few_rows = None, 0, None, 0
        self.tile_kernel, self.tile_weight, self.tile_linear, self.tile_rows = None, None, None, 0
        if int4:
            q, scale, zero = quantize_int4(weight)
            self.int4 = Int4Weight(q, scale, zero, weight.dtype)
            self.int4_rows = INT4_ROWS
            weight = dequantize_int4(q, scale, zero).to(weight.dtype)
        elif (kernel := tile_kernel_for(weight)) is not None:
            self.tile_kernel, self.tile_weight = kernel, pack_for_amx(weight)
            self.tile_linear, self.tile_rows = getattr(torch.ops.s1serve, f"linear_{kernel}"), TILE_ROWS[kernel]
        elif few_rows_available():
            self.weight, self.few_rows = weight.contiguous(), few_rows_limit(weight.dtype)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # the decoder's activations are flat (tokens, features): no reshape per call there
            return self.forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        rows = x.shape[0]
        if rows <= self.int4_rows:
            out = self.int4.matmul(x.contiguous())
            if self.bias is not None:
                out += self.bias
        elif rows <= self.tile_rows:
            out = torch.empty(rows, self.out_features, dtype=x.dtype)
            self.tile_linear(out, x.contiguous(), self.tile_weight, self.bias)
        elif rows <= self.few_rows:
            out = torch.empty(rows, self.out_features, dtype=x.dtype)
            torch.ops.s1serve.linear_few_rows(out, x.contiguous(), self.weight, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return out


def pack_linears(model: nn.Module, batch_hint: int, quantization: str | None = None) -> int:
    """Replaces every fp32 or bf16 CPU `nn.Linear` in `model` with a `PackedLinear`, with int4
    weights where `quantization` is int4 and the kernel takes the shape, except the LM head: as in
    llama.cpp's 4-bit files (the default model's keeps its tied embedding/output matrix finer than 4 bits),
    the logits stay at the model's precision, where 4 bits measurably changed greedy answers.
    Returns how many layers were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu" and packs(child.weight.dtype):
                int4 = (quantization == "int4" and name != "lm_head"
                        and int4_supported(child.out_features, child.in_features))
                setattr(parent, name, PackedLinear(child, batch_hint, int4=int4))
                replaced += 1
    return replaced
