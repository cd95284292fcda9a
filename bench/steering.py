"""Steering overhead, side by side on one model and input.

--workload compiled: a plain torch.compile'd Llama; attnfx (values of kv head 0 scaled, readouts
of all heads recorded) compiled with the same backend; and the hook way (eager pre-hooks on o_proj
that scale the o_proj input columns of the query heads sharing that kv head, under GQA the same
thing, and compute the readouts). Workloads: a prefill forward and greedy generate().

--workload generate: what a user of HF generate() sees: the bare model's own generate(), im.generate
with one head's values scaled (attnfx's default backend), the same steering as an eager pre-hook,
and nnsight's generate with the same edit at every step, if nnsight imports. GPT-2-small shape,
batch 8, 16 greedy tokens. Target: attnfx ≤ 1.05× the model's own generate.

Run: python bench/steering.py [--quick] [--workload compiled|generate|all]."""
import warnings
from contextlib import contextmanager

import torch
from torch._dynamo.utils import counters
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import attnfx
from _harness import bar_plot, bench, cli, parse_args, write_json

GPU_MODEL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000)      # ~1B Llama: large enough to be GPU-bound
CPU_MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=1024, vocab_size=1000)       # inductor compiles it in ~1 min on 2 cores
QUICK_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=100)
FULL = dict(prefill=(8, 256), prompt=(8, 32), new_tokens=32)
QUICK = dict(prefill=(2, 32), prompt=(2, 8), new_tokens=4)
STEER_LAYER, STEER_KV_HEAD, FACTOR = 0, 0, 2.0
COMPILE_CALLS = 3       # generate() recompiles for the decode shapes and dynamic KV length on calls 1-2
ATOL = 1e-4             # fp32 agreement of attnfx and hooks; low precision gets NOISE_FACTOR × plain's error
NOISE_FACTOR = 2        # FA's rule: within twice the compiled-vs-eager error of the unsteered model
TARGET = 1.05           # attnfx / plain on GPU


@contextmanager
def _hooks(model, directions, cols):
    """Eager pre-hooks on every o_proj: scale the input columns `cols` on STEER_LAYER, and
    collect the steered readouts z_h · W_O[:, h]ᵀ r of all heads ([b, t, H, K] per layer)."""
    heads, readouts, handles = model.config.num_attention_heads, [], []
    for i, layer in enumerate(model.model.layers):
        o_proj = layer.self_attn.o_proj
        u = (directions.to(o_proj.weight.dtype) @ o_proj.weight).unflatten(-1, (heads, -1)).float()  # [K, H, d]

        def pre_hook(module, args, u=u, steer=(i == STEER_LAYER)):
            z = args[0]                                                             # [b, t, H*d]
            if steer:
                z = z.clone()
                z[..., cols] *= FACTOR
            readouts.append(torch.einsum("bthd,khd->bthk", z.unflatten(-1, (heads, -1)).float(), u))
            return (z, *args[1:])
        handles.append(o_proj.register_forward_pre_hook(pre_hook))
    try:
        yield readouts
    finally:
        for handle in handles:
            handle.remove()


def setup(quick: bool, backend: str, gen: dict):
    """The model, and per provider a (prefill, decode) pair of callables."""
    cuda = torch.cuda.is_available()
    config = LlamaConfig(**(QUICK_MODEL if quick else GPU_MODEL if cuda else CPU_MODEL), attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to("cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32).eval()
    im = attnfx.instrument(model, backend=backend)
    im.steering.scale(STEER_LAYER, STEER_KV_HEAD, FACTOR, on="value")
    group = config.num_attention_heads // config.num_key_value_heads * config.head_dim  # o_proj columns of the kv group
    cols = slice(STEER_KV_HEAD * group, (STEER_KV_HEAD + 1) * group)
    r = torch.randn(1, config.hidden_size, device=model.device)
    r, compiled = r / r.norm(), torch.compile(model.forward, backend=backend)

    def recorded(fn):
        with im.record("readout", directions=r) as rec:
            return fn(), rec

    def hooked(fn):
        with _hooks(model, r, cols) as readouts:
            return fn(), readouts

    def plain_generate(prompt):
        model.forward = compiled             # generate() calls model.forward
        try:
            return model.generate(prompt, **gen)
        finally:
            del model.forward
    return model, {"plain": (lambda ids: compiled(input_ids=ids), plain_generate),
                   "attnfx": (lambda ids: recorded(lambda: im(input_ids=ids)),
                              lambda prompt: recorded(lambda: im.generate(prompt, **gen))),
                   "hooks": (lambda ids: hooked(lambda: model(input_ids=ids)),
                             lambda prompt: hooked(lambda: model.generate(prompt, **gen)))}


def check(model, fns, ids, prompt) -> dict:
    """attnfx must equal the hook-steered eager model before anything is timed: prefill logits
    and readouts, and (fp32) the generated tokens; steering must change the output."""
    plain = fns["plain"][0](ids).logits
    noise = (plain - model(input_ids=ids).logits).abs().max().item()
    limit = max(ATOL, NOISE_FACTOR * noise)
    (out, rec), (ref, readouts) = fns["attnfx"][0](ids), fns["hooks"][0](ids)
    errors = {"logits": (out.logits - ref.logits).abs().max().item(),
              "readout": (rec["readout"] - torch.stack(readouts, dim=2)).abs().max().item()}
    effect = (ref.logits - plain).abs().max().item()
    tokens_differ = int((fns["attnfx"][1](prompt)[0] != fns["hooks"][1](prompt)[0]).sum())
    if (any(not e <= limit for e in errors.values()) or not effect > limit
            or (tokens_differ and model.dtype == torch.float32)):
        raise AssertionError(f"attnfx disagrees with the hook reference, or steering had no effect: max errors "
                             f"{errors}, effect {effect:.1e} (limit {limit:.1e}), {tokens_differ} tokens differ")
    return {"max_abs_err": errors, "limit": limit, "steering_effect": effect,
            "unsteered_compiled_vs_eager": noise, "generated_tokens_differ": tokens_differ}


def measure(args, case: dict):
    """Checks, compiles, then times every provider on both workloads."""
    gen = dict(max_new_tokens=case["new_tokens"], min_new_tokens=case["new_tokens"], do_sample=False, pad_token_id=0)
    torch.manual_seed(0)
    model, fns = setup(args.quick, args.backend, gen)
    inputs = {w: torch.randint(1, model.config.vocab_size, case[k], device=model.device)
              for w, k in (("prefill", "prefill"), ("decode", "prompt"))}
    with torch.no_grad():
        correctness = check(model, fns, inputs["prefill"], inputs["decode"])
        for _ in range(COMPILE_CALLS):
            for f in fns.values():
                f[0](inputs["prefill"]), f[1](inputs["decode"])
        graphs = counters["stats"]["unique_graphs"]
        times = {w: bench({p: (lambda f=f: f[i](inputs[w])) for p, f in fns.items()}) for i, w in enumerate(inputs)}
    return model, times, {"correctness": correctness,
                          "recompiles_while_timing": counters["stats"]["unique_graphs"] - graphs}


GENERATE_MODEL = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)   # GPT-2 small
GENERATE_QUICK_MODEL = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=64)
GENERATE = dict(prompt=(8, 32), new_tokens=16)
GENERATE_QUICK = dict(prompt=(2, 8), new_tokens=4)
GENERATE_TARGET = 1.05  # attnfx / the model's own generate, on every device


def _nnsight_generate(model, cols, gen: dict):
    """nnsight's generate with the pre-hook's edit at every step, or None when nnsight is missing.
    A bounded iteration (one per generated token): statements after an open loop never run."""
    try:
        from nnsight import LanguageModel
    except ImportError:
        return None
    import attnfx.models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # LanguageModel's deprecation notice
        lm = LanguageModel(model, tokenizer=attnfx.models.load_tokenizer())   # ids go in as tensors
    c_proj = lm.transformer.h[STEER_LAYER].attn.c_proj

    def generate(ids, mask):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with lm.generate({"input_ids": ids, "attention_mask": mask}, **gen) as tracer:
                for _ in tracer.iter[:gen["max_new_tokens"]]:
                    c_proj.input[..., cols] *= FACTOR
                tokens = tracer.result.save()
        return tokens
    return generate


def measure_generate(args) -> dict:
    """Checks that every steered provider generates the same tokens, then times them all."""
    case = GENERATE_QUICK if args.quick else GENERATE
    gen = dict(max_new_tokens=case["new_tokens"], min_new_tokens=case["new_tokens"], do_sample=False,
               pad_token_id=0)
    torch.manual_seed(0)
    config = GPT2Config(**(GENERATE_QUICK_MODEL if args.quick else GENERATE_MODEL), pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    im = attnfx.instrument(model)
    im.steering.scale(STEER_LAYER, STEER_KV_HEAD, FACTOR, on="value")
    head_dim = config.n_embd // config.n_head
    cols = slice(STEER_KV_HEAD * head_dim, (STEER_KV_HEAD + 1) * head_dim)
    ids = torch.randint(1, config.vocab_size, case["prompt"])
    mask = torch.ones_like(ids)
    mask[1:, : case["prompt"][1] // 4] = 0                # left padding: the batched generate users run

    def pre_hook(module, hook_args):
        z = hook_args[0].clone()
        z[..., cols] *= FACTOR
        return (z, *hook_args[1:])

    def hooked():
        handle = model.transformer.h[STEER_LAYER].attn.c_proj.register_forward_pre_hook(pre_hook)
        try:
            return model.generate(ids, attention_mask=mask, **gen)
        finally:
            handle.remove()

    fns = {"plain": lambda: model.generate(ids, attention_mask=mask, **gen),
           "attnfx": lambda: im.generate(ids, attention_mask=mask, **gen),
           "hooks": hooked}
    twin = GPT2LMHeadModel(config).eval()                 # nnsight wraps every module of what it is given
    twin.load_state_dict(model.state_dict())
    nnsight = _nnsight_generate(twin, cols, gen)
    if nnsight is not None:
        fns["nnsight"] = lambda: nnsight(ids, mask)
    with torch.no_grad():
        tokens = {name: fn() for name, fn in fns.items()}      # also compiles attnfx's graphs
        disagree = {name: int((t != tokens["hooks"]).sum()) for name, t in tokens.items() if name != "plain"}
        changed = int((tokens["plain"] != tokens["hooks"]).sum())
        if any(disagree.values()):
            raise AssertionError(f"steered generations disagree with the hook reference: {disagree} tokens differ")
        graphs = counters["stats"]["unique_graphs"]
        times = bench(fns)
    return {"model": {"family": "gpt2", **config.to_diff_dict()}, "case": case, "times_ms": times,
            "ratios": {f"{p}/plain": times[p] / times["plain"] for p in fns if p != "plain"},
            "steering": dict(layer=STEER_LAYER, head=STEER_KV_HEAD, factor=FACTOR, on="value"),
            "attnfx_backend": im.backend, "tokens_changed_by_steering": changed,
            "tokens_differing_from_hooks": disagree,
            "recompiles_while_timing": counters["stats"]["unique_graphs"] - graphs,
            "nnsight": "timed" if nnsight is not None else "not installed"}


def main_generate(args):
    result = measure_generate(args)
    ratio = result["ratios"]["attnfx/plain"]
    result["target"] = {"attnfx/plain": GENERATE_TARGET, "met": ratio <= GENERATE_TARGET}
    path = write_json("steering_generate", result, args.out)
    case = result["case"]
    label = "generate {}×{} + {} tokens".format(*case["prompt"], case["new_tokens"])
    times = result["times_ms"]
    notes = {label: {p: f"{t:.4g} ms" + (f"\n{t / times['plain']:.3f}× plain" if p != "plain" else "")
                     for p, t in times.items()}}
    title = (f"{path.parent.name}\nGPT-2-small shape · attnfx backend {result['attnfx_backend']} · "
             f"{torch.get_num_threads()} thread(s)")
    bar_plot(path.with_suffix(".png"), title, {label: times}, notes)
    print(path, result["ratios"])


def main():
    parser = cli(__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                        help="torch.compile backend of both the plain and the attnfx model (compiled workload)")
    parser.add_argument("--workload", default="all", choices=("compiled", "generate", "all"))
    args = parse_args(parser)
    if args.workload in ("generate", "all"):
        main_generate(args)
    if args.workload in ("compiled", "all"):
        main_compiled(args)


def main_compiled(args):
    case = QUICK if args.quick else FULL
    model, times, checks = measure(args, case)
    ratios = {w: {f"{p}/plain": t[p] / t["plain"] for p in ("attnfx", "hooks")} for w, t in times.items()}
    met = all(r["attnfx/plain"] <= TARGET for r in ratios.values()) if model.device.type == "cuda" else None
    path = write_json("steering", {
        "backend": args.backend, "dtype": str(model.dtype), "model": model.config.to_diff_dict(), "case": case,
        "steering": dict(layer=STEER_LAYER, kv_head=STEER_KV_HEAD, factor=FACTOR, on="value", directions=1),
        "times_ms": times, "ratios": ratios, **checks,
        "target": {"attnfx/plain": TARGET, "applies_to": "cuda", "met": met}}, args.out)
    labels = {"prefill": "prefill {}×{}".format(*case["prefill"]),
              "decode": "decode {}×{} + {} tokens".format(*case["prompt"], case["new_tokens"])}
    notes = {labels[w]: {p: f"{t[p]:.3g} ms" + (f"\n{t[p] / t['plain']:.2f}× plain" if p != "plain" else "")
                         for p in t} for w, t in times.items()}
    title = f"{path.parent.name} · {args.backend} · {model.dtype} · {torch.get_num_threads()} thread(s)"
    bar_plot(path.with_suffix(".png"), title, {labels[w]: t for w, t in times.items()}, notes)
    print(path, ratios)


if __name__ == "__main__":
    main()
