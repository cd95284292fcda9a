"""Information flow routes (Ferrando & Voita 2024; issue 16): recipes.flow.information_flow equals
the decomposition written out in the test on the bare default model (attention weights, values
and W_O read off the model, the streams from HF's hidden states and hooks), edge for edge, with
token and head granularity; every update's importances sum to 1."""
from __future__ import annotations

import pytest
import torch

import attnfx
from attnfx.errors import InvalidArgumentError
from attnfx.models.loader import load_default, load_prompts
from attnfx.recipes import flow


@pytest.fixture(scope="module")
def setup():
    model, tok = load_default(attn_implementation="eager")
    batch = tok(load_prompts()["ioi"][0]["prompt"], return_tensors="pt")
    return model, attnfx.instrument(model, backend="eager"), batch


def _explicit(model, batch):
    """Per layer: x (entering), x_mid, the MLP output, the stream leaving, A [H, t, s] and the
    per-source head writes A_h[i, j] v_h[j] W_O^h [H, t, s, d] of example 0, on the bare model."""
    cfg = model.config
    H, d = cfg.n_head, cfg.n_embd // cfg.n_head
    mids, mlps, values, final = {}, {}, {}, {}
    hooks = []
    for l, block in enumerate(model.transformer.h):
        hooks.append(block.ln_2.register_forward_hook(lambda m, a, o, l=l: mids.__setitem__(l, a[0][0])))
        hooks.append(block.mlp.register_forward_hook(lambda m, a, o, l=l: mlps.__setitem__(l, o[0])))
        hooks.append(block.attn.c_attn.register_forward_hook(
            lambda m, a, o, l=l: values.__setitem__(l, o[0, :, 2 * cfg.n_embd:].view(-1, H, d))))
    hooks.append(model.transformer.ln_f.register_forward_hook(lambda m, a, o: final.__setitem__(0, a[0][0])))
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    for hook in hooks:
        hook.remove()
    layers = []
    for l, block in enumerate(model.transformer.h):
        w_o = block.attn.c_proj.weight.detach().view(H, d, -1)              # Conv1D: [in, out]
        u = torch.einsum("jhd,hde->hje", values[l], w_o)                   # [H, s, d_model]
        a = out.attentions[l][0]                                          # [H, t, s]
        leaving = out.hidden_states[l + 1][0] if l + 1 < cfg.n_layer else final[0]
        layers.append({"x": out.hidden_states[l][0], "mid": mids[l], "mlp": mlps[l], "out": leaving,
                       "writes": a[..., None] * u[:, None]})
    return layers


def _importance(parts, y):
    prox = (y.abs().sum() - (y - parts).abs().sum(-1)).clamp(min=0)
    return prox / prox.sum()


def _explicit_routes(layers, position, threshold, heads):
    edges, todo, seen = {}, [("resid", len(layers), position)], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        kind, l, i = node
        incoming = []
        if kind == "mlp":
            incoming = [(("mid", l, i), 1.0)]
        elif kind == "resid" and l > 0:
            lay = layers[l - 1]
            w = _importance(torch.stack([lay["mid"][i], lay["mlp"][i]]), lay["out"][i])
            incoming = [(("mid", l - 1, i), w[0]), (("mlp", l - 1, i), w[1])]
        elif kind == "mid":
            lay = layers[l]
            writes = lay["writes"][:, i]                                  # [H, s, d]
            terms = writes.flatten(0, 1) if heads else writes.sum(0)
            w = _importance(torch.cat([lay["x"][i][None], terms]), lay["mid"][i])
            s = writes.shape[1]
            incoming = [(("resid", l, i), w[0])] + [(("resid", l, k % s if heads else k), w[1 + k])
                                                    for k in range(terms.shape[0])]
        for source, weight in incoming:
            if float(weight) >= threshold:
                edges.setdefault((source, node), []).append(float(weight))
                todo.append(source)
    return edges


@pytest.mark.parametrize("heads", [False, True])
def test_routes_equal_the_explicit_decomposition(setup, heads):
    model, im, batch = setup
    graph = flow.information_flow(im, batch, position=-1, threshold=0.04, heads=heads)
    want = _explicit_routes(_explicit(model, batch), batch["input_ids"].shape[1] - 1, 0.04, heads)
    got = {}
    for source, target, weight, kind in graph.edges:
        got.setdefault((source, target), []).append(weight)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(torch.tensor(sorted(got[key])), torch.tensor(sorted(want[key])),
                                   atol=1e-5, rtol=1e-5)
    assert len(graph.edges) > 5 and any(kind.startswith("head") == heads and source[2] != target[2]
                                        for source, target, _, kind in graph.edges)


def test_importances_of_an_update_sum_to_one(setup):
    model, im, batch = setup
    rec, writes = flow._components(im, *attnfx.graph.calls.as_call(batch))
    for node in [("resid", 4, 3), ("mid", 2, 5), ("mid", 0, 0)]:
        total = sum(w for _, w, _ in flow._incoming(im, rec, writes, node, 0, heads=True))
        assert abs(total - 1.0) < 1e-5


def test_json_plot_and_errors(setup, tmp_path):
    model, im, batch = setup
    graph = flow.information_flow(im, batch, threshold=0.1)
    import json
    saved = json.loads(graph.to_json(tmp_path / "g.json").read_text())
    assert len(saved["edges"]) == len(graph.edges) and saved["position"] == batch["input_ids"].shape[1] - 1
    assert graph.plot(tmp_path / "g.png").stat().st_size > 1000
    with pytest.raises(InvalidArgumentError, match="threshold"):
        flow.information_flow(im, batch, threshold=1.5)
    with pytest.raises(InvalidArgumentError, match="position"):
        flow.information_flow(im, batch, position=99)
