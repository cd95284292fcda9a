"""Records: z, readouts (z_h · u_h), contributions of selected heads/positions, final norm input."""
import torch

import attnfx
from _tol import assert_close
from models import FAMILIES, build


def test_records_equal_values_taken_by_hooks():
    model = build(FAMILIES["gpt2"], layers=2, heads=4)
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 9))
    z_hooked = {}
    handles = [model.transformer.h[l].attn.c_proj.register_forward_pre_hook(
        lambda m, a, l=l: z_hooked.__setitem__(l, a[0].detach().view(2, 9, 4, 8))) for l in range(2)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    directions = torch.randn(5, 32)
    with torch.no_grad(), im.record("z", "readout", "contrib", "final_norm", directions=directions,
                                    heads=[(1, 2), (0, 3), (1, 0)], positions=[-1, 2]) as rec:
        im(input_ids=ids)
    for l in range(2):
        assert_close(rec["z"][l], z_hooked[l])
        w = model.transformer.h[l].attn.c_proj.weight.view(4, 8, 32)          # Conv1D: [H·d, d_model]
        expected = torch.einsum("bthd,hdm,km->bthk", z_hooked[l], w, directions)
        assert_close(rec["readout"][:, :, l], expected)
    assert rec["readout"].shape == (2, 9, 2, 4, 5) and rec["readout"].dtype == torch.float32
    assert sorted(rec["contrib"]) == [(0, 3), (1, 0), (1, 2)]
    for (l, h), contrib in rec["contrib"].items():
        w = model.transformer.h[l].attn.c_proj.weight.view(4, 8, 32)
        assert_close(contrib, z_hooked[l][:, [-1, 2], h] @ w[h])
        assert contrib.shape == (2, 2, 32)
    assert rec["final_norm"].shape == (2, 9, 32)


def test_record_is_per_call_and_leaves_plain_calls_unrecorded():
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2)
    im = attnfx.instrument(model)
    a, b = torch.randint(1, 64, (1, 4)), torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        with im.record("z") as rec:
            im(input_ids=a)
            im(input_ids=b)
        im(input_ids=a)
    assert len(rec.calls) == 2 and rec["z"][0].shape == (1, 6, 4, 8)
    assert rec.calls[0]["z"][1].shape == (1, 4, 4, 8)


def test_recorded_z_reflects_steering():
    model = build(FAMILIES["qwen2"], layers=1, heads=4, kv_heads=2)
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad(), im.record("z") as rec:
        im(input_ids=ids)
        im.steering.scale(0, 3, 2.0, on="z")
        im(input_ids=ids)
    before, after = rec.calls[0]["z"][0], rec.calls[1]["z"][0]
    assert_close(after[:, :, 3], 2 * before[:, :, 3])
    assert torch.equal(after[:, :, :3], before[:, :, :3])
