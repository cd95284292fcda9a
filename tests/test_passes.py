"""Each pass fires once per layer, and nowhere else (STYLE §8)."""
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import attnfx
from attnfx.graph.sites import find_sites
from models import FAMILIES, build


def _capture(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def test_rewrites_count_one_per_layer():
    model = build(FAMILIES["llama"], layers=3, heads=4, kv_heads=2)
    im = attnfx.instrument(model)
    before = counters["attnfx"]["sites_rewritten"]
    with torch.no_grad():
        im(input_ids=torch.randint(1, 64, (2, 5)))
    assert counters["attnfx"]["sites_rewritten"] - before == 3


def test_no_site_in_graphs_without_attention():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    x = torch.randn(2, 3, 8)
    assert find_sites(_capture(mlp, x).graph) == ([], [])
    # a softmax over something that is not q @ kᵀ, feeding a matmul, is not attention
    w = torch.randn(8, 8)
    assert find_sites(_capture(lambda t: torch.softmax(t, dim=-1) @ w, x).graph)[0] == []


def test_three_dimensional_attention_is_reported_as_a_near_miss():
    q = torch.randn(2, 5, 8)                                   # [b, t, d]: no head axis
    sites, notes = find_sites(_capture(lambda a: F.scaled_dot_product_attention(a, a, a), q).graph)
    assert sites == [] and "not [batch, heads, seq, head_dim]" in notes[0]
