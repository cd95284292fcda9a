"""Models dispatched by accelerate (capture/dispatch.py): `from_pretrained(device_map=...)` with
blocks kept on the CPU and blocks offloaded to disk (meta parameters between calls, loaded by
accelerate's hooks). Each check compares against the same weights loaded without a device map and
instrumented: outputs, records of every layer (offloaded ones included), steering, attribution,
compiles; a detached model gets accelerate's hooks back as they were."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers as T
from torch._dynamo.utils import counters

import attnfx
from _tol import assert_close
from attnfx.api import _ISOLATES_RECOMPILES
from attnfx.errors import UnsupportedModelError
from models import FAMILIES, VOCAB, build

accelerate = pytest.importorskip("accelerate")
offload_compiles = pytest.mark.skipif(not _ISOLATES_RECOMPILES, reason="offloaded blocks need torch >= 2.13 "
                                      "(a recompile budget per region); older torch is refused, as tested below")

# Offloaded layers: "disk" (a CPU main device keeps "cpu" blocks in place). Llama's two layers
# (and its first parameter) are offloaded: they share one compiled block frame and must be told
# apart; GPT-2 mixes an offloaded block with one kept on the CPU.
DEVICE_MAPS = {
    "llama": (2, {"model.embed_tokens": "disk", "model.layers.0": "disk", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}),
    "gpt2": (2, {"transformer.wte": "cpu", "transformer.wpe": "disk", "transformer.h.0": "disk",
                 "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}),
}
CALL = {"use_cache": False}         # no KV cache: the layers' frames do not specialise per layer index


def _offloaded(device_map) -> list[int]:
    return [int(name.rsplit(".", 1)[1]) for name, where in device_map.items()
            if where == "disk" and name.rsplit(".", 1)[1].isdigit()]


def _load(path, device_map=None):
    kw = {"device_map": device_map, "offload_folder": str(path / "offload")} if device_map else {}
    return T.AutoModelForCausalLM.from_pretrained(path, **kw).eval()


@pytest.fixture(scope="module", params=sorted(DEVICE_MAPS))
def case(request, tmp_path_factory):
    if not _ISOLATES_RECOMPILES:
        pytest.skip("offloaded blocks need torch >= 2.13 (a recompile budget per region)")
    layers, device_map = DEVICE_MAPS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    build(FAMILIES[request.param], layers=layers, heads=4, kv_heads=2).save_pretrained(path)
    dispatched, plain = _load(path, device_map), _load(path)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bare = dispatched(ids, **CALL).logits
    return SimpleNamespace(path=path, device_map=device_map, layers=layers, ids=ids, bare=bare,
                           offloaded=_offloaded(device_map), dispatched=dispatched,
                           im=attnfx.instrument(dispatched), reference=attnfx.instrument(plain))


def test_instrumented_logits_equal_the_dispatched_models(case):
    assert len(case.im.sites) == case.layers and all(site.o_proj for site in case.im.sites)
    assert any(p.is_meta for p in case.dispatched.parameters())       # offloaded: loaded at each call only
    with torch.no_grad():
        assert_close(case.im(case.ids, **CALL).logits, case.bare)
        assert_close(case.dispatched(case.ids, **CALL).logits, case.bare)    # its hooks regrouped, same outputs


def test_steered_offloaded_layers_record_and_output_as_the_model_loaded_whole(case):
    """z of every layer (offloaded ones included) and the logits, with a head of the first
    offloaded layer zeroed and a value head of the last one doubled."""
    first, last = case.offloaded[0], case.offloaded[-1]
    runs = []
    for im in (case.im, case.reference):
        im.steering.scale(layer=first, head=0, factor=0.0)
        im.steering.scale(layer=last, head=1, factor=2.0, on="value")
        with torch.no_grad(), im.record("z") as rec:
            runs.append((im(case.ids, **CALL).logits, rec["z"]))
        im.steering.reset()
    (logits, z), (expected_logits, expected_z) = runs
    assert_close(logits, expected_logits)
    assert not torch.allclose(logits, case.bare)
    for layer in range(case.layers):
        assert z[layer].device == case.bare.device
        assert_close(z[layer], expected_z[layer])
    assert not z[first][..., 0, :].any()


def test_steering_changes_do_not_recompile(case):
    with torch.no_grad():
        for _ in range(2):                          # warm: the first calls of a shape compile
            case.im(case.ids, **CALL)
        before = counters["attnfx"]["graphs_compiled"], counters["stats"]["unique_graphs"]
        for factor in (0.0, 0.5, 3.0):              # offload makes new parameter tensors every call
            case.im.steering.scale(layer=case.offloaded[0], head=2, factor=factor)
            case.im(case.ids, **CALL)
    case.im.steering.reset()
    assert (counters["attnfx"]["graphs_compiled"], counters["stats"]["unique_graphs"]) == before


@offload_compiles
def test_blocks_specialised_by_the_kv_cache_each_have_a_compile_budget(tmp_path):
    """With a KV cache dynamo specialises the frame after each block's hook on the block's layer
    index: one compile per block. The instrumented region's limit is dynamo's per block (here 1)."""
    layers, device_map = DEVICE_MAPS["llama"]
    build(FAMILIES["llama"], layers=layers, heads=4, kv_heads=2).save_pretrained(tmp_path)
    model = _load(tmp_path, device_map)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        bare = model(ids).logits
        im = attnfx.instrument(model)
        assert_close(im(ids).logits, bare)


def test_direct_logit_attribution_across_offload_breaks_equals_the_whole_models(case):
    """Offloaded blocks load their weights outside the graph, so the forward is split at each one
    and DLA follows the stream across the graphs by a gradient along it (analysis/direct_path.py):
    heads, b_O, MLPs, embeddings and the logit equal the single-graph walk of the model loaded
    whole, at each row's own position; the biases on the path come back summed in norm_bias."""
    call = {"input_ids": case.ids, **CALL}
    got, want = (attnfx.logit_attribution(im, call, 5, foil=9, position=[3, -1]) for im in (case.im, case.reference))
    for name in ("heads", "attn_bias", "mlp", "embed", "total"):
        assert_close(getattr(got, name), getattr(want, name))
    assert_close(got.norm_bias, want.norm_bias + want.logit_bias + want.const)
    assert not got.logit_bias.any() and not got.const.any() and torch.equal(got.direct, want.direct)
    assert got.heads.abs().amin() > 0 and got.mlp.abs().amin() > 0
    assert_close(attnfx.head_attribution(case.im, call, 5, reduce="none"),
                 attnfx.head_attribution(case.reference, call, 5, reduce="none"))


@pytest.mark.parametrize("rule", ["attnlrp", "gradient"])
def test_relevance_and_patching_across_offload_breaks_equal_the_whole_models(case, rule):
    """An offloaded forward runs as one graph per offloaded block, plus graphs without attention
    between and after them (capture/ruled.py: the final norm's gets the rules too). Relevance and
    the gradient patching estimates equal the whole model's, component by component; the tokens'
    relevance is None where the embedding runs in a graph of its own (its gate needs the state)."""
    call, corrupt = {"input_ids": case.ids, **CALL}, {"input_ids": case.ids.flip(1), **CALL}
    metric = lambda logits: logits[:, -1, 5] - logits[:, -1, 9]         # noqa: E731
    estimate = attnfx.patching.relp if rule == "attnlrp" else attnfx.patching.attribution_patching
    runs = [(attnfx.relevance(im, call, 5, foil=9, rule=rule), estimate(im, call, corrupt, metric))
            for im in (case.im, case.reference)]
    (relevance, patching), (expected_relevance, expected_patching) = runs
    assert relevance.leaks == [] == expected_relevance.leaks      # every op on the path has its rule
    for name in ("heads_per_position", "attn", "mlp", "residual"):
        assert_close(getattr(relevance, name), getattr(expected_relevance, name))
    assert relevance.heads.abs().amax() > 0
    # the embedding runs in a graph of its own (offloaded, or the hook's frame): no tokens gate there
    assert relevance.tokens is None and expected_relevance.tokens is not None
    if "model.embed_tokens" in case.device_map:     # Llama: the first layer's stream is the tokens alone
        assert_close(relevance.residual[..., 0], expected_relevance.tokens)
    assert_close(patching.scores, expected_patching.scores)


def test_attribution_of_a_dispatched_model_without_offload_equals_the_whole_models():
    """Hooks that only move inputs to each block's device trace into one graph: DLA works."""
    plain = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2)
    hooked = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    accelerate.dispatch_model(hooked, device_map, force_hooks=True)
    assert hooked.model.layers[0].self_attn.o_proj._hf_hook.execution_device == "cpu"
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    call = {"input_ids": ids, **CALL}
    dla = [attnfx.head_attribution(attnfx.instrument(model), call, 5, foil=9) for model in (hooked, plain)]
    assert_close(*dla)


def test_a_meta_model_without_offload_hooks_is_refused():
    with torch.device("meta"):
        model = build(FAMILIES["llama"], layers=1, heads=4, kv_heads=2)
    with pytest.raises(UnsupportedModelError, match="meta device"):
        attnfx.instrument(model)


def test_uninstrument_restores_accelerates_hooks(case):
    model = _load(case.path, case.device_map)
    hooked = {name: (m.__dict__.get("_hf_hook"), m.__dict__.get("forward")) for name, m in model.named_modules()}
    im = attnfx.instrument(model)
    block = next(name for name, where in case.device_map.items() if where == "disk" and name[-1].isdigit())
    changed = {name for name, m in model.named_modules() if m.__dict__.get("_hf_hook") is not hooked[name][0]}
    assert block in changed and model.get_submodule(block)._hf_hook.place_submodules   # loads its whole block
    assert im.uninstrument() is model
    assert {name: (m.__dict__.get("_hf_hook"), m.__dict__.get("forward")) for name, m in model.named_modules()} \
        == hooked
    with torch.no_grad():
        assert_close(model(case.ids, **CALL).logits, case.bare)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload to a GPU execution device needs CUDA")
def test_gpu_execution_with_cpu_and_disk_offload_equals_the_model_on_the_gpu(tmp_path):
    """On a GPU main device "cpu" blocks are offloaded too, loaded to cuda:0 at each call; the
    first parameter is then meta, and the model's device is where its hooks run it."""
    layers = 3
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "disk",
                  "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    build(FAMILIES["llama"], layers=layers, heads=4, kv_heads=2).save_pretrained(tmp_path)
    runs = []
    for model in (_load(tmp_path, device_map), _load(tmp_path).cuda()):
        im = attnfx.instrument(model)
        assert im.backend == "inductor"
        im.steering.scale(layer=1, head=0, factor=0.0)
        with torch.no_grad(), im.record("z") as rec:
            runs.append((im(torch.arange(1, 8, device="cuda")[None], **CALL).logits, rec["z"]))
    (logits, z), (expected_logits, expected_z) = runs
    assert_close(logits, expected_logits)
    for layer in range(layers):
        assert z[layer].device == torch.device("cuda", 0)
        assert_close(z[layer], expected_z[layer])


@pytest.mark.skipif(_ISOLATES_RECOMPILES, reason="torch >= 2.13 instruments offloaded models (tested above)")
def test_offloaded_blocks_are_refused_before_torch_2_13_and_the_hooks_kept(tmp_path):
    build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2).save_pretrained(tmp_path)
    offloaded = _load(tmp_path, DEVICE_MAPS["llama"][1])
    hooks = {name: module.__dict__.get("_hf_hook") for name, module in offloaded.named_modules()}
    with pytest.raises(UnsupportedModelError, match="torch 2.13"):
        attnfx.instrument(offloaded)
    assert {name: module.__dict__.get("_hf_hook") for name, module in offloaded.named_modules()} == hooks
