"""4-bit weights for the CPU decode steps (`--quantization int4`).

A decode step streams every weight once, so on these CPUs a single stream's token costs what its
weights weigh, and 4-bit weights are a quarter of bf16's bytes. Groups of 32 along the input
dimension each get a scale and a zero point (the group's minimum and maximum map to 0 and 15):
llama.cpp's Q4_1 layout, so the default model, which ships as a Q4_1 GGUF and is served from its
dequantization, requantizes to the values its file holds. torch's weight-only kernel
(`aten._weight_int4pack_mm_for_cpu`) widens them group by group inside the product and holds no
dequantized copy; it is fastest at a few rows only (bench/kernels.py --only linear: 6.4 ms for
the default model's 121 linears at one row against 10.5 for csrc's bf16 kernel, but 9x slower than
oneDNN at a 512-row prefill), so PackedLinear runs larger steps on oneDNN over the dequantized
weights: the same model either way. torch's int8 weight-only kernel measured slower than our bf16
one at every row count, so there is no int8.
"""

import torch

INT4_GROUP = 32


def int4_supported(out_features: int, in_features: int) -> bool:
    """The kernel's shapes: whole groups along the input, output rows in sixteens."""
    return in_features % INT4_GROUP == 0 and out_features % 16 == 0


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of an (N, K) weight, K a multiple of `group`: q in [0, 15] as int32 (N, K),
    scale and zero fp32 (N, K / group), and w ~= (q - 8) * scale + zero (torch's int4 convention)."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = (high - low) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every q is 0
    q = ((w - low.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.int32).view(n, k)
    return q, scale, low + 8 * scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    return (q.float() - 8) * scale.repeat_interleave(group, dim=1) + zero.repeat_interleave(group, dim=1)


class Int4Weight:
    """An (N, K) weight in torch's packed int4 layout with its (K / 32, N, 2) scales and zeros."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, K) times the weight's transpose: (M, N)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_and_zeros)
