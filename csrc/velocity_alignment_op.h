// Torch-side pieces shared by the CPU implementation and the CUDA binding: argument checks and
// output allocation, so both backends reject the same inputs with the same messages and return
// outputs of the same dtypes (the fake implementation in freeflow/_ext.py mirrors these).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace freeflow {

inline void check_velocity_alignment_args(const at::Tensor& F, const at::Tensor& A,
                                          const at::Tensor& B, double power, double eps,
                                          double scale) {
  const auto dtype = F.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                        dtype == at::kHalf,
                    "velocity_alignment: F must be float32, float64, bfloat16 or float16, got ",
                    dtype);
  TORCH_CHECK_VALUE(F.dim() >= 2, "velocity_alignment: F must have shape (N, ...) with at least ",
                    "one feature dimension, got ", F.sizes());
  TORCH_CHECK_VALUE(F.numel() > 0, "velocity_alignment: F must be non-empty, got ", F.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"A", A}, {"B", B}}) {
    TORCH_CHECK_VALUE(t.sizes() == F.sizes(), "velocity_alignment: ", name,
                      " must have F's shape ", F.sizes(), ", got ", t.sizes());
    TORCH_CHECK_VALUE(t.scalar_type() == dtype, "velocity_alignment: ", name,
                      " must have F's dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == F.device(), "velocity_alignment: ", name,
                      " must be on F's device ", F.device(), ", got ", t.device());
  }
  TORCH_CHECK_VALUE(std::isfinite(power), "velocity_alignment: power must be finite, got ", power);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "velocity_alignment: eps must be finite and ",
                    ">= 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(scale), "velocity_alignment: scale must be finite, got ", scale);
}

// per_sample is kept in the accumulation precision (float64 for float64 inputs, float32 otherwise)
// because it is a logging statistic; the loss and the gradient take F's dtype like any loss would.
inline at::ScalarType velocity_alignment_stat_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

struct VelocityAlignmentOutputs {
  at::Tensor loss, per_sample, grad;
};

inline VelocityAlignmentOutputs allocate_velocity_alignment_outputs(const at::Tensor& F) {
  const int64_t n = F.size(0);
  VelocityAlignmentOutputs out;
  out.loss = at::empty({}, F.options());
  out.per_sample = at::empty({n}, F.options().dtype(velocity_alignment_stat_dtype(F.scalar_type())));
  out.grad = at::empty(F.sizes(), F.options().memory_format(at::MemoryFormat::Contiguous));
  return out;
}

inline void check_velocity_alignment_backward_args(const at::Tensor& grad_loss,
                                                   const at::Tensor& grad_F) {
  TORCH_CHECK_VALUE(grad_loss.dim() == 0, "velocity_alignment_backward: grad_loss must be a ",
                    "scalar (0-dim) tensor, got shape ", grad_loss.sizes());
  TORCH_CHECK_VALUE(grad_loss.device() == grad_F.device(), "velocity_alignment_backward: ",
                    "grad_loss must be on grad_F's device ", grad_F.device(), ", got ",
                    grad_loss.device());
}

}  // namespace freeflow
