// attnfx_C::head_readout and attnfx_C::head_contrib on CPU (docs/design.md §2):
//   readout[b, t, h, k]   = Σ_e z[b, t, h, e] · u[h, e, k]                      fp32
//   contrib[b, p, i, m]   = Σ_e z[b, pos_p, h_i, e] · W_O[m, h_i·d + e]          z's dtype
// Both are "rows of z times a per-head [d, K] matrix" with fp32 accumulation (contrib's matrix is
// W_O's column block of head h_i, transposed), computed as one batched BLAS product.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/stack.h>

namespace attnfx {

RowsTimesHeads readout_problem(const Tensor& z, const Tensor& u) {
  const char* op = "head_readout";
  check_operands(op, {z, "z", 4, "[b, t, H, d]"}, {u, "u", 3, "[H, d, K]"});
  TORCH_CHECK(u.size(0) == z.size(2) && u.size(1) == z.size(3), op, ": expected u [H, d, K] = [", z.size(2), ", ",
              z.size(3), ", K] for z ", z.sizes(), ", received ", u.sizes());
  RowsTimesHeads p{z, {}, {}, u.to(at::kFloat).contiguous()};
  for (int64_t t = 0; t < z.size(1); ++t) p.positions.push_back(t);
  for (int64_t h = 0; h < z.size(2); ++h) p.heads.push_back(h);
  return p;
}

static std::vector<int64_t> checked_indices(at::IntArrayRef idx, int64_t bound, const char* what) {
  for (int64_t i : idx) {
    TORCH_CHECK(i >= 0 && i < bound, "head_contrib: expected ", what, " in [0, ", bound, "), received ", i);
  }
  return idx.vec();
}

RowsTimesHeads contrib_problem(const Tensor& z, const Tensor& w_o, at::IntArrayRef heads,
                               at::OptionalIntArrayRef positions) {
  const char* op = "head_contrib";
  check_operands(op, {z, "z", 4, "[b, t, H, d]"}, {w_o, "w_o", 2, "[d_model, H*d]"});
  const int64_t H = z.size(2), d = z.size(3);
  TORCH_CHECK(w_o.size(1) == H * d, op, ": expected w_o [d_model, H*d] with H*d = ", H * d, ", received ",
              w_o.sizes());
  RowsTimesHeads p{z, {}, checked_indices(heads, H, "heads"), Tensor()};
  if (positions.has_value()) {
    p.positions = checked_indices(*positions, z.size(1), "positions");
  } else {
    for (int64_t t = 0; t < z.size(1); ++t) p.positions.push_back(t);
  }
  // u[i] = W_O[:, h_i·d : (h_i+1)·d]ᵀ: [n, d, d_model], so the inner loop runs over d_model.
  auto blocks = w_o.view({w_o.size(0), H, d}).permute({1, 2, 0});
  std::vector<Tensor> picked;
  for (int64_t h : p.heads) picked.push_back(blocks[h]);
  p.u = picked.empty() ? at::empty({0, d, w_o.size(0)}, w_o.options().dtype(at::kFloat))
                       : at::stack(picked).to(at::kFloat).contiguous();
  return p;
}

// Rows per parallel chunk when gathering z rows / scattering outputs.
constexpr int64_t kGrainRows = 64;

// Gather the picked z rows as fp32 [n, b·P, d], one at::bmm (BLAS) against u [n, d, K], scatter
// into out [b, P, n, K]: three parallel regions in all, and BLAS outside any of them. (Per-head
// products inside at::parallel_for, or one region per head, stalled 0.1-1 s per call at 2 threads
// on a busy 2-core CPU: every OpenMP barrier waits for a descheduled thread. Torch 2.13 CPU wheel.)
template <typename scalar_t, typename out_t>
static void rows_times_heads_cpu(const RowsTimesHeads& p, out_t* out) {
  const int64_t P = p.positions.size(), n = p.heads.size(), d = p.z.size(3), K = p.u.size(2);
  const int64_t rows = p.z.size(0) * P;
  const scalar_t* z = p.z.const_data_ptr<scalar_t>();
  const auto sz = p.z.strides();
  Tensor zbuf = at::empty({n, rows, d}, p.u.options());
  float* zb = zbuf.mutable_data_ptr<float>();
  at::parallel_for(0, n * rows, kGrainRows, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {                      // w = i·rows + b·P + p
      const int64_t i = w / rows, r = w % rows;
      const scalar_t* src = z + (r / P) * sz[0] + p.positions[r % P] * sz[1] + p.heads[i] * sz[2];
      for (int64_t e = 0; e < d; ++e) zb[w * d + e] = static_cast<float>(src[e * sz[3]]);
    }
  });
  const Tensor obuf = at::bmm(zbuf, p.u);                    // [n, rows, K]
  const float* ob = obuf.const_data_ptr<float>();
  at::parallel_for(0, rows, kGrainRows, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t k = 0; k < K; ++k) out[(r * n + i) * K + k] = static_cast<out_t>(ob[(i * rows + r) * K + k]);
      }
    }
  });
}

static Tensor run_cpu(const RowsTimesHeads& p, at::ScalarType out_dtype) {
  return run_rows_times_heads(p, out_dtype, [&](auto z_type, auto* out) {
    rows_times_heads_cpu<decltype(z_type)>(p, out);
  });
}

TORCH_LIBRARY_IMPL(attnfx_C, CPU, m) {
  m.impl("head_readout", &head_readout<run_cpu>);
  m.impl("head_contrib", &head_contrib<run_cpu>);
}

}  // namespace attnfx
