"""Activation patching of attention edges, the baseline Ferrando & Voita (2024) set routes against:
the bare eager HF GPT-2 (not instrumented), batch 1, one forward per edge. A forward-pre-hook on
layer l's W_O (attn.c_proj, input z [1, t, H·dh]) removes source j's write into query i,

    z[0, i, h] -= A_h[i, j] · v_h[j]      (A, v of the clean run at layer l)

for the heads of the edge (all heads: a token edge; one head: a head edge), so the rest of the
network is recomputed downstream of the removed edge.

Effect: ‖y − y'‖₁ / ‖y‖₁, y the final stream at the predicted position (ln_f's input, the graph's
root node). The recipe's proximity ‖y‖₁ − ‖y − c‖₁ scores c by how far y moves in L1 when c is
taken out of the sum with nothing recomputed; this is the same L1 move with everything
downstream recomputed. The drop of the predicted token's logit is recorded beside it.
"""
from __future__ import annotations

import torch


def record(model, batch) -> dict:
    """The clean eager run: A [L, H, t, s], v [L, s, H, dh], the final stream y [t, d], logits [t, V]."""
    cfg = model.config
    values, hooks = {}, []
    for l, block in enumerate(model.transformer.h):
        hooks.append(block.attn.c_attn.register_forward_hook(
            lambda m, a, o, l=l: values.__setitem__(l, o[0, :, 2 * cfg.n_embd:].reshape(o.shape[1], cfg.n_head, -1))))
    final = _final_stream(model, hooks)
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    return {"A": torch.stack([a[0] for a in out.attentions]), "v": torch.stack([values[l] for l in range(cfg.n_layer)]),
            "y": final[0], "logits": out.logits[0]}


def _final_stream(model, hooks) -> dict:
    final = {}
    hooks.append(model.transformer.ln_f.register_forward_hook(lambda m, a, o: final.__setitem__(0, a[0][0])))
    return final


def run_edited(model, batch, layer: int, edit) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward with layer's z edited in place by edit(z [t, H, dh]) → (final stream [t, d], logits [t, V])."""
    heads = model.config.n_head

    def pre(module, args):
        z = args[0].clone()                                           # z: [1, t, H·dh]
        edit(z[0].view(z.shape[1], heads, -1))
        return (z,) + tuple(args[1:])

    hooks = [model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre)]
    final = _final_stream(model, hooks)
    try:
        with torch.no_grad():
            logits = model(**batch).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    return final[0], logits


def remove_edges(clean, layer: int, query: int, sources: list[int], heads: list[int]):
    """The edit removing A_h[i, j] v_h[j] from z[i, h] for every j in sources, h in heads."""
    writes = clean["A"][layer][heads][:, query, sources, None] * clean["v"][layer][sources][:, heads].transpose(0, 1)

    def edit(z):                                                      # writes: [|heads|, |sources|, dh]
        z[query, heads] -= writes.sum(1)
    return edit


def edge_effect(model, batch, clean, layer: int, query: int, sources: list[int], heads: list[int]):
    """(relative L1 move of the final stream at the last position, drop of the predicted token's logit)."""
    y, logits = run_edited(model, batch, layer, remove_edges(clean, layer, query, sources, heads))
    y0, predicted = clean["y"][-1], int(clean["logits"][-1].argmax())
    return (float((y0 - y[-1]).abs().sum() / y0.abs().sum()),
            float(clean["logits"][-1, predicted] - logits[-1, predicted]))


def candidates(layers: int, t: int, heads: int | None = None) -> list[tuple]:
    """Causal edges (l, i, j) with j ≤ i, or (l, i, j, h) per head."""
    token = [(l, i, j) for l in range(layers) for i in range(t) for j in range(i + 1)]
    return token if heads is None else [(*e, h) for e in token for h in range(heads)]


def patch_edges(model, batch, per_head: bool = False) -> dict[tuple, tuple[float, float]]:
    """The paper's sweep: one clean forward, then one forward per candidate edge."""
    clean = record(model, batch)
    cfg, t = model.config, batch["input_ids"].shape[1]
    all_heads = list(range(cfg.n_head))
    return {e: edge_effect(model, batch, clean, e[0], e[1], [e[2]], [e[3]] if per_head else all_heads)
            for e in candidates(cfg.n_layer, t, cfg.n_head if per_head else None)}


def conservation_check(model, batch, tol: float = 1e-5) -> dict[str, float]:
    """Removing every source j ≤ i of (l, i) at once must equal zeroing z[i] (the attention's
    output at i before W_O; b_O stays, it is no edge), in the whole final stream, for every (l, i):
    raises if not (fp32: atol = rtol = tol). Returns the largest gap and the smallest move the
    zeroing made (so the check is not vacuous)."""
    clean = record(model, batch)
    cfg, t = model.config, batch["input_ids"].shape[1]
    gap, smallest = 0.0, float("inf")
    for l in range(cfg.n_layer):
        for i in range(t):
            removed, _ = run_edited(model, batch, l, remove_edges(clean, l, i, list(range(i + 1)), list(range(cfg.n_head))))
            zeroed, _ = run_edited(model, batch, l, lambda z, i=i: z[i].zero_())
            torch.testing.assert_close(removed, zeroed, atol=tol, rtol=tol)
            gap = max(gap, float((removed - zeroed).abs().max()))
            smallest = min(smallest, float((zeroed - clean["y"]).abs().max()))
    return {"max_abs_gap": gap, "smallest_move_of_zeroing": smallest, "atol": tol, "rtol": tol}
