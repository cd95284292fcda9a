// attnfx_C::attention_stats on CPU: per query row t of head h,
//   lse[b, h, t]     = log Σ_{j visible} exp(s_tj),     s_tj = (q_t · k_j) · sm_scale
//   mass[b, t, h, i] = Σ_{j ∈ [start_i, end_i), visible} exp(s_tj − lse)
// (attnfx.ops.reference.attention's "lse" and "mass"). Visible: key_mask[b, j] and, when causal,
// j ≤ t + S − T (bottom-right). A row with no visible key has lse = −inf and mass = 0.
// Blockwise over keys with an online softmax (Milakov & Gimelshein 2018): a thread holds one
// [kBlockQ, kBlockK] tile of scores, never the T×S matrix. Scores come from at::mm on fp32 tiles
// (BLAS), as the reference's q.float() @ k.float()ᵀ does. GQA reads kv head h / (H / Hkv).
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <cmath>
#include <limits>

namespace attnfx {

int64_t check_attention_stats(const Tensor& q, const Tensor& k, const std::optional<Tensor>& key_mask,
                              const std::optional<Tensor>& spans) {
  const char* op = "attention_stats";
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
  if (spans.has_value()) {
    TORCH_CHECK(spans->scalar_type() == at::kLong && spans->dim() == 2 && spans->size(1) == 2, op,
                ": expected spans int64 [n, 2] (start, end), received ", spans->scalar_type(), " ", spans->sizes());
  }
  return S;
}

// Tile sizes: a [64, 512] fp32 score tile is 128 KiB (fits L2) and each at::mm call does 64·512·d
// multiply-adds, enough that the op's dispatch cost (µs) is noise next to the BLAS work.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 512;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct StatsProblem {
  Tensor q, k;                   // fp32 contiguous [b, H, T, d], [b, Hkv, S, d]
  const bool* key_mask;          // [b, S] or nullptr
  std::vector<int64_t> spans;    // [n, 2] flattened, on the host
  bool causal;
  float scale;
};

// Running state of kBlockQ rows: max m, Σ exp(s − m), and Σ over each span of exp(s − m).
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

// One (batch, head, block of query rows): all key tiles, then the rows' lse and mass.
static void stats_block(const StatsProblem& p, int64_t b, int64_t h, int64_t t0, float* lse, float* mass) {
  const int64_t H = p.q.size(1), T = p.q.size(2), S = p.k.size(2), Hkv = p.k.size(1);
  const int64_t n = p.spans.size() / 2, rows = std::min(kBlockQ, T - t0);
  const Tensor q_tile = p.q[b][h].narrow(0, t0, rows);
  const Tensor k_head = p.k[b][h / (H / Hkv)];
  const bool* mask = p.key_mask == nullptr ? nullptr : p.key_mask + b * S;
  const int64_t last_key = p.causal ? t0 + rows - 1 + S - T : S - 1;   // of the block's last row
  Tensor scores = at::empty({rows, kBlockK}, q_tile.options());
  RowState st(rows, n);
  for (int64_t j0 = 0; j0 < S && j0 <= last_key; j0 += kBlockK) {
    const int64_t len = std::min(kBlockK, S - j0);
    Tensor tile = scores.narrow(1, 0, len);
    at::mm_out(tile, q_tile, k_head.narrow(0, j0, len).t());
    float* s = scores.mutable_data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t last = p.causal ? t0 + r + S - T : S - 1;
      update_row(s + r * kBlockK, len, j0, last, mask, p, &st.m[r], &st.l[r], &st.acc[r * n]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r;
    const bool any = st.l[r] > 0.f;
    lse[(b * H + h) * T + t] = any ? st.m[r] + std::log(st.l[r]) : kNegInf;
    for (int64_t i = 0; i < n; ++i) mass[((b * T + t) * H + h) * n + i] = any ? st.acc[r * n + i] / st.l[r] : 0.f;
  }
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
  const int64_t n = p.spans.size() / 2, q_blocks = (T + kBlockQ - 1) / kBlockQ;
  Tensor lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  Tensor mass = at::empty({B, T, H, n}, q.options().dtype(at::kFloat));
  float* lse_p = lse.mutable_data_ptr<float>();
  float* mass_p = mass.mutable_data_ptr<float>();
  at::parallel_for(0, B * H * q_blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      stats_block(p, w / (H * q_blocks), (w / q_blocks) % H, (w % q_blocks) * kBlockQ, lse_p, mass_p);
    }
  });
  return {lse, mass};
}

TORCH_LIBRARY_IMPL(attnfx_C, CPU, m) { m.impl("attention_stats", &attention_stats_cpu); }

}  // namespace attnfx
