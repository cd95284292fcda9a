// Shared by every op of attnfx._C: includes kept to per-operator headers (each TU that pulls in
// all of ATen costs about a minute on CI's 2 cores) and the input checks of the CPU and CUDA
// implementations, so both reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
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

// The elementwise nonlinearities of the AttnLRP identity rule (lrp_rules.cpp, lrp_rules.cu).
enum class Act { Gelu, GeluTanh, Silu, Tanh, Relu };

inline Act parse_act(const std::string& act) {
  if (act == "gelu") return Act::Gelu;
  if (act == "gelu_tanh") return Act::GeluTanh;
  if (act == "silu") return Act::Silu;
  if (act == "tanh") return Act::Tanh;
  TORCH_CHECK(act == "relu", "lrp_act: expected act in {gelu, gelu_tanh, silu, tanh, relu}, received '", act, "'");
  return Act::Relu;
}

// head_readout and head_contrib are one computation: rows of z times a per-head matrix
// u [n_heads, d, K] (fp32). `positions` and `heads` pick the rows; readout takes them all.
struct RowsTimesHeads {
  Tensor z;                        // [b, t, H, d], any strides
  std::vector<int64_t> positions;  // P entries in [0, t)
  std::vector<int64_t> heads;      // n entries in [0, H); u's first dim follows this order
  Tensor u;                        // [n, d, K] fp32 contiguous
};

// Both return [b, P, n, K] of `out_dtype`; defined in readout.cpp (CPU) and readout.cu (CUDA).
RowsTimesHeads readout_problem(const Tensor& z, const Tensor& u);
RowsTimesHeads contrib_problem(const Tensor& z, const Tensor& w_o, at::IntArrayRef heads,
                               at::OptionalIntArrayRef positions);

// Log-sum-exp and span mass of attention rows (attention_stats.cpp): shapes checked once for
// both devices. Returns S.
int64_t check_attention_stats(const Tensor& q, const Tensor& k, const std::optional<Tensor>& key_mask,
                              const std::optional<Tensor>& spans);

// The LRP forwards call ATen (bit-equal to torch.nn.functional) on any device (lrp_rules.cpp).
void check_lrp_norm(const Tensor& x, const std::optional<Tensor>& weight, const char* op);

}  // namespace attnfx
