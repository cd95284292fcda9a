// attnfx_C::attention_stats on CUDA (definitions in attention_stats.cpp). One warp per query row,
// two passes over its visible keys, O(1) state per lane:
//   1. an online max / Σexp over the keys, lane i holding key first + i of each 32-key tile,
//      merged across the warp → lse;
//   2. for each span, Σ exp(s − lse) over the span's visible keys (scores recomputed).
// Pass 2 only touches keys inside spans. The q row is staged in shared memory as fp32. A tile's
// scores are computed by the whole warp one key at a time (lane e reads elements e, e + 32, … of
// the key row: coalesced), then each lane keeps its key's score.
#include "cuda_utils.cuh"

#include <cmath>

namespace attnfx {

constexpr int kRowsPerBlock = 4;         // warps per block

struct StatsArgs {
  int64_t B, H, T, S, d, group, n;
  int64_t qs[4], ks[4];
  bool causal;
  float scale;
};

// The scores of keys first … first + 31 (up to end), lane i receiving key first + i's (−inf past
// end). `first` and `end` are the same on every lane, so every lane reaches each warp_sum.
template <typename scalar_t>
__device__ inline float tile_scores(const float* qr, const scalar_t* kb, const StatsArgs& a, int64_t first,
                                    int64_t end, int lane) {
  float mine = -INFINITY;
  const int count = static_cast<int>(std::min<int64_t>(end - first, cuda::kWarp));
  for (int i = 0; i < count; ++i) {
    const scalar_t* kr = kb + (first + i) * a.ks[2];
    float part = 0.f;
    for (int64_t e = lane; e < a.d; e += cuda::kWarp) part += qr[e] * static_cast<float>(kr[e * a.ks[3]]);
    part = cuda::warp_sum(part);
    if (lane == i) mine = part * a.scale;
  }
  return mine;
}

template <typename scalar_t>
__global__ void attention_stats_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                       const bool* __restrict__ key_mask, const int64_t* __restrict__ spans,
                                       StatsArgs a, float* __restrict__ lse, float* __restrict__ mass) {
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
  for (int64_t first = 0; first < end; first += cuda::kWarp) {
    const float s = tile_scores(qr, kb, a, first, end, lane);
    const int64_t j = first + lane;
    if (j >= end || (mask != nullptr && !mask[j])) continue;       // after the tile: no warp_sum skipped
    if (s > m) {
      l = l * expf(m - s) + 1.f;
      m = s;
    } else {
      l += expf(s - m);
    }
  }
  for (int offset = cuda::kWarp / 2; offset > 0; offset >>= 1) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, offset), l_o = __shfl_xor_sync(0xffffffffu, l, offset);
    const float m_new = fmaxf(m, m_o);
    l = (l > 0.f ? l * expf(m - m_new) : 0.f) + (l_o > 0.f ? l_o * expf(m_o - m_new) : 0.f);
    m = m_new;
  }
  const float row_lse = l > 0.f ? m + logf(l) : -INFINITY;
  if (lane == 0) lse[(b * a.H + h) * a.T + t] = row_lse;
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t lo = std::max(spans[2 * i], int64_t{0}), hi = std::min(spans[2 * i + 1], end);
    float acc = 0.f;
    for (int64_t first = lo; l > 0.f && first < hi; first += cuda::kWarp) {     // l: the same on every lane
      const float s = tile_scores(qr, kb, a, first, hi, lane);
      const int64_t j = first + lane;
      if (j < hi && (mask == nullptr || mask[j])) acc += expf(s - row_lse);
    }
    acc = cuda::warp_sum(acc);
    if (lane == 0) mass[((b * a.T + t) * a.H + h) * a.n + i] = acc;
  }
}

static std::tuple<Tensor, Tensor> attention_stats_cuda(const Tensor& q, const Tensor& k,
                                                       const std::optional<Tensor>& key_mask,
                                                       const std::optional<Tensor>& spans, bool causal,
                                                       double sm_scale) {
  const int64_t S = check_attention_stats(q, k, key_mask, spans);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  const Tensor mask = key_mask.has_value() ? key_mask->contiguous() : Tensor();
  const Tensor sp = spans.has_value() ? spans->to(q.device()).contiguous() : Tensor();
  const int64_t n = sp.defined() ? sp.size(0) : 0;
  StatsArgs a{B, H, T, S, d, H / k.size(1), n, {}, {}, causal, static_cast<float>(sm_scale)};
  for (int i = 0; i < 4; ++i) {
    a.qs[i] = q.stride(i);
    a.ks[i] = k.stride(i);
  }
  Tensor lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  Tensor mass = at::empty({B, T, H, n}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {lse, mass};
  TORCH_CHECK(kRowsPerBlock * d * sizeof(float) <= 48 * 1024, "attention_stats on CUDA: expected head dim <= ",
              48 * 1024 / (kRowsPerBlock * sizeof(float)), ", received ", d);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_stats_cuda", [&] {
    attention_stats_kernel<<<cuda::blocks_for(B * H * T, kRowsPerBlock), kRowsPerBlock * cuda::kWarp,
                             kRowsPerBlock * d * sizeof(float), stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
        mask.defined() ? mask.const_data_ptr<bool>() : nullptr, n ? sp.const_data_ptr<int64_t>() : nullptr, a,
        lse.mutable_data_ptr<float>(), mass.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lse, mass};
}

TORCH_LIBRARY_IMPL(attnfx_C, CUDA, m) { m.impl("attention_stats", &attention_stats_cuda); }

}  // namespace attnfx
