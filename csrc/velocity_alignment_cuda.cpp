// CUDA registration of freeflow::velocity_alignment: checks, allocation, launch. Compiled only with
// a CUDA build of torch (setup.py and freeflow/_ext.py leave `*_cuda.cpp` out otherwise), because
// it includes headers that only such a build ships. The kernel itself is velocity_alignment_kernel.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "velocity_alignment_cuda.h"
#include "velocity_alignment_op.h"

namespace freeflow {
namespace {

VaScalar va_scalar(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return VaScalar::kFloat32;
    case at::kDouble:
      return VaScalar::kFloat64;
    case at::kBFloat16:
      return VaScalar::kBFloat16;
    case at::kHalf:
      return VaScalar::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, "velocity_alignment: unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> velocity_alignment_cuda_op(
    const at::Tensor& F, const at::Tensor& A, const at::Tensor& B, double power, double eps,
    double scale) {
  check_velocity_alignment_args(F, A, B, power, eps, scale);
  const c10::cuda::CUDAGuard guard(F.device());
  const at::Tensor a = A.contiguous(), b = B.contiguous();
  VelocityAlignmentOutputs out = allocate_velocity_alignment_outputs(F);
  const int64_t n = F.size(0), d = F.numel() / n;
  TORCH_CHECK_VALUE(n <= 2147483647LL, "velocity_alignment: at most 2^31 - 1 samples on CUDA, got ",
                    n);
  // terms (N doubles) and the block counter share one allocation; only the counter needs zeroing.
  at::Tensor workspace = at::empty({n + 1}, F.options().dtype(at::kDouble));
  auto* counter = reinterpret_cast<unsigned int*>(workspace.data_ptr<double>() + n);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream));

  VaCudaArgs args;
  args.A = a.const_data_ptr();
  args.B = b.const_data_ptr();
  args.grad = out.grad.mutable_data_ptr();
  args.per_sample = out.per_sample.mutable_data_ptr();
  args.loss = out.loss.mutable_data_ptr();
  args.terms = workspace.data_ptr<double>();
  args.blocks_done = counter;
  args.n = n;
  args.d = d;
  args.power = power;
  args.eps = eps;
  args.scale = scale;
  C10_CUDA_CHECK(velocity_alignment_cuda(va_scalar(F.scalar_type()), args, stream));
  return {out.loss, out.per_sample, out.grad};
}

}  // namespace
}  // namespace freeflow

TORCH_LIBRARY_IMPL(freeflow, CUDA, m) {
  m.impl("velocity_alignment", &freeflow::velocity_alignment_cuda_op);
}
