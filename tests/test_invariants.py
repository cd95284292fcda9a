"""docs/design.md §6 invariants on every family: identity, exact head decomposition, readout sums,
scale-1 identity, and steering equal to reference forward hooks written here."""
import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

import attnfx
from _tol import assert_close
from models import FAMILIES, batches, build, configs, head_slice, output_tensor

FAMILY_LIST = list(FAMILIES.values())


def _o_proj(model, site):
    return model.get_submodule(site.o_proj.rsplit(".", 1)[0])


def _run(fn, ids, mask):
    with torch.no_grad():
        return output_tensor(fn(input_ids=ids, attention_mask=mask))


def _hooked(model, hooks, ids, mask):
    handles = [register(fn) for register, fn in hooks]
    try:
        return _run(model, ids, mask)
    finally:
        for h in handles:
            h.remove()


def _valid(out, mask):
    """Compare only real (non-padding) positions."""
    return out[mask.bool()]


# The two @given tests below draw the same things in the same order (config, batch, then a site,
# head, kv head and alpha: _knobs), so under the CI profile's derandomize one seed gives both the
# same examples: the model structures one compiles (attnfx shares graphs between instances of a
# structure) the other finds compiled, instead of each compiling its own. Each still runs its
# max_examples examples of the same strategies; outside derandomize (the dev profile) each draws
# its own random examples as before.
_same_examples = seed(20250917) if settings.default.derandomize else (lambda test: test)


@pytest.fixture(scope="module", params=FAMILY_LIST, ids=lambda f: f.name)
def family(request):
    """Each family, for both @given tests: a module-scoped parameter, so pytest runs a family's
    two tests one after the other (instrumenting another family in between makes dynamo recompile
    the first's structures)."""
    return request.param


def _knobs(data, sites):
    """A site, one of its heads, one of its kv heads, and a steering factor."""
    site = sites[data.draw(st.integers(0, len(sites) - 1))]
    head = data.draw(st.integers(0, site.num_heads - 1))
    kv = data.draw(st.integers(0, site.num_kv_heads - 1))
    return site, head, kv, data.draw(st.sampled_from([0.0, -1.5, 3.0]))


@_same_examples
@given(data=st.data())
def test_identity_decomposition_and_readouts(family, data):
    cfg, (ids, mask) = data.draw(configs(family)), data.draw(batches(family))
    model = build(family, **cfg)
    im = attnfx.instrument(model)
    reference = _run(model, ids, mask)
    assert_close(_run(im, ids, mask), reference, equal_nan=True)

    sites = im.sites
    heads = [(s.layer, h) for s in sites for h in range(s.num_heads)]
    d_model = sites[0].d_model
    directions = torch.randn(3, d_model)
    attn_out = {}
    hooks = [(_o_proj(model, s).register_forward_hook,
              lambda mod, args, out, l=s.layer: attn_out.__setitem__(l, out.detach())) for s in sites]
    _hooked(model, hooks, ids, mask)
    with im.record("contrib", "readout", heads=heads, directions=directions) as rec:
        _run(im, ids, mask)
    for s in sites:
        bias = _o_proj(model, s).bias
        bias = torch.zeros(d_model) if bias is None else bias.detach()
        contrib = torch.stack([rec["contrib"][(s.layer, h)] for h in range(s.num_heads)], dim=2)  # [b,t,H,m]
        assert_close(_valid(contrib.sum(2) + bias, mask), _valid(attn_out[s.layer], mask))
        readout_sum = rec["readout"][:, :, s.layer].sum(2)                                       # [b,t,K]
        assert_close(_valid(readout_sum, mask), _valid((attn_out[s.layer] - bias) @ directions.T, mask))

    site, head, kv, _alpha = _knobs(data, sites)          # drawn as the steering test draws them
    for on in ("z", "value", "value_unbiased", "query"):
        im.steering.scale(sites[-1].layer, 0, 1.0, on=on)
        im.steering.scale(site.layer, head if on in ("z", "query") else kv, 1.0, on=on)
    assert torch.equal(_run(im, ids, mask), _run(im, ids, mask))
    assert_close(_run(im, ids, mask), reference, equal_nan=True)


def _z_hook(model, site, head, fn):
    d = site.head_dim

    def pre(mod, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = fn(x[..., head * d:(head + 1) * d])
        return (x,) + tuple(args[1:])
    return (_o_proj(model, site).register_forward_pre_hook, pre)


def _proj_hook(family, model, site, which, head, fn):
    q_mod, v_mod = family.qv_modules(model, site.layer)
    cols = head_slice(family, which, head, site.num_heads, site.head_dim)
    module = q_mod if which == "q" else v_mod

    def post(mod, args, out):
        out = out.clone()
        bias = mod.bias[cols] if mod.bias is not None else torch.zeros(cols.stop - cols.start)
        out[..., cols] = fn(out[..., cols], bias)
        return out
    return (module.register_forward_hook, post)


@_same_examples
@given(data=st.data())
def test_steering_equals_reference_hooks(family, data):
    cfg, (ids, mask) = data.draw(configs(family)), data.draw(batches(family))
    model = build(family, **cfg)
    im = attnfx.instrument(model)
    _run(im, ids, mask)
    site, head, kv, alpha = _knobs(data, im.sites)
    group = range(kv * site.num_heads // site.num_kv_heads, (kv + 1) * site.num_heads // site.num_kv_heads)
    cases = [
        ("z", head, [_z_hook(model, site, head, lambda z: z * alpha)]),
        ("value", kv, [_proj_hook(family, model, site, "v", kv, lambda v, b: v * alpha)]),
        ("value_unbiased", kv, [_proj_hook(family, model, site, "v", kv, lambda v, b: (v - b) * alpha + b)]),
        ("query", head, [_proj_hook(family, model, site, "q", head, lambda q, b: q * alpha)]),
    ]
    # value scaling of a kv head equals z scaling of every query head of its group
    cases.append(("value", kv, [_z_hook(model, site, h, lambda z: z * alpha) for h in group]))
    for on, index, hooks in cases:
        im.steering.reset()
        im.steering.scale(site.layer, index, alpha, on=on)
        assert_close(_valid(_run(im, ids, mask), mask), _valid(_hooked(model, hooks, ids, mask), mask))


@pytest.mark.parametrize("family", [FAMILIES["llama"], FAMILIES["gpt2"], FAMILIES["plain_handwritten"]],
                         ids=lambda f: f.name)
def test_ablation_and_patch_equal_hooks(family):
    model = build(family, layers=2, heads=4, kv_heads=2, head_dim=8)
    im = attnfx.instrument(model)
    ids_a, ids_b = torch.randint(1, 64, (2, 9)), torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids_a)
    _run(im, ids_a, mask)
    site = im.sites[1]
    with im.record("z") as rec:
        _run(im, ids_b, mask)
    z_b = rec["z"][1]                                                              # [b, t, H, d]

    im.steering.ablate(1, [0, 2], how="zero")
    expected = _hooked(model, [_z_hook(model, site, h, torch.zeros_like) for h in (0, 2)], ids_a, mask)
    assert_close(_run(im, ids_a, mask), expected)

    im.steering.reset()
    reference = {"input_ids": ids_b, "attention_mask": mask}
    im.steering.ablate(1, 3, how="mean", reference=reference)
    mean = z_b[:, :, 3].reshape(-1, site.head_dim).mean(0)
    expected = _hooked(model, [_z_hook(model, site, 3, lambda z: mean.expand_as(z))], ids_a, mask)
    assert_close(_run(im, ids_a, mask), expected)

    im.steering.reset()
    im.steering.patch(1, 2, z_b[:, :, 2])
    expected = _hooked(model, [_z_hook(model, site, 2, lambda z: z_b[:, :, 2])], ids_a, mask)
    assert_close(_run(im, ids_a, mask), expected)
    patched_self = _run(im, ids_b, mask)          # patching b's own z into b changes nothing
    im.steering.reset()
    assert_close(patched_self, _run(im, ids_b, mask))


def test_identity_is_bit_exact_on_eager_backend():
    model = build(FAMILIES["qwen2"], layers=2, heads=4, kv_heads=2)
    im = attnfx.instrument(model, backend="eager")
    ids = torch.randint(1, 64, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert torch.equal(_run(im, ids, mask), _run(model, ids, mask))
