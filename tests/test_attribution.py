"""head_attribution equals the slow way: explicit contributions through the frozen final norm
scale and the unembedding (fp32, 1e-5)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnfx
from _tol import assert_close
from models import FAMILIES, VOCAB, build, configs


def slow_dla(model, im, ids, targets, foils, positions):
    """Per head: P(z_h W_O,hᵀ) · γ / σ · (W_U[t] − W_U[f]), from hooks on the plain model."""
    z, resid = {}, {}
    norm = im.final_norm
    o_projs = [model.get_submodule(s.o_proj.rsplit(".", 1)[0]) for s in im.sites]
    norm_module = model.get_submodule(norm.weight.rsplit(".", 1)[0])
    handles = [op.register_forward_pre_hook(lambda m, a, l=l: z.__setitem__(l, a[0].detach()))
               for l, op in enumerate(o_projs)]
    handles.append(norm_module.register_forward_pre_hook(lambda m, a: resid.__setitem__("x", a[0].detach())))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    params = dict(model.named_parameters(remove_duplicate=False))
    w_u, gamma = params[norm.unembed].detach(), norm_module.weight.detach()
    rows = torch.arange(ids.shape[0])
    x = resid["x"][rows, positions]
    if norm.kind == "layer_norm":
        sigma = torch.sqrt(x.var(-1, unbiased=False) + norm.eps)
    else:
        sigma = torch.sqrt(x.pow(2).mean(-1) + norm.eps)
    site = im.sites[0]
    heads, d = site.num_heads, site.head_dim
    out = torch.zeros(ids.shape[0], len(o_projs), heads)
    for l, op in enumerate(o_projs):
        zl = z[l][rows, positions].view(-1, heads, d)
        # nn.Linear weight is [d_model, H·d]; GPT-2's Conv1D is [H·d, d_model]
        w = op.weight.detach() if isinstance(op, torch.nn.Linear) else op.weight.detach().T
        for h in range(heads):
            c = zl[:, h] @ w[:, h * d:(h + 1) * d].T
            if norm.kind == "layer_norm":
                c = c - c.mean(-1, keepdim=True)
            out[:, l, h] = ((c * gamma / sigma[:, None]) * (w_u[targets] - w_u[foils])).sum(-1)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "neox", "plain_sdpa"])
@given(data=st.data())
def test_dla_equals_explicit_contributions(family, data):
    fam = FAMILIES[family]
    model = build(fam, **data.draw(configs(fam)))
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 24))
    ids = torch.randint(1, VOCAB, (b, t))
    im = attnfx.instrument(model, example_inputs={"input_ids": ids})
    targets = torch.tensor(data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=b, max_size=b)))
    foils = torch.tensor(data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=b, max_size=b)))
    positions = torch.tensor(data.draw(st.lists(st.integers(-t, t - 1), min_size=b, max_size=b))) % t
    dla = attnfx.head_attribution(im, {"input_ids": ids}, targets, foil=foils, position=positions, reduce="none")
    assert_close(dla, slow_dla(model, im, ids, targets, foils, positions))
    assert_close(attnfx.head_attribution(im, {"input_ids": ids}, targets, foil=foils, position=positions),
                 dla.mean(0))


def test_dla_is_linear_in_the_target_direction():
    """DLA(target − foil) = DLA(target) − DLA(foil), and [b, L, H] is the per-example form."""
    model = build(FAMILIES["gpt2"], layers=2, heads=4)
    ids = torch.randint(1, VOCAB, (2, 7))
    im = attnfx.instrument(model)
    both = attnfx.head_attribution(im, {"input_ids": ids}, target=5, foil=9, reduce="none")
    alone = attnfx.head_attribution(im, {"input_ids": ids}, target=5, reduce="none")
    foil = attnfx.head_attribution(im, {"input_ids": ids}, target=9, reduce="none")
    assert both.shape == (2, 2, 4) and both.abs().sum() > 0
    assert_close(both, alone - foil)
    assert_close(attnfx.head_attribution(im, {"input_ids": ids}, target=5, foil=9, reduce="sum"), both.sum(0))
