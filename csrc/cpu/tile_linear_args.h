// The argument checks linear_amx and linear_dpbf16 share: both read pack_for_amx's weight layout
// (server/models/packed_linear.py), (out/16, in/32, 16, 16, 2) bf16. Returns the checked sizes.
#pragma once

#include <torch/types.h>

#include <optional>

namespace s1serve {

struct TileLinearSizes {
  int64_t M, K, N;  // rows, input features, output features
};

inline TileLinearSizes check_tile_linear_args(const torch::Tensor& out, const torch::Tensor& x,
                                              const torch::Tensor& packed, const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16,
              "x must be contiguous bf16 rows (M, in_features)");
  TORCH_CHECK(packed.dim() == 5 && packed.is_contiguous() && packed.scalar_type() == torch::kBFloat16 &&
                  packed.size(2) == 16 && packed.size(3) == 16 && packed.size(4) == 2,
              "packed weight must be pack_for_amx's (out/16, in/32, 16, 16, 2) bf16 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * 16;
  TORCH_CHECK(packed.size(1) * 32 == K, "packed weight's in_features (", packed.size(1) * 32, ") differ from x's (",
              K, ")");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.is_contiguous() &&
                  out.scalar_type() == torch::kBFloat16,
              "out must be contiguous bf16 (M, out_features)");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == torch::kBFloat16,
                "bias must be bf16 (out_features,)");
  return {M, K, N};
}

}  // namespace s1serve
