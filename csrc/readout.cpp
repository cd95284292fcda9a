// attnfx_C::head_readout and attnfx_C::head_contrib on CPU (DESIGN §2):
//   readout[b, t, h, k]   = Σ_e z[b, t, h, e] · u[h, e, k]                      fp32
//   contrib[b, p, i, m]   = Σ_e z[b, pos_p, h_i, e] · W_O[m, h_i·d + e]          z's dtype
// Both are "rows of z times a per-head [d, K] matrix" with fp32 accumulation; contrib's matrix
// is W_O's column block of head h_i, transposed.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>

namespace attnfx {

RowsTimesHeads readout_problem(const Tensor& z, const Tensor& u) {
  const char* op = "head_readout";
  check_dim(z, 4, op, "z", "[b, t, H, d]");
  check_dim(u, 3, op, "u", "[H, d, K]");
  check_floating(z, op, "z");
  check_floating(u, op, "u");
  check_same_device(z, u, op, "u");
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
  check_dim(z, 4, op, "z", "[b, t, H, d]");
  check_dim(w_o, 2, op, "w_o", "[d_model, H*d]");
  check_floating(z, op, "z");
  check_floating(w_o, op, "w_o");
  check_same_device(z, w_o, op, "w_o");
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

// Work per parallel chunk: about this many multiply-adds before a thread is worth waking.
constexpr int64_t kGrainMacs = 1 << 15;

template <typename scalar_t, typename out_t>
static void rows_times_heads_cpu(const RowsTimesHeads& p, out_t* out) {
  const int64_t P = p.positions.size(), n = p.heads.size();
  const int64_t d = p.z.size(3), K = p.u.size(2), rows = p.z.size(0) * P * n;
  const scalar_t* z = p.z.const_data_ptr<scalar_t>();
  const float* u = p.u.const_data_ptr<float>();
  const auto sz = p.z.strides();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, d * K)), [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(K);
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t i = row % n, pi = (row / n) % P, b = row / (n * P);
      const scalar_t* zr = z + b * sz[0] + p.positions[pi] * sz[1] + p.heads[i] * sz[2];
      const float* ui = u + i * d * K;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t e = 0; e < d; ++e) {        // k innermost: K independent sums that vectorise
        const float ze = static_cast<float>(zr[e * sz[3]]);
        const float* ue = ui + e * K;
        for (int64_t k = 0; k < K; ++k) acc[k] += ze * ue[k];
      }
      for (int64_t k = 0; k < K; ++k) out[row * K + k] = static_cast<out_t>(acc[k]);
    }
  });
}

static Tensor run_cpu(const RowsTimesHeads& p, at::ScalarType out_dtype) {
  auto out = at::empty({p.z.size(0), (int64_t)p.positions.size(), (int64_t)p.heads.size(), p.u.size(2)},
                       p.z.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.z.scalar_type(), "rows_times_heads_cpu", [&] {
    if (out_dtype == at::kFloat) {
      rows_times_heads_cpu<scalar_t, float>(p, out.mutable_data_ptr<float>());
    } else {
      rows_times_heads_cpu<scalar_t, scalar_t>(p, out.mutable_data_ptr<scalar_t>());
    }
  });
  return out;
}

static Tensor head_readout_cpu(const Tensor& z, const Tensor& u) {
  return run_cpu(readout_problem(z, u), at::kFloat);
}

static Tensor head_contrib_cpu(const Tensor& z, const Tensor& w_o, at::IntArrayRef heads,
                               at::OptionalIntArrayRef positions) {
  return run_cpu(contrib_problem(z, w_o, heads, positions), z.scalar_type());
}

TORCH_LIBRARY_IMPL(attnfx_C, CPU, m) {
  m.impl("head_readout", &head_readout_cpu);
  m.impl("head_contrib", &head_contrib_cpu);
}

}  // namespace attnfx
