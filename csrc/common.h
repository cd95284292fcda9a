// Shared by every op of attnfx._C: includes kept to per-operator headers (each TU that pulls in
// all of ATen costs about a minute on CI's 2 cores) and the input checks of the CPU and CUDA
// implementations, so both reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

namespace attnfx {

using at::Tensor;

inline void check_floating(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected ", name,
              " of a floating dtype (float16, bfloat16, float32, float64), received ", t.scalar_type());
}

inline void check_dim(const Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": expected ", name, " ", layout, " (", dim, " dims), received shape ",
              t.sizes());
}

inline void check_same_device(const Tensor& a, const Tensor& b, const char* op, const char* name) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected ", name, " on ", a.device(), ", received ", b.device());
}

// The two main inputs of an op: their ranks and layouts, floating dtypes, one device.
struct Operand {
  const Tensor& t;
  const char* name;
  int64_t dim;
  const char* layout;
};

inline void check_operands(const char* op, const Operand& a, const Operand& b) {
  for (const Operand* x : {&a, &b}) {
    check_dim(x->t, x->dim, op, x->name, x->layout);
    check_floating(x->t, op, x->name);
  }
  check_same_device(a.t, b.t, op, b.name);
}

// The elementwise nonlinearities of the AttnLRP identity rule (lrp_rules.cpp, lrp_rules_cuda.cu).
enum class Act { Gelu, GeluTanh, Silu, Tanh, Relu };

inline Act parse_act(const std::string& act) {
  if (act == "gelu") return Act::Gelu;
  if (act == "gelu_tanh") return Act::GeluTanh;
  if (act == "silu") return Act::Silu;
  if (act == "tanh") return Act::Tanh;
  TORCH_CHECK(act == "relu", "lrp_act: expected act in {gelu, gelu_tanh, silu, tanh, relu}, received '", act, "'");
  return Act::Relu;
}

// lrp_act_backward's inputs on either device; returns the parsed activation.
inline Act check_act_backward(const Tensor& grad, const Tensor& x, c10::string_view act) {
  const char* op = "lrp_act_backward";
  check_floating(x, op, "x");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), op,
              ": expected grad of x's shape and dtype ", x.sizes(), " ", x.scalar_type(), ", received ", grad.sizes(),
              " ", grad.scalar_type());
  return parse_act(std::string(act));
}

// head_readout and head_contrib are one computation: rows of z times a per-head matrix
// u [n_heads, d, K] (fp32). `positions` and `heads` pick the rows; readout takes them all.
struct RowsTimesHeads {
  Tensor z;                        // [b, t, H, d], any strides
  std::vector<int64_t> positions;  // P entries in [0, t)
  std::vector<int64_t> heads;      // n entries in [0, H); u's first dim follows this order
  Tensor u;                        // [n, d, K] fp32 contiguous
};

// Both defined in readout.cpp; the CPU and CUDA kernels solve them.
RowsTimesHeads readout_problem(const Tensor& z, const Tensor& u);
RowsTimesHeads contrib_problem(const Tensor& z, const Tensor& w_o, at::IntArrayRef heads,
                               at::OptionalIntArrayRef positions);

// The output [b, P, n, K] (fp32 for readouts, z's dtype for contributions), and
// kernel(scalar_t{}, out_ptr) called with z's element type and out's.
template <typename Kernel>
Tensor run_rows_times_heads(const RowsTimesHeads& p, at::ScalarType out_dtype, const Kernel& kernel) {
  Tensor out = at::empty({p.z.size(0), static_cast<int64_t>(p.positions.size()), static_cast<int64_t>(p.heads.size()),
                          p.u.size(2)}, p.z.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.z.scalar_type(), "rows_times_heads", [&] {
    if (out_dtype == at::kFloat) {
      kernel(scalar_t{}, out.mutable_data_ptr<float>());
    } else {
      kernel(scalar_t{}, out.mutable_data_ptr<scalar_t>());
    }
  });
  return out;
}

// The attention-row statistics' shared check (attention_stats.cpp; attention_argmax uses it too):
// q [b, H, T, d], k [b, Hkv, S, d] of q's dtype, b and d, H a multiple of Hkv, key_mask bool [b, S].
// Returns S.
int64_t check_keys(const char* op, const Tensor& q, const Tensor& k, const std::optional<Tensor>& key_mask);
// Log-sum-exp and span mass of attention rows (attention_stats.cpp): shapes checked once for
// both devices. Returns S.
int64_t check_attention_stats(const Tensor& q, const Tensor& k, const std::optional<Tensor>& key_mask,
                              const std::optional<Tensor>& spans);

// The two ops on a device whose kernel is run(problem, out_dtype): readouts in fp32,
// contributions in z's dtype.
using RowsTimesHeadsKernel = Tensor (*)(const RowsTimesHeads& problem, at::ScalarType out_dtype);

template <RowsTimesHeadsKernel run>
Tensor head_readout(const Tensor& z, const Tensor& u) {
  return run(readout_problem(z, u), at::kFloat);
}

template <RowsTimesHeadsKernel run>
Tensor head_contrib(const Tensor& z, const Tensor& w_o, at::IntArrayRef heads, at::OptionalIntArrayRef positions) {
  return run(contrib_problem(z, w_o, heads, positions), z.scalar_type());
}

// The LRP forwards call ATen (bit-equal to torch.nn.functional) on any device (lrp_rules.cpp).
// grad, when given, must have x's shape.
void check_lrp_norm(const Tensor& x, const std::optional<Tensor>& weight, const char* op,
                    const Tensor* grad = nullptr);

// A device's norm backward, {grad_x, grad_w, grad_b}, as the two schemas' tuples.
using NormBackward = std::vector<Tensor> (*)(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& weight,
                                             double eps, bool layer_norm);

template <NormBackward impl>
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& grad, const Tensor& x,
                                                       const std::optional<Tensor>& weight, double eps) {
  auto r = impl(grad, x, weight, eps, true);
  return {r[0], r[1], r[2]};
}

template <NormBackward impl>
std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& weight,
                                             double eps) {
  auto r = impl(grad, x, weight, eps, false);
  return {r[0], r[1]};
}

}  // namespace attnfx
