"""attnfx::head_readout and attnfx::head_contrib: the C++ kernels against the reference (hypothesis
over shapes, dtypes, strides, picked heads and positions), opcheck on each implementation and on
the raw attnfx_C ops, autograd against the reference's, typed errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from _ops import CUDA, DTYPES, assert_matches, impl, run_with  # noqa: F401
from attnfx.errors import DTypeMismatchError, InvalidArgumentError, ShapeMismatchError, SiteIndexError
from attnfx.ops import _cpp, readout

readout_op, contrib_op = torch.ops.attnfx.head_readout, torch.ops.attnfx.head_contrib


def _z(b, t, H, d, dtype, transposed=False, device="cpu"):
    if transposed:                   # [b, H, t, d] storage viewed as [b, t, H, d], as attention emits z
        return torch.randn(b, H, t, d, device=device).to(dtype).transpose(1, 2)
    return torch.randn(b, t, H, d, device=device).to(dtype)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 5), st.integers(1, 17))


@settings(max_examples=25)
@given(shape=shapes, K=st.integers(0, 9), dtype=st.sampled_from(DTYPES), transposed=st.booleans())
def test_readout_cpp_matches_the_reference(shape, K, dtype, transposed):
    z = _z(*shape, dtype, transposed)
    u = torch.randn(shape[2], shape[3], K).to(dtype)
    got = run_with("cpp", readout_op, z, u)
    assert_matches(got, readout.readout_reference(z, u))          # fp32 out: fp32 tolerance


@settings(max_examples=25)
@given(shape=shapes, d_model=st.integers(1, 40), dtype=st.sampled_from(DTYPES), data=st.data())
def test_contrib_cpp_matches_the_reference(shape, d_model, dtype, data):
    b, t, H, d = shape
    heads = data.draw(st.lists(st.integers(0, H - 1), max_size=4))          # repeats and [] included
    positions = data.draw(st.none() | st.lists(st.integers(0, t - 1), max_size=5))
    z, w_o = _z(*shape, dtype, data.draw(st.booleans())), torch.randn(d_model, H * d).to(dtype)
    got = run_with("cpp", contrib_op, z, w_o, heads, positions)
    assert_matches(got, readout.contrib_reference(z, w_o, heads, positions))


def test_contrib_is_the_direct_definition():
    """contrib[:, p, i] = z[:, pos_p, h_i] @ W_O[:, h_i·d:(h_i+1)·d]ᵀ, written out, and Σ over all
    heads is the output projection of z (docs/design.md §6)."""
    z, w_o = _z(2, 6, 3, 4, torch.float32), torch.randn(10, 12)
    out = contrib_op(z, w_o, [2, 0], [5, 1])
    want = torch.stack([torch.stack([z[:, p, h] @ w_o[:, h * 4:(h + 1) * 4].T for h in (2, 0)], 1) for p in (5, 1)], 1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    full = contrib_op(z, w_o, [0, 1, 2], None).sum(2)
    torch.testing.assert_close(full, z.reshape(2, 6, 12) @ w_o.T, atol=1e-5, rtol=1e-5)


def test_readout_is_exact_in_fp32_for_integer_values(impl):
    """Small integers: every product and sum is exact, so both implementations are bit-equal."""
    z = torch.randint(-4, 5, (2, 5, 3, 7)).float()
    u = torch.randint(-4, 5, (3, 7, 4)).float()
    assert torch.equal(readout_op(z, u), torch.einsum("bthd,hdk->bthk", z.double(), u.double()).float())


@pytest.mark.parametrize("transposed", [False, True])
def test_opcheck(impl, transposed):
    z = _z(2, 5, 3, 4, torch.float32, transposed).requires_grad_()
    u, w_o = torch.randn(3, 4, 2, requires_grad=True), torch.randn(7, 12, requires_grad=True)
    torch.library.opcheck(readout_op.default, (z, u))
    torch.library.opcheck(contrib_op.default, (z, w_o, [1, 1, 2], [4, 0]))
    torch.library.opcheck(contrib_op.default, (z, w_o, [0], None))


def test_opcheck_raw_cpp_ops():
    z, u, w_o = _z(2, 5, 3, 4, torch.bfloat16, True), torch.randn(3, 4, 2), torch.randn(7, 12).bfloat16()
    raw = _cpp.ops()
    torch.library.opcheck(raw.head_readout.default, (z, u))
    torch.library.opcheck(raw.head_contrib.default, (z, w_o, [2, 0], [1]))


def test_gradients_match_the_references_autograd(impl):
    z, u, w_o = _z(2, 5, 3, 4, torch.float32, True), torch.randn(3, 4, 2), torch.randn(7, 12)
    leaves = [t.detach().clone().requires_grad_() for t in (z, u, w_o)]
    refs = [t.detach().clone().requires_grad_() for t in (z, u, w_o)]
    heads, positions = [2, 0, 2], [4, 4, 1]
    g1, g2 = torch.randn(2, 5, 3, 2), torch.randn(2, 3, 3, 7)
    loss = (readout_op(*leaves[:2]) * g1).sum() + (contrib_op(leaves[0], leaves[2], heads, positions) * g2).sum()
    want = (readout.readout_reference(*refs[:2]) * g1).sum() \
        + (readout.contrib_reference(refs[0], refs[2], heads, positions) * g2).sum()
    for got, expected in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(want, refs)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_gradients_keep_input_dtypes(dtype):
    z = _z(1, 3, 2, 4, dtype).requires_grad_()
    u = torch.randn(2, 4, 3).to(dtype).requires_grad_()
    readout_op(z, u).sum().backward()
    assert z.grad.dtype == dtype and u.grad.dtype == dtype


def test_typed_errors():
    z = _z(1, 3, 2, 4, torch.float32)
    with pytest.raises(ShapeMismatchError, match=r"u \[H, d, K\]"):
        readout_op(z, torch.randn(3, 4, 2))
    with pytest.raises(DTypeMismatchError, match="floating"):
        readout_op(z.long(), torch.randn(2, 4, 2))
    with pytest.raises(ShapeMismatchError, match=r"w_o \[d_model, H\*d\]"):
        contrib_op(z, torch.randn(5, 9), [0], None)
    with pytest.raises(SiteIndexError, match=r"\[0, 2\)"):
        contrib_op(z, torch.randn(5, 8), [2], None)
    with pytest.raises(InvalidArgumentError, match="positions"):
        contrib_op(z, torch.randn(5, 8), [0], [3])


def test_cpp_kernels_check_their_inputs():
    """The raw ops, called directly, say what they expected (TORCH_CHECK)."""
    raw = _cpp.ops()
    with pytest.raises(RuntimeError, match=r"expected u \[H, d, K\] = \[2, 4, K\]"):
        raw.head_readout(_z(1, 3, 2, 4, torch.float32), torch.randn(3, 4, 2))
    with pytest.raises(RuntimeError, match=r"expected heads in \[0, 2\), received 5"):
        raw.head_contrib(_z(1, 3, 2, 4, torch.float32), torch.randn(5, 8), [5], None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_the_reference(dtype):
    if not _cpp.has_kernels(["head_readout", "head_contrib"], "cuda"):
        pytest.skip("attnfx._C was built without CUDA")
    z, u = _z(2, 37, 5, 64, dtype, True, "cuda"), torch.randn(5, 64, 9, device="cuda").to(dtype)
    w_o = torch.randn(96, 320, device="cuda").to(dtype)
    assert_matches(run_with("cpp", readout_op, z, u), readout.readout_reference(z, u))
    for positions in (None, [36, 0, 0]):
        got = run_with("cpp", contrib_op, z, w_o, [4, 1, 4], positions)
        assert_matches(got, readout.contrib_reference(z, w_o, [4, 1, 4], positions))
    torch.library.opcheck(readout_op.default, (z.float().requires_grad_(), u.float().requires_grad_()))


def test_default_backend_on_cpu_is_cpp():
    from attnfx.ops import backends

    assert backends.choose("head_readout", "cpu") == "cpp"
    assert not CUDA or backends.choose("head_readout", "cuda") in ("cpp", "reference")
