// AttnLRP's rules as local Jacobians (Achtibat et al. 2024, "AttnLRP", §3; docs/design.md §3), on CPU.
//   lrp_act:        y = f(x) (ATen's own f);  backward  grad_x = grad · f(x) / (x + ε·sign(x)),
//                   sign(0) = +1 (the identity rule with a sign-aware ε; f recomputed from x).
//   lrp_layer_norm: y = LayerNorm(x);  backward with σ = √(var(x) + eps) held constant:
//                   grad_x = (g·w − mean(g·w)) / σ,  grad_w = Σ g·x̂,  grad_b = Σ g.
//   lrp_rms_norm:   y = RMSNorm(x);    backward with rms = √(mean(x²) + eps) held constant:
//                   grad_x = g·w / rms,  grad_w = Σ g·x / rms.
// Math in opmath (fp32 for fp16/bf16); results in the input's (weight's) dtype.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/rms_norm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>

#include <cmath>

namespace attnfx {

void check_lrp_norm(const Tensor& x, const std::optional<Tensor>& weight, const char* op, const Tensor* grad) {
  check_floating(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": expected x [..., d] (at least 1 dim), received a scalar");
  if (grad != nullptr) {
    TORCH_CHECK(grad->sizes() == x.sizes(), op, ": expected grad of x's shape ", x.sizes(), ", received ",
                grad->sizes());
  }
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(-1), op, ": expected weight [d] = [", x.size(-1),
                "], received ", weight->sizes());
    check_same_device(x, *weight, op, "weight");
  }
}

// ---- lrp_act ------------------------------------------------------------------------------

static Tensor act_forward(const Tensor& x, Act act) {
  switch (act) {
    case Act::Gelu: return at::gelu(x);
    case Act::GeluTanh: return at::gelu(x, "tanh");
    case Act::Silu: return at::silu(x);
    case Act::Tanh: return at::tanh(x);
    case Act::Relu: return at::relu(x);
  }
  TORCH_CHECK(false, "lrp_act: unhandled activation");
}

static Tensor lrp_act_fwd(const Tensor& x, c10::string_view act, double eps) {
  check_floating(x, "lrp_act", "x");
  return act_forward(x, parse_act(std::string(act)));
}

// Elements per parallel chunk of the rule's elementwise pass.
constexpr int64_t kGrainElements = 1 << 14;

// f(x) comes from ATen's vectorised kernel in opmath, in one call made outside the parallel region
// (ATen ops called inside at::parallel_for stalled for up to 1 s at 2 threads on the busy 2-core
// CPU; see readout.cpp); stabilising, dividing, multiplying and casting are one fused pass.
static Tensor lrp_act_backward_cpu(const Tensor& grad, const Tensor& x, c10::string_view act_name, double eps) {
  const Act act = check_act_backward(grad, x, act_name);
  const Tensor xc = x.contiguous(), gc = grad.contiguous();
  const Tensor f = act == Act::Relu ? Tensor() : act_forward(xc.to(at::toOpMathType(x.scalar_type())), act).contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrp_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const acc_t* fp = f.defined() ? f.const_data_ptr<acc_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(eps);
    at::parallel_for(0, x.numel(), kGrainElements, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const acc_t xi = static_cast<acc_t>(xp[i]);
        const acc_t fi = fp != nullptr ? fp[i] : (xi > acc_t(0) ? xi : acc_t(0));
        op[i] = static_cast<scalar_t>(static_cast<acc_t>(gp[i]) * (fi / (xi + (xi >= acc_t(0) ? e : -e))));
      }
    });
  });
  return out;
}

// ---- lrp_layer_norm, lrp_rms_norm -----------------------------------------------------------

static Tensor lrp_layer_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                 const std::optional<Tensor>& bias, double eps) {
  check_lrp_norm(x, weight, "lrp_layer_norm");
  return at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
}

static Tensor lrp_rms_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight, double eps) {
  check_lrp_norm(x, weight, "lrp_rms_norm");
  return at::rms_norm(x, {x.size(-1)}, weight, eps);
}

// Per-thread partial sums of the weight/bias gradients ([threads, 2, d], opmath), summed at the end.
template <typename acc_t>
struct ColumnSums {
  std::vector<acc_t> data;
  int64_t d;
  ColumnSums(int64_t d) : data(static_cast<size_t>(at::get_num_threads()) * 2 * d, acc_t(0)), d(d) {}
  acc_t* mine(int which) { return data.data() + (at::get_thread_num() * 2 + which) * d; }
  Tensor total(int which, const Tensor& like, at::ScalarType dtype) const {
    Tensor out = at::zeros({d}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* o = out.mutable_data_ptr<acc_t>();
    for (size_t t = 0; t < data.size() / (2 * d); ++t)
      for (int64_t e = 0; e < d; ++e) o[e] += data[(t * 2 + which) * d + e];
    return out.to(dtype);
  }
};

template <typename scalar_t, bool kLayerNorm>
static void norm_backward_rows(const scalar_t* g, const scalar_t* x, const at::opmath_type<scalar_t>* w, scalar_t* gx, int64_t rows,
                               int64_t d, double eps, ColumnSums<at::opmath_type<scalar_t>>& sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    acc_t* gw_sum = sums.mine(0);
    acc_t* gb_sum = sums.mine(1);
    for (int64_t r = lo; r < hi; ++r) {
      const scalar_t* xr = x + r * d;
      const scalar_t* gr = g + r * d;
      acc_t mean = 0, sq = 0, gw_mean = 0;
      if (kLayerNorm) {
        for (int64_t e = 0; e < d; ++e) mean += static_cast<acc_t>(xr[e]);
        mean /= d;
      }
      for (int64_t e = 0; e < d; ++e) {
        const acc_t c = static_cast<acc_t>(xr[e]) - mean;
        sq += c * c;
        gw_mean += static_cast<acc_t>(gr[e]) * (w ? w[e] : acc_t(1));
      }
      const acc_t inv = acc_t(1) / std::sqrt(sq / d + static_cast<acc_t>(eps));   // 1/σ or 1/rms
      gw_mean = kLayerNorm ? gw_mean / d : acc_t(0);
      for (int64_t e = 0; e < d; ++e) {
        const acc_t ge = static_cast<acc_t>(gr[e]), xhat = (static_cast<acc_t>(xr[e]) - mean) * inv;
        gx[r * d + e] = static_cast<scalar_t>((ge * (w ? w[e] : acc_t(1)) - gw_mean) * inv);
        gw_sum[e] += ge * xhat;
        gb_sum[e] += ge;
      }
    }
  });
}

static std::vector<Tensor> norm_backward_cpu(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& weight,
                                             double eps, bool layer_norm) {
  check_lrp_norm(x, weight, layer_norm ? "lrp_layer_norm_backward" : "lrp_rms_norm_backward", &grad);
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  const Tensor xc = x.contiguous(), gc = grad.to(x.scalar_type()).contiguous();
  const at::ScalarType w_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  Tensor gx = at::empty(x.sizes(), x.options());
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrp_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // weight [d] in opmath whatever its dtype (bf16 activations with an fp32 weight are common)
    const Tensor wc = weight.has_value() ? weight->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : Tensor();
    ColumnSums<acc_t> sums(d);
    const auto rows_fn = layer_norm ? norm_backward_rows<scalar_t, true> : norm_backward_rows<scalar_t, false>;
    rows_fn(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), wc.defined() ? wc.const_data_ptr<acc_t>() : nullptr,
            gx.mutable_data_ptr<scalar_t>(), rows, d, eps, sums);
    out = {gx, sums.total(0, x, w_dtype), sums.total(1, x, w_dtype)};
  });
  return out;
}

// The forwards are ATen calls, valid on every device.
TORCH_LIBRARY_IMPL(attnfx_C, CompositeExplicitAutograd, m) {
  m.impl("lrp_act", &lrp_act_fwd);
  m.impl("lrp_layer_norm", &lrp_layer_norm_fwd);
  m.impl("lrp_rms_norm", &lrp_rms_norm_fwd);
}

TORCH_LIBRARY_IMPL(attnfx_C, CPU, m) {
  m.impl("lrp_act_backward", &lrp_act_backward_cpu);
  m.impl("lrp_layer_norm_backward", &layer_norm_backward<norm_backward_cpu>);
  m.impl("lrp_rms_norm_backward", &rms_norm_backward<norm_backward_cpu>);
}

}  // namespace attnfx
