// The backward rules of lrp_rules.cpp on CUDA (the forwards are ATen calls, registered for every
// device there). Math in opmath (fp32 for fp16/bf16; fp64 for fp64).
//   lrp_act_backward: one elementwise grid-stride pass, f(x) recomputed in registers.
//   norm backwards:   the input gradient, one block per row (grid-stride): block sums give mean,
//                     Σ(x−mean)² and mean(g·w), kept per row; then the weight/bias gradients as
//                     column sums: 32 columns × a stripe of rows per block (a warp reads 32
//                     adjacent elements of a row), one atomicAdd per column and stripe into an
//                     opmath buffer (order-dependent rounding, like any atomic reduction).
#include "cuda_utils.cuh"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <cmath>

namespace attnfx {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;     // grid-stride beyond this: enough blocks to fill any GPU

__device__ inline float erf_(float x) { return erff(x); }
__device__ inline double erf_(double x) { return erf(x); }
__device__ inline float tanh_(float x) { return tanhf(x); }
__device__ inline double tanh_(double x) { return tanh(x); }
__device__ inline float exp_(float x) { return expf(x); }
__device__ inline double exp_(double x) { return exp(x); }

// f(x), as torch defines it (gelu: exact erf form; gelu_tanh: the tanh approximation).
template <typename acc_t>
__device__ inline acc_t act_value(acc_t x, Act act) {
  switch (act) {
    case Act::Gelu: return acc_t(0.5) * x * (acc_t(1) + erf_(x * acc_t(M_SQRT1_2)));
    case Act::GeluTanh: {
      const acc_t inner = acc_t(M_2_SQRTPI * M_SQRT1_2) * (x + acc_t(0.044715) * x * x * x);
      return acc_t(0.5) * x * (acc_t(1) + tanh_(inner));
    }
    case Act::Silu: return x / (acc_t(1) + exp_(-x));
    case Act::Tanh: return tanh_(x);
    case Act::Relu: return x > acc_t(0) ? x : acc_t(0);
  }
  return x;
}

template <typename scalar_t>
__global__ void act_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                    scalar_t* __restrict__ out, int64_t n, Act act, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t stab = xi + (xi >= acc_t(0) ? eps : -eps);
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * (act_value(xi, act) / stab));
  }
}

static Tensor lrp_act_backward_cuda(const Tensor& grad, const Tensor& x, c10::string_view act_name, double eps) {
  const Act act = check_act_backward(grad, x, act_name);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous(), gc = grad.contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrp_act_backward_cuda", [&] {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(kMaxBlocks * 16, (n + kThreads - 1) / kThreads));
    act_backward_kernel<<<blocks, kThreads, 0, stream>>>(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                                                         out.mutable_data_ptr<scalar_t>(), n, act,
                                                         static_cast<at::opmath_type<scalar_t>>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t, bool kLayerNorm>
__global__ void norm_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                     const at::opmath_type<scalar_t>* __restrict__ w, scalar_t* __restrict__ gx,
                                     at::opmath_type<scalar_t>* __restrict__ row_mean,
                                     at::opmath_type<scalar_t>* __restrict__ row_inv, int64_t rows, int64_t d,
                                     at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* xr = x + r * d;
    const scalar_t* gr = g + r * d;
    acc_t mean = 0, sq = 0, gw = 0;
    if (kLayerNorm) {
      for (int64_t e = threadIdx.x; e < d; e += blockDim.x) mean += static_cast<acc_t>(xr[e]);
      mean = cuda::block_sum(mean) / d;
    }
    for (int64_t e = threadIdx.x; e < d; e += blockDim.x) {
      const acc_t c = static_cast<acc_t>(xr[e]) - mean;
      sq += c * c;
      gw += static_cast<acc_t>(gr[e]) * (w ? w[e] : acc_t(1));
    }
    const acc_t inv = acc_t(1) / sqrt(cuda::block_sum(sq) / d + eps);       // 1/σ or 1/rms
    const acc_t gw_mean = kLayerNorm ? cuda::block_sum(gw) / d : acc_t(0);
    for (int64_t e = threadIdx.x; e < d; e += blockDim.x) {
      const acc_t ge = static_cast<acc_t>(gr[e]);
      gx[r * d + e] = static_cast<scalar_t>((ge * (w ? w[e] : acc_t(1)) - gw_mean) * inv);
    }
    if (threadIdx.x == 0) {
      row_mean[r] = mean;
      row_inv[r] = inv;
    }
  }
}

constexpr int kColumnRows = 8;           // threads per column in a block: blockDim (32, 8)
constexpr int64_t kStripes = 256;        // row stripes: blocks per 32 columns (and atomics per column)

// gw[e] += Σ_r g[r, e] · x̂[r, e] and gb[e] += Σ_r g[r, e] over one stripe of rows.
template <typename scalar_t, bool kLayerNorm>
__global__ void norm_weight_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                        const at::opmath_type<scalar_t>* __restrict__ row_mean,
                                        const at::opmath_type<scalar_t>* __restrict__ row_inv, int64_t rows,
                                        int64_t d, int64_t rows_per_stripe, at::opmath_type<scalar_t>* __restrict__ gw_sum,
                                        at::opmath_type<scalar_t>* __restrict__ gb_sum) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part_w[kColumnRows][cuda::kWarp + 1], part_b[kColumnRows][cuda::kWarp + 1];
  const int64_t e = static_cast<int64_t>(blockIdx.x) * cuda::kWarp + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_stripe;
  const int64_t last = std::min(rows, first + rows_per_stripe);
  acc_t sw = 0, sb = 0;
  if (e < d) {
    for (int64_t r = first + threadIdx.y; r < last; r += kColumnRows) {
      const acc_t ge = static_cast<acc_t>(g[r * d + e]);
      sw += ge * (static_cast<acc_t>(x[r * d + e]) - row_mean[r]) * row_inv[r];
      sb += ge;
    }
  }
  part_w[threadIdx.y][threadIdx.x] = sw;
  part_b[threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y == 0 && e < d) {
    for (int i = 1; i < kColumnRows; ++i) {
      sw += part_w[i][threadIdx.x];
      sb += part_b[i][threadIdx.x];
    }
    atomicAdd(gw_sum + e, sw);
    if (kLayerNorm) atomicAdd(gb_sum + e, sb);
  }
}

static std::vector<Tensor> norm_backward_cuda(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& weight,
                                              double eps, bool layer_norm) {
  check_lrp_norm(x, weight, layer_norm ? "lrp_layer_norm_backward" : "lrp_rms_norm_backward", &grad);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  const Tensor xc = x.contiguous(), gc = grad.to(x.scalar_type()).contiguous();
  const at::ScalarType w_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  const at::ScalarType acc_dtype = at::toOpMathType(x.scalar_type());
  const Tensor wc = weight.has_value() ? weight->to(acc_dtype).contiguous() : Tensor();
  Tensor gx = at::empty(x.sizes(), x.options());
  Tensor gw_sum = at::zeros({d}, x.options().dtype(acc_dtype)), gb_sum = at::zeros({d}, x.options().dtype(acc_dtype));
  if (rows > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrp_norm_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto kernel = layer_norm ? norm_backward_kernel<scalar_t, true> : norm_backward_kernel<scalar_t, false>;
      Tensor row_mean = at::empty({rows}, x.options().dtype(acc_dtype)), row_inv = at::empty_like(row_mean);
      kernel<<<static_cast<unsigned>(std::min(rows, kMaxBlocks)), kThreads, 0, stream>>>(
          gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
          wc.defined() ? wc.const_data_ptr<acc_t>() : nullptr, gx.mutable_data_ptr<scalar_t>(),
          row_mean.mutable_data_ptr<acc_t>(), row_inv.mutable_data_ptr<acc_t>(), rows, d, static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t stripes = std::min(rows, kStripes), rows_per_stripe = (rows + stripes - 1) / stripes;
      const auto columns = layer_norm ? norm_weight_grad_kernel<scalar_t, true> : norm_weight_grad_kernel<scalar_t, false>;
      columns<<<dim3(cuda::blocks_for(d, cuda::kWarp), static_cast<unsigned>(stripes)), dim3(cuda::kWarp, kColumnRows), 0,
                stream>>>(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), row_mean.const_data_ptr<acc_t>(),
                          row_inv.const_data_ptr<acc_t>(), rows, d, rows_per_stripe, gw_sum.mutable_data_ptr<acc_t>(),
                          gb_sum.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {gx, gw_sum.to(w_dtype), gb_sum.to(w_dtype)};
}

TORCH_LIBRARY_IMPL(attnfx_C, CUDA, m) {
  m.impl("lrp_act_backward", &lrp_act_backward_cuda);
  m.impl("lrp_layer_norm_backward", &layer_norm_backward<norm_backward_cuda>);
  m.impl("lrp_rms_norm_backward", &rms_norm_backward<norm_backward_cuda>);
}

}  // namespace attnfx
