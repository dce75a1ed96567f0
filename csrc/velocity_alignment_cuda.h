// Launcher of the CUDA velocity-alignment kernel. Plain C++ (no torch headers) so that
// velocity_alignment_kernel.cu compiles with `nvcc -c` alone; the torch side lives in
// velocity_alignment_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace freeflow {

enum class VaScalar : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

struct VaCudaArgs {
  const void* A;        // (N, d) rows, storage dtype
  const void* B;        // (N, d) rows, storage dtype
  void* grad;           // (N, d) output, storage dtype
  void* per_sample;     // (N,) output, float64 for kFloat64 inputs, float32 otherwise
  void* loss;           // 0-dim output, storage dtype
  double* terms;        // (N,) scratch: w_i · msd_i
  unsigned int* blocks_done;  // one zero-initialised counter; the kernel leaves it at zero
  int64_t n;
  int64_t d;
  double power;
  double eps;
  double scale;
};

// One kernel launch computes the loss, the per-sample terms and the gradient; the last block to
// finish reduces the per-sample terms in a fixed order, so the loss is deterministic.
cudaError_t velocity_alignment_cuda(VaScalar dtype, const VaCudaArgs& args, cudaStream_t stream);

}  // namespace freeflow
