// attnfx_C::attention_stats on CPU: per query row t of head h,
//   lse[b, h, t]     = log Σ_{j visible} exp(s_tj),     s_tj = (q_t · k_j) · sm_scale
//   mass[b, t, h, i] = Σ_{j ∈ [start_i, end_i), visible} exp(s_tj − lse)
// (attnfx.ops.reference.attention's "lse" and "mass"). Visible: key_mask[b, j] and, when causal,
// j ≤ t + S − T (bottom-right). A row with no visible key has lse = −inf and mass = 0.
// Blockwise over keys with an online softmax (Milakov & Gimelshein 2018): per tile of kBlockK keys
// a [b·H·T, kBlockK] block of scores and O(b·H·T·n) running state, never the T×S matrix. Scores
// come from at::bmm on fp32 (BLAS), as the reference's q.float() @ k.float()ᵀ does; causal tiles
// skip the rows that see none of their keys. GQA copies only each key tile per query head.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/bmm.h>

#include <cmath>
#include <limits>

namespace attnfx {

int64_t check_keys(const char* op, const Tensor& q, const Tensor& k, const std::optional<Tensor>& key_mask) {
  check_operands(op, {q, "q", 4, "[b, H, T, d]"}, {k, "k", 4, "[b, Hkv, S, d]"});
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": expected k of q's dtype ", q.scalar_type(), ", received ",
              k.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0, op,
              ": expected k [b, Hkv, S, d] with q's b and d and H a multiple of Hkv, received q ", q.sizes(),
              " and k ", k.sizes());
  const int64_t S = k.size(2);
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == q.size(0) &&
                    key_mask->size(1) == S,
                op, ": expected key_mask bool [b, S] = [", q.size(0), ", ", S, "], received ", key_mask->scalar_type(),
                " ", key_mask->sizes());
    check_same_device(q, *key_mask, op, "key_mask");
  }
  return S;
}

int64_t check_attention_stats(const Tensor& q, const Tensor& k, const std::optional<Tensor>& key_mask,
                              const std::optional<Tensor>& spans) {
  const char* op = "attention_stats";
  const int64_t S = check_keys(op, q, k, key_mask);
  if (spans.has_value()) {
    TORCH_CHECK(spans->scalar_type() == at::kLong && spans->dim() == 2 && spans->size(1) == 2, op,
                ": expected spans int64 [n, 2] (start, end), received ", spans->scalar_type(), " ", spans->sizes());
  }
  return S;
}

// Keys per tile: the score buffer is [b·H·T, 256] fp32, 4× q's size at d = 64 (the reference
// builds several [b, H, T, S]); 8 tiles at S = 2048 means 17 parallel regions in all.
constexpr int64_t kBlockK = 256;
constexpr int64_t kGrainRows = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct StatsProblem {
  Tensor q, k;                   // fp32 contiguous [b, H, T, d], [b, Hkv, S, d]
  const bool* key_mask;          // [b, S] or nullptr
  std::vector<int64_t> spans;    // [n, 2] flattened, on the host
  bool causal;
  float scale;
};

// Running state of every row (b, h, t): max m, Σ exp(s − m), and per span Σ exp(s − m).
struct RowState {
  std::vector<float> m, l, acc;
  RowState(int64_t rows, int64_t n) : m(rows, kNegInf), l(rows, 0.f), acc(rows * n, 0.f) {}
};

// One row of a score tile: rescale the state to the new max, then add the tile's exp terms.
static void update_row(float* s, int64_t len, int64_t j0, int64_t last, const bool* mask, const StatsProblem& p,
                       float* m, float* l, float* acc) {
  float tile_max = kNegInf;
  for (int64_t c = 0; c < len; ++c) {
    const int64_t j = j0 + c;
    const bool visible = j <= last && (mask == nullptr || mask[j]);
    s[c] = visible ? s[c] * p.scale : kNegInf;
    tile_max = std::max(tile_max, s[c]);
  }
  if (tile_max == kNegInf) return;
  const float m_new = std::max(*m, tile_max);
  const float rescale = std::exp(*m - m_new);       // exp(−inf) = 0 on a row's first visible tile
  const int64_t n = p.spans.size() / 2;
  *l *= rescale;
  for (int64_t i = 0; i < n; ++i) acc[i] *= rescale;
  for (int64_t c = 0; c < len; ++c) {
    s[c] = std::exp(s[c] - m_new);
    *l += s[c];
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lo = std::max(p.spans[2 * i] - j0, int64_t{0}), hi = std::min(p.spans[2 * i + 1] - j0, len);
    for (int64_t c = lo; c < hi; ++c) acc[i] += s[c];
  }
  *m = m_new;
}

// One key tile [j0, j0 + len) for every head: one at::bmm (BLAS, outside any parallel region: see
// readout.cpp) over the rows that see the tile, then all those rows' updates in one region.
static void stats_tile(const StatsProblem& p, int64_t j0, Tensor& scores, RowState& st) {
  const int64_t B = p.q.size(0), H = p.q.size(1), T = p.q.size(2), d = p.q.size(3);
  const int64_t Hkv = p.k.size(1), S = p.k.size(2), n = p.spans.size() / 2, len = std::min(kBlockK, S - j0);
  const int64_t first = p.causal ? std::max<int64_t>(0, j0 - (S - T)) : 0;     // first row that sees key j0
  const int64_t rows = T - first;
  Tensor q3 = p.q.view({B * H, T, d}).narrow(1, first, rows);
  Tensor k3 = p.k.narrow(2, j0, len).unsqueeze(2).expand({B, Hkv, H / Hkv, len, d}).reshape({B * H, len, d});
  Tensor out = scores.narrow(0, 0, B * H * rows * len).view({B * H, rows, len});
  at::bmm_out(out, q3, k3.transpose(1, 2));
  float* s = out.mutable_data_ptr<float>();
  at::parallel_for(0, B * H * rows, kGrainRows, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t bh = w / rows, t = first + w % rows, row = bh * T + t;
      const bool* mask = p.key_mask == nullptr ? nullptr : p.key_mask + (bh / H) * S;
      update_row(s + w * len, len, j0, p.causal ? t + S - T : S - 1, mask, p, &st.m[row], &st.l[row],
                 &st.acc[row * n]);
    }
  });
}

static std::tuple<Tensor, Tensor> attention_stats_cpu(const Tensor& q, const Tensor& k,
                                                      const std::optional<Tensor>& key_mask,
                                                      const std::optional<Tensor>& spans, bool causal,
                                                      double sm_scale) {
  check_attention_stats(q, k, key_mask, spans);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  Tensor mask = key_mask.has_value() ? key_mask->contiguous() : Tensor();
  StatsProblem p{q.to(at::kFloat).contiguous(), k.to(at::kFloat).contiguous(),
                 mask.defined() ? mask.const_data_ptr<bool>() : nullptr, {}, causal, static_cast<float>(sm_scale)};
  if (spans.has_value()) {
    Tensor sp = spans->to(at::kCPU).contiguous();
    p.spans.assign(sp.const_data_ptr<int64_t>(), sp.const_data_ptr<int64_t>() + sp.numel());
  }
  const int64_t n = p.spans.size() / 2;
  Tensor lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  Tensor mass = at::empty({B, T, H, n}, q.options().dtype(at::kFloat));
  Tensor scores = at::empty({B * H * T * kBlockK}, p.q.options());
  RowState st(B * H * T, n);
  const int64_t S = p.k.size(2);
  for (int64_t j0 = 0; j0 < S && (!causal || j0 - (S - T) < T); j0 += kBlockK) stats_tile(p, j0, scores, st);
  float* lse_p = lse.mutable_data_ptr<float>();
  float* mass_p = mass.mutable_data_ptr<float>();
  at::parallel_for(0, B * H * T, kGrainRows, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {                        // row = (b·H + h)·T + t
      const int64_t t = row % T, h = (row / T) % H, b = row / (T * H);
      const bool any = st.l[row] > 0.f;
      lse_p[row] = any ? st.m[row] + std::log(st.l[row]) : kNegInf;
      for (int64_t i = 0; i < n; ++i) mass_p[((b * T + t) * H + h) * n + i] = any ? st.acc[row * n + i] / st.l[row] : 0.f;
    }
  });
  return {lse, mass};
}

TORCH_LIBRARY_IMPL(attnfx_C, CPU, m) { m.impl("attention_stats", &attention_stats_cpu); }

}  // namespace attnfx
