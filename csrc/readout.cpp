// attnfx_C::head_readout and attnfx_C::head_contrib on CPU (DESIGN §2):
//   readout[b, t, h, k]   = Σ_e z[b, t, h, e] · u[h, e, k]                      fp32
//   contrib[b, p, i, m]   = Σ_e z[b, pos_p, h_i, e] · W_O[m, h_i·d + e]          z's dtype
// Both are "rows of z times a per-head [d, K] matrix" with fp32 accumulation (contrib's matrix is
// W_O's column block of head h_i, transposed), computed as BLAS products of blocks of rows.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
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

// Rows per BLAS call: a block of z rows of about 256 KiB (1024 rows at d = 64) times u[i] [d, K]:
// large enough that at::mm's per-call cost (µs) is small next to the product even at K = 8.
constexpr int64_t kBlockFloats = 1 << 16;

static int64_t block_rows(int64_t d) { return std::clamp<int64_t>(kBlockFloats / std::max<int64_t>(d, 1), 64, 4096); }

// One (head i, block of rows): gather the z rows as fp32, one at::mm (BLAS) against u[i], then
// write the block into out[b, p, i, :] in the output dtype.
template <typename scalar_t, typename out_t>
static void rows_times_head_block(const RowsTimesHeads& p, int64_t i, int64_t r0, int64_t rows, Tensor& zbuf,
                                  Tensor& obuf, out_t* out) {
  const int64_t P = p.positions.size(), n = p.heads.size(), d = p.z.size(3), K = p.u.size(2);
  const scalar_t* z = p.z.const_data_ptr<scalar_t>();
  const auto sz = p.z.strides();
  float* zb = zbuf.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {                      // r0 + r = b·P + p
    const int64_t b = (r0 + r) / P, pi = (r0 + r) % P;
    const scalar_t* src = z + b * sz[0] + p.positions[pi] * sz[1] + p.heads[i] * sz[2];
    for (int64_t e = 0; e < d; ++e) zb[r * d + e] = static_cast<float>(src[e * sz[3]]);
  }
  Tensor o = obuf.narrow(0, 0, rows);
  at::mm_out(o, zbuf.narrow(0, 0, rows), p.u[i]);
  const float* ob = obuf.const_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    out_t* dst = out + ((r0 + r) * n + i) * K;
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<out_t>(ob[r * K + k]);
  }
}

template <typename scalar_t, typename out_t>
static void rows_times_heads_cpu(const RowsTimesHeads& p, out_t* out) {
  const int64_t n = p.heads.size(), d = p.z.size(3), K = p.u.size(2);
  const int64_t rows = p.z.size(0) * static_cast<int64_t>(p.positions.size());
  const int64_t block = block_rows(d), blocks = (rows + block - 1) / block;
  const auto opts = p.u.options();
  at::parallel_for(0, n * blocks, 1, [&](int64_t lo, int64_t hi) {
    Tensor zbuf = at::empty({block, d}, opts), obuf = at::empty({block, K}, opts);
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t r0 = (w % blocks) * block;
      rows_times_head_block<scalar_t, out_t>(p, w / blocks, r0, std::min(block, rows - r0), zbuf, obuf, out);
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
