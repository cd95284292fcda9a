// The schemas of attnfx._C, in one place. Kernels: readout, attention_stats, lrp_rules (.cpp for
// CPU, _cuda.cu for CUDA). Python wraps each in an `attnfx::` custom op (src/attnfx/ops/) that holds
// the reference, the fake, the autograd formula and the backend choice; these raw ops are what
// the "cpp" backend calls.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(attnfx_C, m) {
  m.def("head_readout(Tensor z, Tensor u) -> Tensor");
  m.def("head_contrib(Tensor z, Tensor w_o, int[] heads, int[]? positions) -> Tensor");
  m.def("attention_stats(Tensor q, Tensor k, Tensor? key_mask, Tensor? spans, bool causal, float sm_scale)"
        " -> (Tensor lse, Tensor mass)");
  m.def("attention_argmax(Tensor q, Tensor k, Tensor? key_mask, bool causal, float sm_scale)"
        " -> (Tensor index, Tensor max_prob)");
  m.def("lrp_act(Tensor x, str act, float eps) -> Tensor");
  m.def("lrp_act_backward(Tensor grad, Tensor x, str act, float eps) -> Tensor");
  m.def("lrp_layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def("lrp_layer_norm_backward(Tensor grad, Tensor x, Tensor? weight, float eps)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("lrp_rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor");
  m.def("lrp_rms_norm_backward(Tensor grad, Tensor x, Tensor? weight, float eps)"
        " -> (Tensor grad_x, Tensor grad_weight)");
}

// `import attnfx._C` loads the library above; the module itself is empty. Plain CPython API
// instead of pybind11: nothing is bound, and pybind11's headers would double this TU's compile.
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "attnfx's C++/CUDA ops (torch.ops.attnfx_C)", -1,
                             nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
