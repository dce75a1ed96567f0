// CUDA kernel of freeflow::velocity_alignment: one block per sample, one launch for everything.
//
//   sweep 1  each thread sums (a - b)² over a strided slice of row i with 16-byte vector loads,
//            fp32 accumulation (fp64 for fp64 rows); warp shuffles + shared memory reduce the block.
//   stats    thread 0 turns ‖Δ_i‖² into msd_i, w_i·msd_i and the gradient coefficient (shared
//            header, in double) and broadcasts the coefficient.
//   sweep 2  the block re-reads row i (now in L2) and writes coef·(a - b) as the gradient.
//   finish   the last block to retire (threadfence + atomic ticket) sums w_i·msd_i over the batch
//            in index order and writes the loss — deterministic, no second launch.
//
// Only CUDA headers and the shared math header: `nvcc -c -arch=sm_80` must accept this file alone.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "velocity_alignment.h"
#include "velocity_alignment_cuda.h"

namespace freeflow {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct Traits;  // acc_t: arithmetic type of Δ and of the reductions
template <>
struct Traits<float> {
  using acc_t = float;
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};
template <>
struct Traits<double> {
  using acc_t = double;
  __device__ static double load(double x) { return x; }
  __device__ static double store(double x) { return x; }
};
template <>
struct Traits<__nv_bfloat16> {
  using acc_t = float;
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Traits<__half> {
  using acc_t = float;
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};

// V elements moved as one 16-byte (or narrower, V = 1) transaction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename acc_t>
__device__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the block; the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t x, acc_t* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = threadIdx.x < kWarps ? scratch[threadIdx.x] : acc_t(0);
  if (warp == 0) x = warp_sum(x);
  __syncthreads();  // scratch may be reused by the caller's next reduction
  return x;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    velocity_alignment_kernel(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ G,
                              typename Traits<T>::acc_t* __restrict__ per_sample, T* __restrict__ loss,
                              double* __restrict__ terms, unsigned int* __restrict__ blocks_done,
                              int64_t n, int64_t d, double power, double eps, double scale) {
  using acc_t = typename Traits<T>::acc_t;
  using P = Pack<T, V>;
  __shared__ acc_t scratch[kWarps];
  __shared__ double scratch64[kWarps];
  __shared__ acc_t coef_shared;
  __shared__ bool is_last;

  const int64_t i = blockIdx.x;
  const P* a = reinterpret_cast<const P*>(A + i * d);
  const P* b = reinterpret_cast<const P*>(B + i * d);
  P* g = reinterpret_cast<P*>(G + i * d);
  const int64_t packs = d / V;  // the launcher picks V dividing d

  acc_t sum = 0;
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    const P pa = a[p], pb = b[p];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      sum += va::square<acc_t>(va::delta<acc_t>(Traits<T>::load(pa.v[k]), Traits<T>::load(pb.v[k])));
    }
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) {
    const va::SampleStats s = va::sample_stats(static_cast<double>(sum), n, d, power, eps, scale);
    per_sample[i] = static_cast<acc_t>(s.msd);
    terms[i] = s.term;
    coef_shared = static_cast<acc_t>(s.coef);
  }
  __syncthreads();
  const acc_t coef = coef_shared;
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    const P pa = a[p], pb = b[p];
    P out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      out.v[k] = Traits<T>::store(va::grad<acc_t>(
          coef, va::delta<acc_t>(Traits<T>::load(pa.v[k]), Traits<T>::load(pb.v[k]))));
    }
    g[p] = out;
  }

  // Publish terms[i] before taking a ticket; the block with the last ticket sees every term.
  if (threadIdx.x == 0) {
    __threadfence();
    is_last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double total = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) total += __ldcg(terms + j);
  total = block_sum(total, scratch64);
  if (threadIdx.x == 0) {
    *loss = Traits<T>::store(static_cast<acc_t>(va::batch_mean(total, n)));
    *blocks_done = 0;  // ready for reuse
  }
}

template <typename T>
cudaError_t launch(const VaCudaArgs& args, cudaStream_t stream) {
  using acc_t = typename Traits<T>::acc_t;
  constexpr int kVec = 16 / sizeof(T);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vectorised = args.d % kVec == 0 && aligned(args.A) && aligned(args.B) &&
                          aligned(args.grad);
  if (args.n > 2147483647LL) return cudaErrorInvalidValue;  // grid.x limit: one block per sample
  const dim3 grid(static_cast<unsigned int>(args.n)), block(kThreads);
  const T* A = static_cast<const T*>(args.A);
  const T* B = static_cast<const T*>(args.B);
  T* G = static_cast<T*>(args.grad);
  auto* per_sample = static_cast<acc_t*>(args.per_sample);
  T* loss = static_cast<T*>(args.loss);
  if (vectorised) {
    velocity_alignment_kernel<T, kVec><<<grid, block, 0, stream>>>(
        A, B, G, per_sample, loss, args.terms, args.blocks_done, args.n, args.d, args.power,
        args.eps, args.scale);
  } else {
    velocity_alignment_kernel<T, 1><<<grid, block, 0, stream>>>(
        A, B, G, per_sample, loss, args.terms, args.blocks_done, args.n, args.d, args.power,
        args.eps, args.scale);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t velocity_alignment_cuda(VaScalar dtype, const VaCudaArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case VaScalar::kFloat32:
      return launch<float>(args, stream);
    case VaScalar::kFloat64:
      return launch<double>(args, stream);
    case VaScalar::kBFloat16:
      return launch<__nv_bfloat16>(args, stream);
    case VaScalar::kFloat16:
      return launch<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace freeflow
