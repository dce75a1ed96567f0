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
#include <cmath>
#include <cstdint>
#include <cstring>
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

// fp32/bf16/fp16 rows are differenced and scaled in fp32 (like the pure-PyTorch reference).
template <typename scalar_t>
using delta_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Storage <-> arithmetic conversions written without branches or ternaries so that every loop
// vectorises: GCC leaves c10's conversions (a NaN branch, `?:` on bit patterns) scalar, which made
// fp16 ~20x slower than fp32.
// memcpy, not C++20's std::bit_cast: torch 2.11 and older build extensions as C++17. GCC turns it into a move.
inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline uint32_t select_mask(bool condition) { return UINT32_C(0) - static_cast<uint32_t>(condition); }

inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(c10::BFloat16 x) { return as_float(static_cast<uint32_t>(x.x) << 16); }
// IEEE half <-> float with selects instead of branches (the FP16 library's algorithm, as in c10).
inline float load(c10::Half x) {
  const uint32_t w = static_cast<uint32_t>(x.x) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const float normalized =
      as_float((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
  const float denormalized = as_float((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
  const uint32_t use_denormalized = select_mask(two_w < (UINT32_C(1) << 27));
  const uint32_t magnitude = (as_bits(denormalized) & use_denormalized) |
                             (as_bits(normalized) & ~use_denormalized);
  return as_float(sign | magnitude);
}

inline uint16_t half_bits(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = as_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t bias = std::max(shl1_w & UINT32_C(0xFF000000), UINT32_C(0x71000000));
  base = as_float((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = as_bits(base);
  const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x00007C00)) + (bits & UINT32_C(0x00000FFF));
  const uint32_t is_nan = select_mask(shl1_w > UINT32_C(0xFF000000));
  return static_cast<uint16_t>((sign >> 16) | (UINT32_C(0x7E00) & is_nan) | (nonsign & ~is_nan));
}

template <typename scalar_t>
inline scalar_t store(delta_t<scalar_t> x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t u = as_bits(x);
    const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;  // nearest-even
    const uint32_t is_nan = select_mask(x != x);
    return c10::BFloat16(static_cast<uint16_t>((UINT32_C(0x7FC0) & is_nan) | (rounded & ~is_nan)),
                         c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(half_bits(x), c10::Half::from_bits());
  } else {
    return x;
  }
}

// Squares are summed in fp32 SIMD lanes over blocks this short (a handful of terms per lane, so
// the block sum is within a few ulp) and the block sums in double: fp32-rate arithmetic, with
// fp64-reference accuracy at any row length.
constexpr int64_t kLaneBlock = 64;

template <typename scalar_t>
[[gnu::always_inline]] inline double chunk_sum_sq_body(const scalar_t* a, const scalar_t* b,
                                                       int64_t len) {
  using dt = delta_t<scalar_t>;
  double sum = 0.0;
  for (int64_t j0 = 0; j0 < len; j0 += kLaneBlock) {
    const int64_t m = std::min(kLaneBlock, len - j0);
    dt block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t j = j0; j < j0 + m; ++j) {
      block += va::square<dt>(va::delta<dt>(load(a[j]), load(b[j])));
    }
    sum += static_cast<double>(block);
  }
  return sum;
}

template <typename scalar_t>
[[gnu::always_inline]] inline void chunk_write_grad_body(const scalar_t* a, const scalar_t* b,
                                                         scalar_t* g, int64_t len, double coef) {
  using dt = delta_t<scalar_t>;
  const dt c = static_cast<dt>(coef);
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    g[j] = store<scalar_t>(va::grad<dt>(c, va::delta<dt>(load(a[j]), load(b[j]))));
  }
}

// The extension is built for the baseline ISA (it must load on any x86-64), while torch's own
// kernels pick AVX2/AVX-512 at run time; to keep up, the two loops are also compiled for AVX2 and
// AVX-512 and selected once per call from what the CPU supports (AVX-512 mostly pays off for the
// bf16/fp16 conversions: ~1.5x over AVX2 there, on par for fp32, which is memory-bound).
template <typename scalar_t>
struct RowOps {
  double (*sum_sq)(const scalar_t*, const scalar_t*, int64_t);
  void (*write_grad)(const scalar_t*, const scalar_t*, scalar_t*, int64_t, double);
};

template <typename scalar_t>
double chunk_sum_sq_base(const scalar_t* a, const scalar_t* b, int64_t len) {
  return chunk_sum_sq_body(a, b, len);
}
template <typename scalar_t>
void chunk_write_grad_base(const scalar_t* a, const scalar_t* b, scalar_t* g, int64_t len,
                           double coef) {
  chunk_write_grad_body(a, b, g, len, coef);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FREEFLOW_AVX2 __attribute__((target("avx2,fma,f16c")))
template <typename scalar_t>
FREEFLOW_AVX2 double chunk_sum_sq_avx2(const scalar_t* a, const scalar_t* b, int64_t len) {
  return chunk_sum_sq_body(a, b, len);
}
template <typename scalar_t>
FREEFLOW_AVX2 void chunk_write_grad_avx2(const scalar_t* a, const scalar_t* b, scalar_t* g,
                                         int64_t len, double coef) {
  chunk_write_grad_body(a, b, g, len, coef);
}
#define FREEFLOW_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
template <typename scalar_t>
FREEFLOW_AVX512 double chunk_sum_sq_avx512(const scalar_t* a, const scalar_t* b, int64_t len) {
  return chunk_sum_sq_body(a, b, len);
}
template <typename scalar_t>
FREEFLOW_AVX512 void chunk_write_grad_avx512(const scalar_t* a, const scalar_t* b, scalar_t* g,
                                             int64_t len, double coef) {
  chunk_write_grad_body(a, b, g, len, coef);
}
#endif

template <typename scalar_t>
RowOps<scalar_t> row_ops() {
#if defined(__GNUC__) && defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return {&chunk_sum_sq_avx512<scalar_t>, &chunk_write_grad_avx512<scalar_t>};
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {&chunk_sum_sq_avx2<scalar_t>, &chunk_write_grad_avx2<scalar_t>};
  }
#endif
  return {&chunk_sum_sq_base<scalar_t>, &chunk_write_grad_base<scalar_t>};
}

template <typename scalar_t>
double row_sum_sq(const RowOps<scalar_t>& ops, const scalar_t* a, const scalar_t* b, int64_t d) {
  double sum = 0.0;
  for (int64_t j0 = 0; j0 < d; j0 += va::kChunk) {
    sum += ops.sum_sq(a + j0, b + j0, std::min(va::kChunk, d - j0));
  }
  return sum;
}

template <typename scalar_t, typename stat_t>
void velocity_alignment_cpu_kernel(const scalar_t* A, const scalar_t* B, scalar_t* G,
                                   stat_t* per_sample, double* terms, int64_t n, int64_t d,
                                   double power, double eps, double scale) {
  const RowOps<scalar_t> ops = row_ops<scalar_t>();
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
        const double coef = finish_sample(i, row_sum_sq(ops, a, b, d));
        ops.write_grad(a, b, G + i * d, d, coef);
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
      partial[u] = ops.sum_sq(A + i * d + j0, B + i * d + j0, std::min(va::kChunk, d - j0));
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
      ops.write_grad(A + off, B + off, G + off, std::min(va::kChunk, d - j0), coef[i]);
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
