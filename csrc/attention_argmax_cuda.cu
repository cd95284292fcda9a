// attnfx_C::attention_argmax on CUDA (definitions in attention_argmax.cpp). One warp per query row,
// one pass over its visible keys, O(1) state per lane: lane i scores keys i, i + 32, … (each a full
// dot product with the q row, staged in shared memory as fp32) and keeps an online (max, index of
// the max, Σ exp(s − max)); the warp then merges the 32 states by shuffles, the smaller index
// winning between equal maxima, so the result is the first maximal key as on the CPU.
// max_prob = 1 / Σ exp(s − max).
#include "cuda_utils.cuh"

#include <cmath>

namespace attnfx {

// Defined in attention_argmax.cpp: the checks both devices share. Returns S.
int64_t check_attention_argmax(const Tensor& q, const Tensor& k, const std::optional<Tensor>& key_mask);

namespace {

constexpr int kRowsPerBlock = 4;         // warps per block, as attention_stats_cuda.cu

struct ArgmaxArgs {
  int64_t B, H, T, S, d, group;
  int64_t qs[4], ks[4];
  bool causal;
  float scale;
};

template <typename scalar_t>
__global__ void attention_argmax_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                        const bool* __restrict__ key_mask, ArgmaxArgs a,
                                        int64_t* __restrict__ index, float* __restrict__ max_prob) {
  extern __shared__ float q_rows[];                                   // [kRowsPerBlock, d]
  const int lane = threadIdx.x % cuda::kWarp, warp = threadIdx.x / cuda::kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;   // (b, h, t), t fastest
  if (row >= a.B * a.H * a.T) return;                                // whole warps leave: no block sync below
  const int64_t t = row % a.T, h = (row / a.T) % a.H, b = row / (a.T * a.H);
  float* qr = q_rows + warp * a.d;
  for (int64_t e = lane; e < a.d; e += cuda::kWarp) {
    qr[e] = static_cast<float>(q[b * a.qs[0] + h * a.qs[1] + t * a.qs[2] + e * a.qs[3]]);
  }
  __syncwarp();
  const scalar_t* kb = k + b * a.ks[0] + (h / a.group) * a.ks[1];
  const bool* mask = key_mask == nullptr ? nullptr : key_mask + b * a.S;
  const int64_t end = a.causal ? std::min(a.S, t + a.S - a.T + 1) : a.S;   // visible keys: j < end
  float m = -INFINITY, l = 0.f;
  int64_t best = -1;
  for (int64_t j = lane; j < end; j += cuda::kWarp) {
    if (mask != nullptr && !mask[j]) continue;
    const scalar_t* kr = kb + j * a.ks[2];
    float s = 0.f;
    for (int64_t e = 0; e < a.d; ++e) s += qr[e] * static_cast<float>(kr[e * a.ks[3]]);
    s *= a.scale;
    if (s > m) {                                                      // strictly: a lane's keys ascend
      l = l * expf(m - s) + 1.f;
      m = s;
      best = j;
    } else {
      l += expf(s - m);
    }
  }
  for (int offset = cuda::kWarp / 2; offset > 0; offset >>= 1) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, offset), l_o = __shfl_xor_sync(0xffffffffu, l, offset);
    const int64_t best_o = __shfl_xor_sync(0xffffffffu, best, offset);
    const float m_new = fmaxf(m, m_o);
    l = (l > 0.f ? l * expf(m - m_new) : 0.f) + (l_o > 0.f ? l_o * expf(m_o - m_new) : 0.f);
    if (best_o >= 0 && (m_o > m || (m_o == m && (best < 0 || best_o < best)))) best = best_o;
    m = m_new;
  }
  if (lane == 0) {
    const int64_t out = (b * a.H + h) * a.T + t;
    index[out] = best;
    max_prob[out] = l > 0.f ? 1.f / l : 0.f;
  }
}

std::tuple<Tensor, Tensor> attention_argmax_cuda(const Tensor& q, const Tensor& k,
                                                 const std::optional<Tensor>& key_mask, bool causal,
                                                 double sm_scale) {
  const int64_t S = check_attention_argmax(q, k, key_mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  const Tensor mask = key_mask.has_value() ? key_mask->contiguous() : Tensor();
  ArgmaxArgs a{B, H, T, S, d, H / k.size(1), {}, {}, causal, static_cast<float>(sm_scale)};
  for (int i = 0; i < 4; ++i) {
    a.qs[i] = q.stride(i);
    a.ks[i] = k.stride(i);
  }
  Tensor index = at::empty({B, H, T}, q.options().dtype(at::kLong));
  Tensor max_prob = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  if (index.numel() == 0) return {index, max_prob};
  TORCH_CHECK(kRowsPerBlock * d * sizeof(float) <= 48 * 1024, "attention_argmax on CUDA: expected head dim <= ",
              48 * 1024 / (kRowsPerBlock * sizeof(float)), ", received ", d);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_argmax_cuda", [&] {
    attention_argmax_kernel<<<cuda::blocks_for(B * H * T, kRowsPerBlock), kRowsPerBlock * cuda::kWarp,
                              kRowsPerBlock * d * sizeof(float), stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
        mask.defined() ? mask.const_data_ptr<bool>() : nullptr, a, index.mutable_data_ptr<int64_t>(),
        max_prob.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {index, max_prob};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfx_C, CUDA, m) { m.impl("attention_argmax", &attention_argmax_cuda); }

}  // namespace attnfx
