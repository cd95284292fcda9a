"""The Triton attention forward (src/attnfx/kernels/attention.py) against the plain-torch reference
(attnfx.ops.reference.attention): every output, over shapes, masks, GQA ratios, head dims and
dtypes. Without CUDA the kernel runs in Triton's interpreter (fp32/fp16; short sequences)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from _tol import TOL
from attnfx.kernels.attention import LRP_GRAD_SCALES, attention_bwd, attention_fwd
from attnfx.errors import ShapeMismatchError
from attnfx.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


@st.composite
def cases(draw):
    kv_heads = draw(st.sampled_from([1, 2]))
    T = draw(st.integers(1, 70))
    return dict(
        batch=draw(st.integers(1, 2)), kv_heads=kv_heads, heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        T=T, S=T + draw(st.sampled_from([0, 0, 5])), d=draw(st.sampled_from([16, 24, 32, 64])),
        causal=draw(st.booleans()), padded=draw(st.booleans()), K=draw(st.integers(1, 5)),
        spans=draw(st.integers(1, 3)), dtype=draw(st.sampled_from(DTYPES)))


def _inputs(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, H, Hkv, T, S, d = c["batch"], c["heads"], c["kv_heads"], c["T"], c["S"], c["d"]
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
    key_mask = None
    if c["padded"]:
        key_mask = torch.ones(b, S, dtype=torch.bool)
        key_mask[0, : S // 3] = False                                  # left padding of row 0
    extras = dict(head_scale=torch.rand(H, generator=g) * 3 - 1, directions=torch.randn(H, d, c["K"], generator=g),
                  spans=torch.tensor([[0, 1], [S // 2, S], [1, max(2, S // 3)]][: c["spans"]]))
    cast = lambda t: t.to(DEVICE, c["dtype"])                          # noqa: E731
    return (cast(q), cast(k), cast(v)), dict(causal=c["causal"], key_mask=None if key_mask is None else key_mask.to(DEVICE),
                                             **{n: t.to(DEVICE) for n, t in extras.items()})


def _check(got, want, dtype):
    assert set(got) == set(want)
    tol = TOL[dtype]
    for name in want:
        g, w = got[name].float(), want[name].float()
        finite = torch.isfinite(w)
        assert torch.equal(finite, torch.isfinite(g)), name
        torch.testing.assert_close(g[finite], w[finite], rtol=tol, atol=tol, msg=name)


@settings(max_examples=25)      # cheap: no compilation, small shapes
@given(cases())
def test_forward_matches_the_reference(c):
    (q, k, v), kw = _inputs(c)
    _check(attention_fwd(q, k, v, **kw), reference.attention(q, k, v, **kw), c["dtype"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_path_is_the_output_alone(dtype):
    c = dict(batch=2, kv_heads=2, heads=4, T=37, S=37, d=32, causal=True, padded=False, K=1, spans=1, dtype=dtype)
    (q, k, v), _ = _inputs(c)
    got = attention_fwd(q, k, v, causal=True, write_lse=False)
    assert set(got) == {"o"}
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1),
                                                            v.float().repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(got["o"].float(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_statistics_are_consistent():
    """Σ over a span covering every key is 1; exp(lse) is the softmax normaliser; the readout
    along the identity directions is z itself."""
    c = dict(batch=1, kv_heads=1, heads=2, T=40, S=40, d=16, causal=True, padded=True, K=1, spans=1,
             dtype=torch.float32)
    (q, k, v), kw = _inputs(c)
    eye = torch.eye(16, device=DEVICE).expand(2, 16, 16).contiguous()
    got = attention_fwd(q, k, v, causal=True, key_mask=kw["key_mask"], directions=eye,
                        spans=torch.tensor([[0, 40]]))
    valid = got["lse"].isfinite()                                      # rows that see some key
    torch.testing.assert_close(got["mass"][..., 0], valid.transpose(1, 2).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(got["readout"], got["o"].transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_a_row_that_sees_no_key_is_zero():
    c = dict(batch=1, kv_heads=1, heads=1, T=8, S=8, d=16, causal=False, padded=False, K=2, spans=1,
             dtype=torch.float32)
    (q, k, v), kw = _inputs(c)
    got = attention_fwd(q, k, v, key_mask=torch.zeros(1, 8, dtype=torch.bool, device=DEVICE),
                        directions=kw["directions"], spans=kw["spans"])
    assert torch.equal(got["o"], torch.zeros_like(got["o"]))
    assert torch.equal(got["lse"], torch.full_like(got["lse"], float("-inf")))
    assert not got["readout"].any() and not got["mass"].any()


def test_gqa_ratio_must_divide():
    q, k = torch.randn(1, 3, 4, 16, device=DEVICE), torch.randn(1, 2, 4, 16, device=DEVICE)
    with pytest.raises(ShapeMismatchError, match="multiple of kv heads"):
        attention_fwd(q, k, k)


def _reference_grads(q, k, v, do, kw, lrp):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    o = reference.attention(*leaves, **kw)["o"]
    grads = torch.autograd.grad(o, leaves, do.float())
    if lrp:
        grads = [g * LRP_GRAD_SCALES[n] for g, n in zip(grads, "qkv")]
    return grads, (do.float() * o.detach()).sum(-1)


@settings(max_examples=20)
@given(cases(), st.booleans())
def test_backward_matches_the_reference(c, lrp):
    (q, k, v), kw = _inputs(c)
    kw = {n: kw[n] for n in ("causal", "key_mask")}
    fwd = attention_fwd(q, k, v, **kw)
    do = torch.randn_like(fwd["o"])
    got = attention_bwd(do, q, k, v, fwd["o"], fwd["lse"], lrp=lrp, **kw)
    (dq, dk, dv), _ = _reference_grads(q, k, v, do, kw, lrp)
    tol = TOL[c["dtype"]]
    for name, g, w in zip(("dq", "dk", "dv"), got, (dq, dk, dv)):
        torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol, msg=name)
    # relevance is Σ_d do ⊙ o of the o it is given (the kernel's, rounded to fp16): against the
    # fp32 reference's o, a sum over d of that rounding exceeds the fp16 tolerance now and then
    rowsum = (do.float() * fwd["o"].float()).sum(-1)
    torch.testing.assert_close(got[3].float(), rowsum, rtol=TOL[torch.float32], atol=TOL[torch.float32])


@pytest.fixture(params=[0, 1], ids=["candidate0", "candidate1"])
def cuda_blocks(request, monkeypatch):
    """The blocks and loop splits of a CUDA launch on 16-bit inputs (BLOCK_M ≠ BLOCK_N, 16 to
    128 rows), run here in the interpreter, whose own blocks are 32 × 32: each autotuning
    candidate in turn (the param: a variant with one candidate repeats it)."""
    from attnfx.kernels import launch

    forward, backward = launch.forward_candidates, launch.backward_candidates
    pick = lambda shapes: (shapes[min(request.param, len(shapes) - 1)],)     # noqa: E731

    def fwd_16bit(block_d, dtype, has_mass):
        return pick(forward(block_d, torch.bfloat16, has_mass))

    def bwd_16bit(block_d, dtype, causal):
        return tuple(pick(shapes) for shapes in backward(block_d, torch.bfloat16, causal))

    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "forward_candidates", fwd_16bit)
    monkeypatch.setattr(launch, "backward_candidates", bwd_16bit)


@pytest.mark.parametrize("T, S, padded", [(150, 173, True), (173, 150, False)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_block_shapes_match_the_reference(cuda_blocks, d, causal, T, S, padded):
    """In fp32 (on the 16-bit blocks), so that a wrong mask or loop bound shows well above the
    tolerance. Without a key mask, the blocks seen whole are not masked at all."""
    c = dict(batch=2, kv_heads=2, heads=4, T=T, S=S, d=d, causal=causal, padded=padded, K=3, spans=3,
             dtype=torch.float32)
    (q, k, v), kw = _inputs(c)
    _check(attention_fwd(q, k, v, **kw), reference.attention(q, k, v, **kw), torch.float32)
    kw = {n: kw[n] for n in ("causal", "key_mask")}
    fwd = attention_fwd(q, k, v, **kw)
    do = torch.randn_like(fwd["o"])
    got = attention_bwd(do, q, k, v, fwd["o"], fwd["lse"], **kw)
    (dq, dk, dv), relevance = _reference_grads(q, k, v, do, kw, lrp=False)
    for name, g, w in zip(("dq", "dk", "dv", "relevance"), got, (dq, dk, dv, relevance)):
        torch.testing.assert_close(g.float(), w, rtol=TOL[torch.float32], atol=TOL[torch.float32], msg=name)


@pytest.mark.parametrize("d", [64, 128])
def test_span_mass_is_fp32_accurate_in_half_precision(cuda_blocks, d):
    """The mass runs on the tensor cores in the input dtype, p split into two fp16 parts: it
    matches the fp32 reference to fp32's tolerance (one fp16 rounding of p is off by up to 2⁻¹²)."""
    c = dict(batch=1, kv_heads=1, heads=2, T=130, S=130, d=d, causal=True, padded=True, K=1, spans=3,
             dtype=torch.float16)
    (q, k, v), kw = _inputs(c)
    got = attention_fwd(q, k, v, causal=True, key_mask=kw["key_mask"], spans=kw["spans"])
    want = reference.attention(q, k, v, causal=True, key_mask=kw["key_mask"], spans=kw["spans"])
    torch.testing.assert_close(got["mass"], want["mass"], rtol=TOL[torch.float32], atol=TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True])
def test_strided_inputs_are_read_in_place(causal):
    """q, k, v, do as HF hands them ([b, T, H, d] memory seen as [b, H, T, d]): the same numbers
    as from contiguous copies, and contiguous outputs."""
    b, T, H, Hkv, d = 2, 45, 4, 2, 32
    q, do = (torch.randn(b, T, H, d, device=DEVICE).transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(b, T, Hkv, d, device=DEVICE).transpose(1, 2) for _ in range(2))
    fwd = attention_fwd(q, k, v, causal=causal)
    want_fwd = attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal)
    got = attention_bwd(do, q, k, v, fwd["o"], fwd["lse"], causal=causal)
    want = attention_bwd(do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), fwd["o"], fwd["lse"],
                         causal=causal)
    assert torch.equal(fwd["o"], want_fwd["o"]) and torch.equal(fwd["lse"], want_fwd["lse"])
    for g, w in zip(got, want):
        assert g.is_contiguous() and torch.equal(g, w)


def test_the_autotuner_never_keys_on_sequence_lengths(monkeypatch):
    """An autotuned launch keeps its choice for every T and S: the key holds the head width, the
    group and the switches, and the first config is the shape a single launch uses."""
    from attnfx.kernels import attention, launch

    monkeypatch.setattr(launch, "INTERPRET", False)
    for kernel in (attention._attention_fwd, attention._attention_bwd_dkdv, attention._attention_bwd_dq):
        assert {"T", "S"} <= set(kernel.arg_names)
        shapes = launch.forward_candidates(64, torch.bfloat16, False)
        tuned = launch.autotuned(kernel, shapes)
        assert {"D", "GROUP", "CAUSAL"} <= set(tuned.keys) and not {"T", "S"} & set(tuned.keys)
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuned.configs] == [
            (s.BLOCK_M, s.BLOCK_N, s.num_warps, s.num_stages) for s in shapes]


def test_heads_beyond_int32_rows_are_copied_or_refused():
    """The kernels' row offsets within a head are int32: a view whose strides put a head's rows
    past 2³¹ − 1 (a transposed view of a very long sequence) is made contiguous; a head that is
    larger than that even contiguous is refused. Meta tensors: no memory is allocated."""
    from attnfx.kernels.attention import _addressable, rows_fit_int32

    assert rows_fit_int32((1, 1, 2**24, 128), (0, 0, 128, 1))
    assert not rows_fit_int32((1, 1, 2**24, 128), (0, 0, 129, 1))
    spread = torch.empty_strided((1, 2, 3, 4), (0, 4, 2**30, 1), device="meta")
    assert _addressable(spread, "q").stride() == (24, 12, 4, 1)
    fits = torch.empty_strided((1, 2, 3, 4), (24, 4, 8, 1), device="meta")
    assert _addressable(fits, "q") is fits
    with pytest.raises(ShapeMismatchError, match="k: one head holds"):
        _addressable(torch.empty(1, 1, 2**29, 8, device="meta"), "k")
