// attnfx_C::attention_argmax on CPU: per query row t of head h, with s_tj = (q_t · k_j) · sm_scale
// over the visible keys j (key_mask[b, j] and, when causal, j ≤ t + S − T: bottom-right),
//   index[b, h, t]    = argmax_j s_tj           (the first on ties; −1 when no key is visible)
//   max_prob[b, h, t] = exp(s_max − lse) = 1 / Σ_j exp(s_tj − s_max)      (0 when none is)
// (attnfx.ops.reference.attention_argmax; retrieval heads, Wu et al. 2024). Blockwise over keys
// with an online softmax (Milakov & Gimelshein 2018) that also carries the running max's index:
// per tile of kBlockK keys a [b·H·T, kBlockK] block of scores and O(b·H·T) state, never the T×S
// matrix. Scores come from at::bmm on fp32, as in attention_stats.cpp; causal tiles skip the rows
// that see none of their keys. GQA copies only each key tile per query head.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>

namespace attnfx {

int64_t check_attention_argmax(const Tensor& q, const Tensor& k, const std::optional<Tensor>& key_mask) {
  return check_keys("attention_argmax", q, k, key_mask);
}

namespace {

// Keys per tile and rows per parallel chunk: attention_stats.cpp's (same score buffer, same reason).
constexpr int64_t kBlockK = 256;
constexpr int64_t kGrainRows = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct ArgmaxProblem {
  Tensor q, k;              // fp32 contiguous [b, H, T, d], [b, Hkv, S, d]
  const bool* key_mask;     // [b, S] or nullptr
  bool causal;
  float scale;
};

// Running state of every row (b, h, t): max m, its key index, Σ exp(s − m).
struct RowState {
  std::vector<float> m, l;
  std::vector<int64_t> index;
  explicit RowState(int64_t rows) : m(rows, kNegInf), l(rows, 0.f), index(rows, -1) {}
};

// One row of a score tile: the tile's first maximal visible key, then the rescaled running sum.
// A later tile replaces the index only on a strictly larger score: the first index wins ties.
void update_row(const float* raw, int64_t len, int64_t j0, int64_t last, const bool* mask, float scale,
                float* m, float* l, int64_t* index) {
  float tile_max = kNegInf;
  int64_t tile_index = -1;
  for (int64_t c = 0; c < len && j0 + c <= last; ++c) {
    const float s = raw[c] * scale;
    if ((mask == nullptr || mask[j0 + c]) && s > tile_max) {
      tile_max = s;
      tile_index = j0 + c;
    }
  }
  if (tile_index < 0) return;
  if (tile_max > *m) {
    *l *= std::exp(*m - tile_max);                 // exp(−inf) = 0 on a row's first visible tile
    *m = tile_max;
    *index = tile_index;
  }
  float sum = 0.f;
  for (int64_t c = 0; c < len && j0 + c <= last; ++c) {
    if (mask == nullptr || mask[j0 + c]) sum += std::exp(raw[c] * scale - *m);
  }
  *l += sum;
}

// One key tile [j0, j0 + len) for every head: one at::bmm outside any parallel region (see
// readout.cpp), then the updates of the rows that see the tile in one region.
void argmax_tile(const ArgmaxProblem& p, int64_t j0, Tensor& scores, RowState& st) {
  const int64_t B = p.q.size(0), H = p.q.size(1), T = p.q.size(2), d = p.q.size(3);
  const int64_t Hkv = p.k.size(1), S = p.k.size(2), len = std::min(kBlockK, S - j0);
  const int64_t first = p.causal ? std::max<int64_t>(0, j0 - (S - T)) : 0;     // first row that sees key j0
  const int64_t rows = T - first;
  Tensor q3 = p.q.view({B * H, T, d}).narrow(1, first, rows);
  Tensor k3 = p.k.narrow(2, j0, len).unsqueeze(2).expand({B, Hkv, H / Hkv, len, d}).reshape({B * H, len, d});
  Tensor out = scores.narrow(0, 0, B * H * rows * len).view({B * H, rows, len});
  at::bmm_out(out, q3, k3.transpose(1, 2));
  const float* s = out.const_data_ptr<float>();
  at::parallel_for(0, B * H * rows, kGrainRows, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t bh = w / rows, t = first + w % rows, row = bh * T + t;
      const bool* mask = p.key_mask == nullptr ? nullptr : p.key_mask + (bh / H) * S;
      update_row(s + w * len, len, j0, p.causal ? t + S - T : S - 1, mask, p.scale, &st.m[row], &st.l[row],
                 &st.index[row]);
    }
  });
}

std::tuple<Tensor, Tensor> attention_argmax_cpu(const Tensor& q, const Tensor& k,
                                                const std::optional<Tensor>& key_mask, bool causal,
                                                double sm_scale) {
  const int64_t S = check_attention_argmax(q, k, key_mask);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  Tensor mask = key_mask.has_value() ? key_mask->contiguous() : Tensor();
  ArgmaxProblem p{q.to(at::kFloat).contiguous(), k.to(at::kFloat).contiguous(),
                  mask.defined() ? mask.const_data_ptr<bool>() : nullptr, causal, static_cast<float>(sm_scale)};
  Tensor index = at::empty({B, H, T}, q.options().dtype(at::kLong));
  Tensor max_prob = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  Tensor scores = at::empty({B * H * T * kBlockK}, p.q.options());
  RowState st(B * H * T);
  for (int64_t j0 = 0; j0 < S && (!causal || j0 - (S - T) < T); j0 += kBlockK) argmax_tile(p, j0, scores, st);
  int64_t* index_p = index.mutable_data_ptr<int64_t>();
  float* prob_p = max_prob.mutable_data_ptr<float>();
  for (int64_t row = 0; row < B * H * T; ++row) {               // row = (b·H + h)·T + t
    index_p[row] = st.index[row];
    prob_p[row] = st.l[row] > 0.f ? 1.f / st.l[row] : 0.f;
  }
  return {index, max_prob};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfx_C, CPU, m) { m.impl("attention_argmax", &attention_argmax_cpu); }

}  // namespace attnfx
