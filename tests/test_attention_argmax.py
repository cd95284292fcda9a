"""attnfx::attention_argmax: the C++ kernel against the reference oracle, with hypothesis over shapes
and dtypes (odd sizes, GQA, rows with no visible key, causal with T ≠ S, key tiles beyond the
first), exact ties (the first index wins), the definition from reference.attention's lse, opcheck on
each implementation and on the raw op, typed errors; the CUDA kernel on a GPU."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from _ops import DTYPES, assert_matches, impl, run_with  # noqa: F401
from attnfx.errors import DTypeMismatchError, ShapeMismatchError
from attnfx.ops import _cpp, attention_argmax, reference

argmax_op = torch.ops.attnfx.attention_argmax


@st.composite
def problems(draw, max_t=40, max_s=600):
    """(q, k, key_mask, causal, sm_scale); S up to 600 crosses the C++ kernel's 256-key tiles."""
    b, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T, S, d = draw(st.integers(1, max_t)), draw(st.integers(1, max_s)), draw(st.integers(1, 24))
    dtype = draw(st.sampled_from(DTYPES))
    q = torch.randn(b, hkv * group, T, d).to(dtype)
    k = (torch.randn(b, hkv, S, d) * draw(st.sampled_from([0.5, 3.0]))).to(dtype)
    key_mask = None
    if draw(st.booleans()):
        key_mask = torch.rand(b, S) < draw(st.sampled_from([0.3, 0.9]))
        key_mask[0, :] = draw(st.booleans())                 # a batch row that sees nothing, at times
    return q, k, key_mask, draw(st.booleans()), draw(st.sampled_from([0.125, 1.0]))


def _scores(q, k, key_mask, causal, sm_scale):
    """The reference's masked fp32 scores [b, H, T, S]: to judge near-ties."""
    group = q.shape[1] // k.shape[1]
    s = (q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2)) * sm_scale
    visible = reference.attention_mask(q.shape[2], k.shape[2], causal=causal, key_mask=key_mask)
    return s.masked_fill(~visible, float("-inf"))


def assert_argmax_matches(index, prob, problem):
    """index: the reference's, or (where scores tie within fp32 round-off: BLAS sums in another order)
    a key whose score is as high; max_prob within the dtype's tolerance of the reference's."""
    want_index, want_prob = attention_argmax.argmax_reference(*problem)
    assert index.dtype == torch.int64 and index.shape == want_index.shape
    assert torch.equal(index < 0, want_index < 0)
    s = _scores(*problem)
    best = s.amax(-1)
    got = s.gather(-1, index.clamp(min=0)[..., None])[..., 0]
    near = (best - got).abs() <= 1e-5 * (1 + best.abs())
    assert (torch.eq(index, want_index) | near).all()
    assert_matches(prob, want_prob)


@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_cpp_matches_the_reference(problem):
    assert_argmax_matches(*run_with("cpp", argmax_op, *problem), problem)


def test_definition_from_the_attention_oracle():
    """max_prob = exp(s_max − lse) with lse from reference.attention; index = argmax of the scores."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g)
    key_mask = torch.rand(2, 13, generator=g) > 0.3
    index, prob = argmax_op(q, k, key_mask, True, 0.3)
    lse = reference.attention(q, k, k, causal=True, key_mask=key_mask, sm_scale=0.3)["lse"]
    s = _scores(q, k, key_mask, True, 0.3)
    best, want = s.max(-1)
    seen = torch.isfinite(best)
    assert torch.equal(index[seen], want[seen]) and (index[~seen] == -1).all()
    torch.testing.assert_close(prob[seen], torch.exp(best - lse)[seen], atol=1e-5, rtol=1e-5)


def test_ties_pick_the_first_key(impl):
    """Integer-valued q and k: every score exact, so ties are exact; keys across two C++ tiles."""
    k = torch.zeros(1, 1, 600, 2)
    k[0, 0, [7, 300, 599], 0] = 3.0                              # three keys share the top score
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    index, prob = argmax_op(q, k, None, False, 1.0)
    assert index.tolist() == [[[7, 0]]]                          # all-zero scores: key 0
    torch.testing.assert_close(prob[0, 0, 1], torch.tensor(1 / 600))
    key_mask = torch.ones(1, 600, dtype=torch.bool)
    key_mask[0, 7] = False
    assert argmax_op(q, k, key_mask, False, 1.0)[0][0, 0, 0] == 300
    assert argmax_op(q[:, :, :1], k[:, :, :300], None, True, 1.0)[0].item() == 7    # causal: last query sees all


def test_rows_without_visible_keys(impl):
    """Causal with T > S: the first T − S queries see no key: index −1, max_prob 0."""
    q, k = torch.randn(1, 2, 7, 4), torch.randn(1, 1, 3, 4)
    index, prob = argmax_op(q, k, None, True, 0.5)
    assert (index[..., :4] == -1).all() and (index[..., 4:] >= 0).all()
    assert torch.equal(prob[..., :4], torch.zeros(1, 2, 4)) and (prob[..., 4:] > 0).all()
    assert (index[..., 4] == 0).all() and torch.equal(prob[..., 4], torch.ones(1, 2))     # sees key 0 only
    empty = argmax_op(q[:, :, :0], k, None, False, 0.5)
    assert empty[0].shape == (1, 2, 0) and empty[1].dtype == torch.float32


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(impl, masked):
    q = torch.randn(2, 5, 4, 3).transpose(1, 2)                        # [b, H=4, T=5, d] strided view
    k = torch.randn(2, 2, 7, 3)
    key_mask = torch.rand(2, 7) > 0.4 if masked else None
    torch.library.opcheck(argmax_op.default, (q, k, key_mask, True, 0.5))


def test_opcheck_raw_cpp_op():
    q, k = torch.randn(1, 4, 5, 3).bfloat16(), torch.randn(1, 2, 9, 3).bfloat16()
    torch.library.opcheck(_cpp.ops().attention_argmax.default, (q, k, None, True, 0.5))


def test_compiles_without_a_graph_break():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    fn = torch.compile(lambda q, k: argmax_op(q, k, None, True, 0.25), backend="eager", fullgraph=True)
    got, want = fn(q, k), argmax_op(q, k, None, True, 0.25)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_typed_errors():
    q, k = torch.randn(1, 3, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ShapeMismatchError, match="multiple of Hkv"):
        argmax_op(q, k, None, False, 1.0)
    with pytest.raises(DTypeMismatchError):
        argmax_op(q[:, :2].long(), k.long(), None, False, 1.0)
    with pytest.raises(DTypeMismatchError):
        argmax_op(q[:, :2], k.half(), None, False, 1.0)
    with pytest.raises(ShapeMismatchError, match=r"key_mask must be bool \[b, S\]"):
        argmax_op(q[:, :2], k, torch.ones(1, 4, dtype=torch.bool), False, 1.0)
    with pytest.raises(RuntimeError, match=r"attention_argmax: expected key_mask bool \[b, S\]"):
        _cpp.ops().attention_argmax(q[:, :2], k, torch.ones(1, 5), False, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_matches_the_reference(dtype, causal):
    if not _cpp.has_kernels(["attention_argmax"], "cuda"):
        pytest.skip("attnfx._C was built without CUDA")
    q, k = torch.randn(2, 8, 300, 64, device="cuda").to(dtype), torch.randn(2, 2, 333, 64, device="cuda").to(dtype)
    key_mask = torch.rand(2, 333, device="cuda") > 0.1
    key_mask[1, :40] = False                                      # causal rows of batch 1 that see nothing
    problem = (q, k, key_mask, causal, 0.125)
    index, prob = run_with("cpp", argmax_op, *problem)
    assert_argmax_matches(index.cpu(), prob.cpu(), tuple(x.cpu() if torch.is_tensor(x) else x for x in problem))
    kt = torch.zeros(1, 1, 100, 2, device="cuda")
    kt[0, 0, [33, 65, 97], 0] = 2.0                               # ties on three lanes: the first wins
    assert run_with("cpp", argmax_op, torch.ones(1, 1, 1, 2, device="cuda"), kt, None, False, 1.0)[0].item() == 33
