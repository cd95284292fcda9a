// attnfx_C::head_readout and attnfx_C::head_contrib on CUDA (the math is in readout.cpp). Each
// block computes `rows` rows of the output: the z rows are staged in shared memory as fp32, and
// thread (k, r) accumulates output column k of row r over d, reading u[i, :, k] with the
// block's k-threads side by side (coalesced).
#include "cuda_utils.cuh"

namespace attnfx {

constexpr int kThreads = 256;
constexpr int64_t kMaxSharedFloats = 12288;      // 48 KiB: the default shared-memory limit of a block

template <typename scalar_t, typename out_t>
__global__ void rows_times_heads_kernel(const scalar_t* __restrict__ z, int64_t s0, int64_t s1, int64_t s2,
                                        int64_t s3, const int64_t* __restrict__ positions,
                                        const int64_t* __restrict__ heads, const float* __restrict__ u,
                                        out_t* __restrict__ out, int64_t total_rows, int64_t P, int64_t n,
                                        int64_t d, int64_t K) {
  extern __shared__ float z_rows[];                            // [blockDim.y, d]
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  float* zr = z_rows + threadIdx.y * d;
  const int64_t i = row % n, p = (row / n) % P, b = row / (n * P);
  if (row < total_rows) {
    const scalar_t* src = z + b * s0 + positions[p] * s1 + heads[i] * s2;
    for (int64_t e = threadIdx.x; e < d; e += blockDim.x) zr[e] = static_cast<float>(src[e * s3]);
  }
  __syncthreads();
  if (row >= total_rows) return;
  const float* ui = u + i * d * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float acc = 0.f;
    for (int64_t e = 0; e < d; ++e) acc += zr[e] * ui[e * K + k];
    out[row * K + k] = static_cast<out_t>(acc);
  }
}

static Tensor run_cuda(const RowsTimesHeads& p, at::ScalarType out_dtype) {
  const int64_t P = p.positions.size(), n = p.heads.size(), d = p.z.size(3), K = p.u.size(2);
  const c10::cuda::CUDAGuard guard(p.z.device());
  TORCH_CHECK(d <= kMaxSharedFloats, "head_readout/head_contrib on CUDA: expected d <= ", kMaxSharedFloats,
              ", received ", d);
  // Small K (readouts: K ≈ 8) packs many rows into a block; large K (contrib: d_model) one row.
  const int k_threads = static_cast<int>(std::min<int64_t>(kThreads, ((K + 31) / 32) * 32));
  const int rows_per_block = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(kThreads / k_threads, kMaxSharedFloats / std::max<int64_t>(d, 1))));
  const Tensor positions = cuda::to_device(p.positions, p.z.device()), heads = cuda::to_device(p.heads, p.z.device());
  const int64_t rows = p.z.size(0) * P * n;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  return run_rows_times_heads(p, out_dtype, [&](auto z_type, auto* out) {
    using scalar_t = decltype(z_type);
    rows_times_heads_kernel<<<cuda::blocks_for(rows, rows_per_block), dim3(k_threads, rows_per_block),
                              rows_per_block * d * sizeof(float), stream>>>(
        p.z.const_data_ptr<scalar_t>(), p.z.stride(0), p.z.stride(1), p.z.stride(2), p.z.stride(3),
        positions.const_data_ptr<int64_t>(), heads.const_data_ptr<int64_t>(), p.u.const_data_ptr<float>(), out, rows,
        P, n, d, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(attnfx_C, CUDA, m) {
  m.impl("head_readout", &head_readout<run_cuda>);
  m.impl("head_contrib", &head_contrib<run_cuda>);
}

}  // namespace attnfx
