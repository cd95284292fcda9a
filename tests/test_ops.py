"""attnfx::attention as a torch.library op: opcheck (schema, fake, autograd registration, AOT
dispatch) on both implementations, and outputs and gradients against the reference."""
import pytest
import torch

from _tol import TOL
from attnfx.errors import InvalidArgumentError, ShapeMismatchError
from attnfx.ops import reference
from attnfx.ops.attention import fused_attention, set_attention_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["reference", "triton"]


@pytest.fixture(params=IMPLS)
def impl(request):
    set_attention_backend(request.param)
    yield request.param
    set_attention_backend(None)


def _args(dtype=torch.float32, causal=True, extras=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 19, 16, generator=g)
    k, v = torch.randn(2, 2, 19, 16, generator=g), torch.randn(2, 2, 19, 16, generator=g)
    key_mask = torch.ones(2, 19, dtype=torch.bool)
    key_mask[1, :4] = False
    head_scale = torch.tensor([1.0, 0.0, 2.5, -1.0])
    directions = torch.randn(4, 16, 3, generator=g) if extras else None
    spans = torch.tensor([[0, 1], [5, 19]]) if extras else None
    dev = lambda t: None if t is None else t.to(DEVICE)               # noqa: E731
    return [dev(q).to(dtype), dev(k).to(dtype), dev(v).to(dtype), dev(key_mask), dev(head_scale),
            dev(directions), dev(spans), causal, 0.25, False]


@pytest.mark.parametrize("extras", [True, False])
def test_opcheck(impl, extras):
    args = _args(extras=extras)
    for i in (0, 1, 2):
        args[i].requires_grad_()
    if extras:
        args[5].requires_grad_()
    torch.library.opcheck(torch.ops.attnfx.attention.default, tuple(args))


def test_opcheck_with_strided_inputs(impl):
    """q, k, v as transposed views of [b, t, heads, d] (how HF models call attention)."""
    args = _args(extras=False)
    for i in (0, 1, 2):
        args[i] = args[i].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    torch.library.opcheck(torch.ops.attnfx.attention.default, tuple(args))


def test_outputs_and_gradients_match_the_reference(impl):
    args = _args()
    leaves = [args[i].clone().requires_grad_() for i in (0, 1, 2, 5)]
    o, lse, readout, mass = torch.ops.attnfx.attention(*leaves[:3], args[3], args[4], leaves[3], *args[6:])
    kw = dict(causal=True, key_mask=args[3], sm_scale=0.25, head_scale=args[4], spans=args[6])
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    want = reference.attention(*ref_leaves[:3], directions=ref_leaves[3], **kw)
    for got, name in ((o, "o"), (lse, "lse"), (readout, "readout"), (mass, "mass")):
        finite = want[name].isfinite()
        torch.testing.assert_close(got[finite], want[name][finite], rtol=TOL[torch.float32], atol=TOL[torch.float32])
    g = torch.Generator().manual_seed(1)
    go, gr = torch.randn(o.shape, generator=g).to(DEVICE), torch.randn(readout.shape, generator=g).to(DEVICE)
    got = torch.autograd.grad((o * go).sum() + (readout * gr).sum(), leaves)
    want_g = torch.autograd.grad((want["o"] * go).sum() + (want["readout"] * gr).sum(), ref_leaves)
    for a, b, name in zip(got, want_g, ("dq", "dk", "dv", "d directions")):
        torch.testing.assert_close(a, b, rtol=TOL[torch.float32], atol=TOL[torch.float32], msg=name)


def test_lrp_mode_scales_the_gradients(impl):
    args = _args(extras=False)
    grads = {}
    for lrp in (False, True):
        leaves = [args[i].clone().requires_grad_() for i in (0, 1, 2)]
        o = fused_attention(*leaves, causal=True, key_mask=args[3], sm_scale=0.25, head_scale=args[4], lrp=lrp)[0]
        grads[lrp] = torch.autograd.grad(o.sum(), leaves)
    for plain, lrp, factor in zip(grads[False], grads[True], (0.25, 0.25, 0.5)):
        torch.testing.assert_close(lrp, plain * factor, rtol=1e-6, atol=1e-7)


def test_backend_choice_is_checked():
    with pytest.raises(InvalidArgumentError, match="triton"):
        set_attention_backend("cuda")


def test_reference_backward_is_the_autograd_of_the_reference():
    """The written-out reference backward (used inside the op) against torch autograd."""
    args = _args(extras=False)
    q, k, v, key_mask = args[:4]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    z = reference.attention(*leaves, causal=True, key_mask=key_mask, sm_scale=0.25)["o"]
    g = torch.randn_like(z)
    want = torch.autograd.grad(z, leaves, g)
    got = reference.attention_backward(g, *leaves, causal=True, key_mask=key_mask, sm_scale=0.25)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.__setitem__(2, a[2][:, :, :5]), ShapeMismatchError, "one shape"),
    (lambda a: a.__setitem__(0, a[0][:, :3]), ShapeMismatchError, "multiple"),
    (lambda a: a.__setitem__(3, a[3][:, :5]), ShapeMismatchError, "key_mask"),
    (lambda a: a.__setitem__(4, a[4][:2]), ShapeMismatchError, "head_scale"),
    (lambda a: a.__setitem__(5, a[5][:, :8]), ShapeMismatchError, "directions"),
    (lambda a: a.__setitem__(6, a[6][:, :1]), ShapeMismatchError, "spans"),
])
def test_bad_inputs_raise_typed_errors(change, error, match):
    args = _args()
    change(args)
    with pytest.raises(error, match=match):
        torch.ops.attnfx.attention(*args)


_TRACE_UNDER_AOT = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._functorch.aot_autograd import aot_function
import attnfx.ops.attention

def f(q, k, v, g, lse):
    o = torch.ops.attnfx.attention(q, k, v, None, None, None, None, True, 0.25, False)[0]
    return o, torch.ops.attnfx.attention_backward(g, q, k, v, o, lse, None, lse, True, 0.25, True)

def show(gm, _):
    print("GRAPH", gm.code, flush=True)
    raise SystemExit(0)                  # traced: nothing to run (no GPU here)

with FakeTensorMode():
    q, k, v, g = (torch.empty(1, 2, 64, 16, device="{device}", dtype=torch.float16) for _ in range(4))
    aot_function(f, fw_compiler=show)(q, k, v, g, torch.empty(1, 2, 64, device="{device}"))
"""


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_aot_autograd_sees_the_triton_kernels_on_cuda_only(device):
    """On CUDA the triton_ops decompose into wrap_triton kernel nodes (Inductor compiles them);
    on CPU they stay one opaque node each. Traced with fake CUDA tensors, so no GPU is needed;
    in a subprocess, because this process runs Triton's interpreter."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _TRACE_UNDER_AOT.replace("{device}", device)],
                          capture_output=True, text=True, env=env, timeout=300)
    graph = done.stdout.partition("GRAPH")[2]
    assert done.returncode == 0 and graph, done.stderr[-2000:]
    kernels = graph.count("triton_kernel_wrapper_functional(")
    opaque = graph.count("torch.ops.attnfx.attention")
    assert (kernels, opaque) == ((3, 0) if device == "cuda" else (0, 2))
