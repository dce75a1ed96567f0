// Per-element and per-sample math of the velocity-alignment loss (docs/design.md §5), shared verbatim by
// the CPU implementation (velocity_alignment.cpp, g++) and the CUDA kernel
// (velocity_alignment_kernel.cu, nvcc). Every formula of the op lives here and nowhere else; the two
// backends only differ in how they load/store their storage types and split the reductions.
//
//   Δ_i       = A_i - B_i                          (per element, in the accumulation type)
//   msd_i     = ‖Δ_i‖² / d                         (mean squared difference, logged per sample)
//   w_i       = 1 / (msd_i + ε)^k                  (adaptive weight, a constant for autograd)
//   loss      = mean_i w_i · msd_i
//   ∂loss/∂F  = (2 / (N·d)) · λ · w_i · Δ_i        (the gradient of λ·mean_i w_i‖F_i - sg(F_i - Δ_i)‖²/d)
//
// This header must stay free of torch and CUDA headers so that both compilers accept it alone.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FREEFLOW_HOST_DEVICE __host__ __device__
#else
#define FREEFLOW_HOST_DEVICE
#endif

namespace freeflow {
namespace va {

// Reductions split each sample into chunks of this many elements and add the chunk sums in order,
// so the CPU result does not depend on how many threads shared the work.
constexpr int64_t kChunk = 4096;

template <typename acc_t>
FREEFLOW_HOST_DEVICE inline acc_t delta(acc_t a, acc_t b) {
  return a - b;
}

template <typename acc_t>
FREEFLOW_HOST_DEVICE inline acc_t square(acc_t x) {
  return x * x;
}

// Per-sample quantities, computed once per sample in double whatever the storage type: they cost
// nothing next to the O(d) loops and keep fp32/bf16 results within rounding of an fp64 reference.
struct SampleStats {
  double msd;   // ‖Δ_i‖²/d, returned for logging
  double term;  // w_i · msd_i; the loss is the mean of these over the batch
  double coef;  // (2/(N·d)) · λ · w_i; the gradient row is coef · Δ_i
};

FREEFLOW_HOST_DEVICE inline SampleStats sample_stats(double sum_sq, int64_t n, int64_t d,
                                                     double power, double eps, double scale) {
  SampleStats s;
  s.msd = sum_sq / static_cast<double>(d);
  // pow(x, -0.0) == 1 for every x (NaN and 0 included), so k = 0 needs no special case and matches
  // torch.pow.
  const double w = pow(s.msd + eps, -power);
  s.term = w * s.msd;
  s.coef = 2.0 * scale * w / (static_cast<double>(n) * static_cast<double>(d));
  return s;
}

template <typename acc_t>
FREEFLOW_HOST_DEVICE inline acc_t grad(acc_t coef, acc_t delta_value) {
  return coef * delta_value;
}

FREEFLOW_HOST_DEVICE inline double batch_mean(double sum_terms, int64_t n) {
  return sum_terms / static_cast<double>(n);
}

}  // namespace va
}  // namespace freeflow
