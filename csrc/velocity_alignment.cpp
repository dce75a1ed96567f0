// freeflow::velocity_alignment — schema, CPU implementation, and the Python module stub.
//
// One call reads A and B once per sample and writes the loss, the per-sample ‖Δ_i‖²/d and the full
// gradient w.r.t. F (Liger-style: backward only rescales the stored gradient by the incoming
// scalar). Each sample is visited in two sweeps — sum of squares, then coef·Δ — and the second
// sweep re-reads a row that the first one has just pulled into cache, so memory sees one read of A
// and B and one write of the gradient. F is never read: it only fixes the gradient's shape/dtype.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "velocity_alignment.h"
#include "velocity_alignment_op.h"

// `import freeflow._C` only has to load this library (the TORCH_LIBRARY blocks below run at load
// time); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace freeflow {
namespace {

// fp32/bf16/fp16 rows are differenced and scaled in fp32 (like the pure-PyTorch reference);
// squares are summed in double so long rows keep fp32-level accuracy without compensated sums.
template <typename scalar_t>
using delta_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
double chunk_sum_sq(const scalar_t* a, const scalar_t* b, int64_t len) {
  using dt = delta_t<scalar_t>;
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    const dt dl = va::delta<dt>(static_cast<dt>(a[j]), static_cast<dt>(b[j]));
    sum += va::square<double>(static_cast<double>(dl));
  }
  return sum;
}

template <typename scalar_t>
void chunk_write_grad(const scalar_t* a, const scalar_t* b, scalar_t* g, int64_t len,
                      double coef) {
  using dt = delta_t<scalar_t>;
  const dt c = static_cast<dt>(coef);
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const dt dl = va::delta<dt>(static_cast<dt>(a[j]), static_cast<dt>(b[j]));
    g[j] = static_cast<scalar_t>(va::grad<dt>(c, dl));
  }
}

template <typename scalar_t>
double row_sum_sq(const scalar_t* a, const scalar_t* b, int64_t d) {
  double sum = 0.0;
  for (int64_t j0 = 0; j0 < d; j0 += va::kChunk) {
    sum += chunk_sum_sq(a + j0, b + j0, std::min(va::kChunk, d - j0));
  }
  return sum;
}

template <typename scalar_t, typename stat_t>
void velocity_alignment_cpu_kernel(const scalar_t* A, const scalar_t* B, scalar_t* G,
                                   stat_t* per_sample, double* terms, int64_t n, int64_t d,
                                   double power, double eps, double scale) {
  const int64_t chunks = (d + va::kChunk - 1) / va::kChunk;
  auto finish_sample = [&](int64_t i, double sum_sq) {
    const va::SampleStats s = va::sample_stats(sum_sq, n, d, power, eps, scale);
    per_sample[i] = static_cast<stat_t>(s.msd);
    terms[i] = s.term;
    return s.coef;
  };

  if (n >= at::get_num_threads() || chunks == 1) {
    // Enough samples to keep every thread busy: a thread owns whole samples, so each row's second
    // sweep finds it still in that core's cache.
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / d);
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* a = A + i * d;
        const scalar_t* b = B + i * d;
        const double coef = finish_sample(i, row_sum_sq(a, b, d));
        chunk_write_grad(a, b, G + i * d, d, coef);
      }
    });
    return;
  }

  // Fewer samples than threads (N = 1 at inference-time checks, or huge rows): split the rows into
  // chunks, sum the chunks in parallel, then add them in order so the result is the same as above.
  std::vector<double> partial(n * chunks);
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t i = u / chunks, j0 = (u % chunks) * va::kChunk;
      partial[u] = chunk_sum_sq(A + i * d + j0, B + i * d + j0, std::min(va::kChunk, d - j0));
    }
  });
  std::vector<double> coef(n);
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[i * chunks + c];
    coef[i] = finish_sample(i, sum);
  }
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t i = u / chunks, j0 = (u % chunks) * va::kChunk;
      const int64_t off = i * d + j0;
      chunk_write_grad(A + off, B + off, G + off, std::min(va::kChunk, d - j0), coef[i]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> velocity_alignment_cpu(
    const at::Tensor& F, const at::Tensor& A, const at::Tensor& B, double power, double eps,
    double scale) {
  check_velocity_alignment_args(F, A, B, power, eps, scale);
  const at::Tensor a = A.contiguous(), b = B.contiguous();
  VelocityAlignmentOutputs out = allocate_velocity_alignment_outputs(F);
  const int64_t n = F.size(0), d = F.numel() / n;
  std::vector<double> terms(n);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, F.scalar_type(), "velocity_alignment_cpu", [&] {
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    velocity_alignment_cpu_kernel<scalar_t, stat_t>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        out.grad.mutable_data_ptr<scalar_t>(), out.per_sample.mutable_data_ptr<stat_t>(),
        terms.data(), n, d, power, eps, scale);
    double total = 0.0;
    for (const double t : terms) total += t;
    out.loss.fill_(va::batch_mean(total, n));
  });
  return {out.loss, out.per_sample, out.grad};
}

// The stored gradient already carries every factor but the incoming one; the same at::mul serves
// every backend, hence CompositeExplicitAutograd.
at::Tensor velocity_alignment_backward(const at::Tensor& grad_loss, const at::Tensor& grad_F) {
  check_velocity_alignment_backward_args(grad_loss, grad_F);
  return grad_F * grad_loss;
}

}  // namespace
}  // namespace freeflow

TORCH_LIBRARY(freeflow, m) {
  // The fake (meta) implementations and the autograd formula are registered from Python.
  m.set_python_module("freeflow._ext");
  m.def(
      "velocity_alignment(Tensor F, Tensor A, Tensor B, float power, float eps, float scale)"
      " -> (Tensor loss, Tensor per_sample, Tensor grad_F)",
      {at::Tag::pt2_compliant_tag});
  m.def("velocity_alignment_backward(Tensor grad_loss, Tensor grad_F) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(freeflow, CPU, m) {
  m.impl("velocity_alignment", &freeflow::velocity_alignment_cpu);
}

TORCH_LIBRARY_IMPL(freeflow, CompositeExplicitAutograd, m) {
  m.impl("velocity_alignment_backward", &freeflow::velocity_alignment_backward);
}
