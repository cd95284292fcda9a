"""`instrument(model)`: the model's attention heads become explicit, steerable and recordable
nodes of its torch.compile graph (docs/design.md §1).

The wrapper's traced forward declares the state buffers to dynamo (the marker op) and calls the
wrapped model's own forward; the shared backend rewrites every captured graph (those dynamo
compiles after a graph break take the state at each call: capture/resumed.py). Each call runs
inside a call context that collects which sites ran and what they recorded, so a call that
dynamo ran without our graph (recompile limit, skipped frame) raises instead of returning plain
outputs. The wrapped model is never modified; its parameters are shared.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import sys
import types
import weakref
from dataclasses import replace

import torch
from torch import nn
from torch._dynamo.utils import counters

from .graph.calls import as_call as _as_call, batch_and_length
from .capture import dispatch
from .capture.checkpoint import side_effects_not_replayed
from .capture.backend import BACKENDS, MODES
from .capture.context import calling
from .capture.logging_calls import tolerant_logging
from .errors import (AlreadyInstrumentedError, AttnfxError, DetachedError, DeviceMismatchError, DTypeMismatchError,
                     InvalidArgumentError, NoAttentionFoundError, NotDiscoveredError,
                     UninstrumentedExecutionError, UnsupportedModelError)
from .graph.roles import site_roles
from .graph.sites import PATTERNS, example_value
from .state.spec import DISCOVER, PLAIN, STEERING_STATE, Spec
from .graph.siteinfo import FinalNormInfo, GraphInfo, SiteInfo, format_sites, module_path
from .tensor_parallel import head_shard
from .graph.unembed import final_norm_info, find_final_norm

__all__ = ["instrument", "InstrumentedModel", "SiteInfo", "FinalNormInfo"]


_LIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_TRACED: dict[tuple, types.FunctionType] = {}
_STRUCTURES: dict[tuple, int] = {}
_REGIONS: dict[tuple, object] = {}
# Regions with a recompile budget of their own: torch ≥ 2.13. On older torch the frames after a
# graph break share dynamo's budget with every other model (see _region).
_ISOLATES_RECOMPILES = "isolate_recompiles" in inspect.signature(torch._dynamo.eval_frame._optimize).parameters


def instrument(model: nn.Module, *, backend: str | None = None, example_inputs=None,
               fullgraph: bool = False, lower: bool = False) -> "InstrumentedModel":
    """Wrap `model` so its attention heads can be steered and recorded under torch.compile: an
    InstrumentedModel that takes and returns what `model` does (a causal LM: input_ids [b, t] →
    logits [b, t, vocab]), with per-head state [L, H] read by the compiled graph.

    backend: "inductor" (default on CUDA), "eager" (default on CPU: runs the rewritten graph
    directly) or "aot_eager". example_inputs (a tensor, tuple of args or dict of kwargs) finds the
    sites now; HF models get a 4-token input by default; otherwise sites are found on the first
    call. lower=True puts attnfx's fused attention op in place of SDPA calls whose masking it has
    (is_causal, or a causal / key-padding mask read off its construction: passes/mask_terms.py):
    the Triton kernel on CUDA; on CPU the reference unless
    `attnfx.ops.attention.set_attention_backend("triton")` (off by default until the kernel has
    been verified on a GPU).
    """
    if isinstance(model, InstrumentedModel):
        raise AlreadyInstrumentedError("this is already an InstrumentedModel; instrument the original model once")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    live = _LIVE.get(model)
    if live is not None and live() is not None and live()._attached:
        raise AlreadyInstrumentedError(
            f"{type(model).__name__} is already instrumented; call .uninstrument() on the first wrapper")
    _check_materialised(model)
    mode = _resolve_backend(backend, model)
    inputs = example_inputs if example_inputs is not None else _default_example_inputs(model)
    call = _as_call(inputs) if inputs is not None else None
    if call is not None:
        _check_token_ids(model, *call)
    merged = dispatch.merge(model)               # accelerate's offloaded blocks load once each (capture/dispatch.py)
    if not _ISOLATES_RECOMPILES and dispatch.breaking_blocks(model):
        merged.restore()
        raise UnsupportedModelError(
            f"{type(model).__name__} has blocks accelerate offloads: each block's hook is a graph break, and the "
            "frame after it (accelerate's new_forward, one code object for every hooked module) is recompiled per "
            f"module; attnfx gives it a recompile budget of its own from torch 2.13 (this is {torch.__version__}): "
            "upgrade torch, or load the model without offload")
    try:
        im = InstrumentedModel(model, mode, fullgraph, bool(lower), merged)
        if call is not None:
            im._discover(*call)
    except BaseException:
        merged.restore()
        raise
    _LIVE[model] = weakref.ref(im)
    return im


def _resolve_backend(backend, model) -> str:
    if backend is None:
        on_cuda = _model_device(model).type == "cuda" or \
            any(p.is_cuda for p in itertools.chain(model.parameters(), model.buffers()))
        return "inductor" if on_cuda else "eager"
    if backend not in MODES:
        raise InvalidArgumentError(f"backend must be one of {MODES}, got {backend!r}")
    return backend


def _check_materialised(model) -> None:
    """A meta-device model has shapes but no values: tracing it fails deep inside FakeTensor. Tensors
    an accelerate hook loads before their module runs (CPU/disk offload) are on meta between calls."""
    meta = [(name, t) for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if meta:
        loaded = dispatch.offloaded_tensors(model)
        meta = [name for name, t in meta if id(t) not in loaded]
    if meta:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {len(meta)} parameter(s)/buffer(s) on the meta device (first: {meta[0]}); "
            "load its weights first (e.g. model.to_empty(device=...) then load_state_dict, or from_pretrained)")


_TOKEN_ID_ARGUMENTS = ("input_ids", "decoder_input_ids")


def _check_token_ids(model, args, kwargs) -> None:
    """Token ids index an embedding: a float tensor there is a mistake, caught before dynamo traces it."""
    named = [(k, kwargs[k]) for k in _TOKEN_ID_ARGUMENTS if k in kwargs]
    if args and getattr(model, "main_input_name", None) in _TOKEN_ID_ARGUMENTS:
        named.append((model.main_input_name, args[0]))
    for name, value in named:
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise DTypeMismatchError(f"{name} must be an integer tensor of token ids, got {value.dtype}")


def _model_device(model) -> torch.device:
    """The device of the model's first tensor; for one accelerate offloads, where it runs."""
    first = next(itertools.chain(model.named_parameters(), model.named_buffers()), None)
    if first is None:
        return torch.device("cpu")
    name, tensor = first
    return (tensor.is_meta and dispatch.execution_device(model, name)) or tensor.device


def _default_example_inputs(model):
    """HF models take input_ids (and an encoder-decoder, decoder_input_ids: T5 will not make them
    from input_ids); four tokens are enough to find every site."""
    is_hf = type(model).__module__.startswith("transformers.") and hasattr(model, "config")
    if not is_hf or getattr(model, "main_input_name", None) != "input_ids":
        return None
    vocab = getattr(model.config, "vocab_size", None) or 4
    ids = torch.arange(1, 5, device=_model_device(model))[None] % vocab
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": ids}
    return {"input_ids": ids}


def _install_hf_output_hooks(model, kwargs) -> None:
    """transformers installs the forward hooks behind output_attentions / output_hidden_states on
    the first call that asks for them, under a threading lock that dynamo cannot trace: a graph
    break that would separate the attention from attnfx's state. When a call asks for them, install
    them just before it, with HF's own function, as that call would have."""
    config = getattr(model, "config", None)
    asked = any(k.startswith("output_") and v is not None and v is not False for k, v in kwargs.items()) or \
        any(getattr(config, f"output_{k}", False) for k in ("attentions", "hidden_states"))
    if not asked or "transformers" not in sys.modules:
        return
    from transformers import PreTrainedModel
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:                  # a transformers without lazily installed output hooks
        return
    # On the modules HF itself installs them on (GPT2LMHeadModel: its inner GPT2Model). Installing
    # from an outer model re-installs them on an inner one HF already hooked: every output twice.
    capturers = _CAPTURERS.get(model)
    if capturers is None:                # found once per model, not per decode step
        capturers = _CAPTURERS[model] = [m for m in model.modules()
                                         if isinstance(m, PreTrainedModel) and _captures_outputs(m)]
    for module in capturers:
        maybe_install_capturing_hooks(module)


_CAPTURERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model → its output-capturing submodels


def _captures_outputs(module) -> bool:
    """Whether the module's forward is wrapped by transformers' `capture_outputs` decorator."""
    fn = type(module).forward
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_qualname.startswith("capture_outputs."):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _move_under(state_dict, prefix: str, strip: bool) -> None:
    """Rename in place the entries under `prefix` (keys and their `_metadata`, whose keys are
    module paths): strip=True drops the "model." level, strip=False puts it back."""
    def renamed(path):                   # a path relative to prefix, "" for the wrapper itself
        if strip:
            return path[len("model."):] if path.startswith("model.") else ("" if path == "model" else None)
        return "model." + path if path else "model"
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = renamed(key[len(prefix):])
        if new is not None:
            state_dict[prefix + new] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        return
    scope = prefix[:-1]
    entries = {key: metadata.pop(key) for key in list(metadata) if key == scope or key.startswith(prefix)}
    for key, value in entries.items():
        new = renamed("" if key == scope else key[len(prefix):])
        if new is not None:
            metadata[(prefix + new) if new else scope] = value


def _state_dict_as_model(module, state_dict, prefix, local_metadata) -> None:
    _move_under(state_dict, prefix, strip=True)


def _state_dict_from_model(module, state_dict, prefix, *args) -> None:
    wrapper_form = {prefix + "model." + k for k in module.model.state_dict(keep_vars=True)}
    ours = [k for k in state_dict if k.startswith(prefix)]
    if not ours or not all(k in wrapper_form for k in ours):     # the model's form (what state_dict() gives)
        _move_under(state_dict, prefix, strip=False)


@functools.lru_cache(maxsize=None)
def _with_value_unbiased(spec: Spec) -> Spec:
    """The spec whose graph also holds κ; one object per spec, so `is` tells a change."""
    return replace(spec, value_unbiased=True)


def _fingerprint(model) -> tuple:
    """Structure of a model: instances with equal fingerprints can share compiled graphs. The
    config is part of it (HF models of equal shapes differ by attn_implementation, say)."""
    def sig(items):
        return tuple((n, tuple(t.shape), t.dtype, t.device.type) for n, t in items)
    return (type(model), str(getattr(model, "config", "")), sig(model.named_parameters()),
            sig(model.named_buffers()))


def _call_signature(args, kwargs) -> tuple:
    """What dynamo specialises a frame on besides values: argument names and types, and which
    tensor dims are 0/1. Calls that differ here get their own traced code object, so each keeps
    dynamo's whole recompile budget (prefill vs decode, batch 1 vs many, with/without a mask)."""
    def sig(value):
        if isinstance(value, torch.Tensor):
            return ("T", value.dim(), tuple(size <= 1 for size in value.shape))
        return type(value).__name__
    return (tuple(sig(a) for a in args), tuple(sorted((k, sig(v)) for k, v in kwargs.items())))


# Inputs whose dims 0 and 1 are batch and sequence (cache_position: dim 0 is the sequence).
_TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "labels", "inputs_embeds",
                 "cache_position", "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds")


def _mark_batch_and_sequence_dynamic(args, kwargs) -> None:
    """Compile batch and sequence sizes as symbols from the first call: dynamo would compile
    static, then again at a second length, then again at a second batch size. Sizes 0 and 1
    stay specialised (the call signature keeps them apart). maybe_: a model that branches on a
    size specialises it instead of failing."""
    tensors = [kwargs.get(name) for name in _TOKEN_INPUTS]
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        tensors.append(args[0])                       # input_ids passed positionally
    marks = [(tensor, (0, 1)) for tensor in tensors]
    for value in kwargs.values():                     # an HF KV cache: [batch, kv heads, length, head_dim]
        marks += [(tensor, (0, 2)) for tensor in _cache_tensors(value)]
    for tensor, dims in marks:
        if isinstance(tensor, torch.Tensor):
            for dim in dims:
                if dim < tensor.dim() and tensor.shape[dim] > 1:
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def _cache_tensors(cache) -> list:
    """The key and value tensors of an HF Cache (DynamicCache: .layers[i].keys/.values; an
    encoder-decoder cache holds two of them)."""
    caches = [getattr(cache, name, None) for name in ("self_attention_cache", "cross_attention_cache")]
    out = []
    for one in [cache, *caches]:
        for layer in getattr(one, "layers", None) or ():
            out += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    return out


@contextlib.contextmanager
def typed_errors():
    """An attnfx error raised inside the backend (a graph break before the attention, an
    unsupported layout) reaches the caller as itself, not wrapped in dynamo's BackendCompilerFailed."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as failed:
        if isinstance(failed.inner_exception, AttnfxError):
            raise failed.inner_exception from None
        raise


def _traced_forward(self, *args, **kwargs):
    """Template of the traced frame. Each (model structure, spec, backend) gets its own copy of
    this code object, so dynamo's per-code-object cache (and its recompile limit) is never
    shared by unrelated models or record modes; instances of one structure share graphs."""
    torch.ops.attnfx.declare_state([getattr(self, name) for name in self._state_names], self._spec_key)
    return self._model_forward(*args, **kwargs)


def _traced_function(key: tuple) -> types.FunctionType:
    fn = _TRACED.get(key)
    if fn is None:
        code = _traced_forward.__code__.replace(co_name=f"attnfx_traced_{len(_TRACED)}")
        fn = types.FunctionType(code, _traced_forward.__globals__, code.co_name)
        _TRACED[key] = fn
    return fn


def _recompile_limits_hit() -> int:
    """How many times dynamo has refused a frame for its recompile limit in this process."""
    return sum(n for msg, n in counters["unimplemented"].items() if "recompile limit" in msg.lower())


def _region(key: tuple, mode: str, fullgraph: bool, frames: int = 1):
    """dynamo's compile region of a traced frame, shared by the instances that share the frame.
    Isolated: the frames dynamo compiles inside it after a graph break (HF's shared decorator
    wrappers, a decoder layer's forward) keep their cache entries, and their recompile limit, per
    region. Shared with every other model and call, such a frame reaches the limit, and dynamo
    then runs it plain for good: its attention silently uninstrumented. frames: how many blocks
    run the one frame after a break (accelerate's per-block hooks: capture/dispatch.py); with a KV
    cache each specialises it on its layer index, so the region's limit is dynamo's per block."""
    region = _REGIONS.get(key)
    if region is None:
        isolated = {"isolate_recompiles": True} if _ISOLATES_RECOMPILES else {}
        if _ISOLATES_RECOMPILES and frames > 1:
            isolated["recompile_limit"] = torch._dynamo.config.recompile_limit * frames
        region = _REGIONS[key] = torch._dynamo.optimize(BACKENDS[mode], nopython=fullgraph, **isolated)
    return region


class InstrumentedModel(nn.Module):
    """A model whose heads are explicit graph nodes. Call it like the model (same arguments, same
    outputs: input_ids [b, t] → logits [b, t, vocab] for a causal LM); steer it through
    `.steering` (per-head knobs, state [L, H]), record with `.record(...)` (e.g. z [b, t, H, d_head]
    per layer), generate with `.generate(...)`."""

    def __init__(self, model: nn.Module, mode: str, fullgraph: bool, lower: bool = False, merged=None):
        super().__init__()
        from .state.steering import Steering

        self.model = model
        self._mode = mode
        self._fullgraph = fullgraph
        self._lower = lower
        self._model_forward = model.forward            # bound before anything could patch it
        self._fingerprint = _fingerprint(model)
        self._structure = _STRUCTURES.setdefault(self._fingerprint, len(_STRUCTURES))   # a small key for it
        self._set_spec(PLAIN)
        self._sites: tuple[SiteInfo, ...] | None = None
        self._layer_of: dict[tuple[str, int], int] = {}
        self._final_norm: FinalNormInfo | None = None
        self._graphs_per_call = 0                    # instrumented graphs one call runs (> 1: graph breaks)
        self._compiled: dict[tuple, object] = {}
        self._recording = None
        self._merged = merged                        # accelerate hooks merged per block, restored on detach
        self._attached = True
        self.steering = Steering(self)
        # The wrapper's state dict is the model's: keys without a "model." prefix, loadable both ways.
        self.register_state_dict_post_hook(_state_dict_as_model)
        self.register_load_state_dict_pre_hook(_state_dict_from_model)

    # ---- public surface -------------------------------------------------------------------
    @property
    def sites(self) -> tuple[SiteInfo, ...]:
        """The L attention sites, one SiteInfo per layer index 0 … L − 1 (the L of every [L, H]
        result); found on the first call (NotDiscoveredError before it, unless example_inputs)."""
        if self._sites is None:
            raise NotDiscoveredError("sites are found on the first call; call the model once "
                                     "or pass example_inputs= to attnfx.instrument")
        return self._sites

    @property
    def num_layers(self) -> int:
        """L: the number of attention sites (the first axis of [L, H] results and state)."""
        return len(self.sites)

    @property
    def final_norm(self) -> FinalNormInfo | None:
        """The path from the residual stream [b, t, d_model] to the logits [b, t, vocab] (its
        norm, unembedding, scales and soft-cap), or None when none was found."""
        self.sites
        return self._final_norm

    def forward(self, *args, **kwargs):
        """The wrapped model's forward, run by the instrumented graph: the model's own arguments
        and outputs (a causal LM: input_ids [b, t] → logits [b, t, vocab]), with the current
        steering applied and, inside `record`, the records of this call collected."""
        return self._call(args, kwargs)

    def generate(self, *args, **kwargs):
        """HF generation with steering (and recording) active in prefill and every decode step:
        `model.generate`'s arguments and result (input_ids [b, t] → token ids [b, t + n], n the new
        tokens); inside `record`, one entry of `rec.calls` per instrumented call (the prefill, then
        each decode step)."""
        self._check_attached()
        if not callable(getattr(self.model, "generate", None)):
            raise UnsupportedModelError(f"{type(self.model).__name__} has no generate()")
        model = self.model
        had_own = "forward" in model.__dict__
        previous = model.__dict__.get("forward")

        @functools.wraps(self._model_forward)
        def forward(*a, **k):
            return self._call(a, k)

        # generate() calls self(...) → forward, and reads forward's signature to decide what to
        # pass (position_ids, attention_mask, logits_to_keep): wraps keeps the model's own.
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and kwargs.get("encoder_outputs") is None:
            # HF runs the encoder itself (get_encoder()(...)), around forward: run it through the
            # instrumented graph instead, so encoder heads are steered (and recorded) too
            kwargs = dict(kwargs, encoder_outputs=self._encode(args, kwargs))
        model.forward = forward
        try:
            return model.generate(*args, **kwargs)
        finally:
            if had_own:
                model.forward = previous
            else:
                del model.forward

    def _encode(self, args, kwargs):
        """The encoder's output for generate(), from one instrumented call with a single decoder
        start token (the encoder's sites run in attnfx's graph; the decoder step is discarded)."""
        from transformers.modeling_outputs import BaseModelOutput

        model = self.model
        main = getattr(model, "main_input_name", "input_ids")
        inputs = kwargs.get(main, kwargs.get("inputs", args[0] if args else None))
        if not isinstance(inputs, torch.Tensor):
            raise InvalidArgumentError(f"generate() on an encoder-decoder needs {main} (a tensor)")
        start = getattr(model.generation_config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(model.config, "decoder_start_token_id", None) or 0
        call = {main: inputs, "decoder_input_ids": torch.full((inputs.shape[0], 1), int(start), device=inputs.device)}
        if kwargs.get("attention_mask") is not None:
            call["attention_mask"] = kwargs["attention_mask"]
        with torch.no_grad():
            out = self._call((), call)
        return BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state)

    def record(self, *kinds, directions=None, heads=None, positions=None, layers=None, spans=None):
        """Context manager: `with im.record("z", "readout", directions=R) as rec: im(x)`, a Recording
        (shapes per kind in attnfx.state.recording: e.g. z, a list over layers of [b, t, H, d_head]).
        directions: R [K, d_model] or [L, K, d_model] for "readout"; heads: (layer, head) pairs for
        "contrib"; positions: query positions kept by "contrib" and "pattern"; spans: key spans
        [n, 2] (start, end) for "attention_stats"; `layers` limits the per-layer components to those
        layers."""
        from .state.recording import Recording

        self._check_attached()
        return Recording(self, kinds, directions=directions, heads=heads, positions=positions, layers=layers,
                         spans=spans)

    def uninstrument(self) -> nn.Module:
        """Detach: the wrapper stops working, the model is returned as it was."""
        self._check_attached()
        self._attached = False
        self._compiled.clear()
        if self._merged is not None:
            self._merged.restore()
        _LIVE.pop(self.model, None)
        return self.model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if name.startswith("_") or model is None:
                raise
            return getattr(model, name)

    @property
    def backend(self) -> str:
        """The backend the rewritten graphs run on: "eager", "aot_eager" or "inductor"."""
        return self._mode

    def extra_repr(self) -> str:
        """The backend, as `print(im)` shows it after the module's name."""
        return "backend=" + self._mode

    def __repr__(self):
        if not self._attached:
            return f"InstrumentedModel({type(self.model).__name__}, detached: call attnfx.instrument(model) again)"
        if self._sites is None:
            return f"InstrumentedModel({type(self.model).__name__}, backend={self._mode}, sites not yet found)"
        return f"InstrumentedModel({type(self.model).__name__}, backend={self._mode})\n" + format_sites(self._sites)

    # ---- calls -----------------------------------------------------------------------------
    def _check_attached(self):
        if not self._attached:
            raise DetachedError("this InstrumentedModel was un-instrumented; call attnfx.instrument(model) again")

    def _set_spec(self, spec: Spec):
        self._spec = spec
        self._spec_key = spec.key()
        self._state_names = spec.state_names()

    def _compiled_for(self, key: tuple):
        fn = self._compiled.get(key)
        if fn is None:
            traced_key = self._traced_key(key)
            region = _region(traced_key, self._mode, self._fullgraph, dispatch.breaking_blocks(self.model))
            fn = region(types.MethodType(_traced_function(traced_key), self))
            self._compiled[key] = fn
        return fn

    def _traced_key(self, key: tuple) -> tuple:
        return (self._fingerprint, self._mode, self._fullgraph, self._lower) + key

    def _forget(self, key: tuple) -> None:
        """Drop a traced frame dynamo ran plain: dynamo marks a frame that hit its recompile
        limit as skipped for good, so the next call must trace a fresh code object."""
        self._compiled.pop(key, None)
        _TRACED.pop(self._traced_key(key), None)
        _REGIONS.pop(self._traced_key(key), None)

    def _call(self, args, kwargs):
        self._check_attached()
        if _model_device(self.model).type == "meta":     # moved to meta after instrument (one parameter: cheap)
            _check_materialised(self.model)
        _check_token_ids(self.model, args, kwargs)
        if self._sites is None:
            self._discover(args, kwargs)
        self._check_inputs(args, kwargs)
        _install_hf_output_hooks(self.model, kwargs)
        spec = self._recording.spec if self._recording is not None else PLAIN
        if self.steering.value_unbiased_in_use:
            spec = _with_value_unbiased(spec)
        if self.steering.vector_kinds:
            spec = replace(spec, vectors=self.steering.vector_kinds)
        if self.steering.positions.in_use:
            spec = replace(spec, positions=True)
            self.steering.positions.prepare(batch_and_length(args, kwargs)[0], kwargs)
        if spec is not self._spec:
            self._set_spec(spec)
        key = (self._spec_key, _call_signature(args, kwargs))
        if key not in self._compiled:          # marks only matter when dynamo compiles (~2 µs a tensor)
            _mark_batch_and_sequence_dynamic(args, kwargs)
        with calling(self) as ctx, tolerant_logging(), side_effects_not_replayed(), typed_errors():
            out = self._compiled_for(key)(*args, **kwargs)
        try:
            self._verify(ctx, kwargs)
        except UninstrumentedExecutionError:
            self._forget(key)
            raise
        if self._recording is not None:
            ctx.output, ctx.labels = out, kwargs.get("labels")
            device = _model_device(self.model)       # a dispatched model's layers record where they run
            ctx.records = [(key, value.to(device) if isinstance(value, torch.Tensor) else value)
                           for key, value in ctx.records]
            self._recording._collect(ctx)
        return out

    def _check_inputs(self, args, kwargs):
        device = _model_device(self.model)
        for value in itertools.chain(args, kwargs.values()):
            if isinstance(value, torch.Tensor) and value.device != device:
                raise DeviceMismatchError(f"input on {value.device}, model on {device}")
        self.steering._check_call(args, kwargs)

    def _verify(self, ctx, kwargs):
        ran = {info.layer for info in ctx.sites_run}
        expected = set(range(len(self._sites)))
        if kwargs.get("encoder_outputs") is not None:          # the encoder ran before (generate's steps)
            expected -= {site.layer for site in self._sites if site.stack == "encoder"}
        missing = sorted(expected - ran)
        if ctx.graphs_run == 0 or missing:
            raise UninstrumentedExecutionError(
                f"attention layer(s) {missing} ran without attnfx's graph: dynamo ran a frame plain "
                "(recompile limit torch._dynamo.config.recompile_limit hit, a skipped frame, or a graph "
                "break inside attention); refusing to return un-instrumented outputs")

    # ---- discovery (runs once, before any state exists) -----------------------------------
    def _discover(self, args, kwargs):
        self._set_spec(DISCOVER)
        key = (self._spec_key, _call_signature(args, kwargs))
        limits_hit = _recompile_limits_hit()
        try:
            with calling(self) as ctx, torch.no_grad(), tolerant_logging(), side_effects_not_replayed(), \
                    typed_errors():
                self._compiled_for(key)(*args, **kwargs)
        finally:
            self._set_spec(PLAIN)
        limited = _recompile_limits_hit() > limits_hit       # a frame past the limit ran plain: say so if it fails
        if ctx.graphs_run == 0 or (limited and not ctx.sites_run):
            self._forget(key)
            if limited:
                raise UninstrumentedExecutionError(
                    f"dynamo hit its recompile limit while capturing {type(self.model).__name__} (torch._dynamo."
                    f"config.recompile_limit = {torch._dynamo.config.recompile_limit}), so frames past it ran "
                    f"uncompiled and no attention could be found in the {ctx.graphs_run} graph(s) compiled: raise "
                    "the limit, or call torch._dynamo.reset() if earlier compiles in this process used it up")
            raise UninstrumentedExecutionError(
                f"dynamo did not compile {type(self.model).__name__}.forward (skipped or disabled), "
                "so attnfx cannot instrument it")
        infos = list({(i.module_path, i.occurrence): i for i in ctx.sites_run}.values())
        if not infos:
            notes = "; ".join(ctx.notes) or "no near-misses"
            raise NoAttentionFoundError(
                f"no attention found in {type(self.model).__name__}: searched the captured graph(s) for "
                f"{', '.join(PATTERNS)} (F.scaled_dot_product_attention, softmax(q @ kᵀ) @ v); {notes}")
        widest = tuple(max(values) for values in zip(*((i.num_heads, i.num_kv_heads, i.head_dim) for i in infos)))
        self._layer_of = {(i.module_path, i.occurrence): n for n, i in enumerate(infos)}
        self._sites = tuple(replace(i, layer=n) for n, i in enumerate(infos))
        self._final_norm = ctx.final_norm
        self._graphs_per_call = ctx.graphs_run
        self._allocate_state(*widest)

    def _allocate_state(self, heads: int, kv_heads: int, head_dim: int):
        """Per-head state [L, H, ...] sized for the widest layer: a layer with fewer heads (or a
        narrower head) reads its first H_l rows (and d_l columns)."""
        layers, device = len(self._sites), _model_device(self.model)
        shapes = {"q_scale": (layers, heads), "v_scale": (layers, kv_heads),
                  "v_scale_unbiased": (layers, kv_heads), "z_scale": (layers, heads),
                  "z_replace": (layers, heads), "z_source": (layers, 1, 1, heads, head_dim)}
        for name in STEERING_STATE:
            fill = 0.0 if name in ("z_replace", "z_source") else 1.0
            self.register_buffer(name, torch.full(shapes[name], fill, device=device), persistent=False)
        self.steering._mark_unbiased_identity()

    # ---- called by the backend at compile time ---------------------------------------------
    def _describe_graph(self, gm, example_inputs, found, notes, keys=None) -> GraphInfo:
        """keys: each site's (module path, occurrence) in the call, when the graph's own are
        relative to a frame that is not the model's (a graph after a graph break: capture/resumed.py)."""
        names = self._placeholder_names(gm, example_inputs)
        module_names = {name for name, _ in self.model.named_modules()}
        roles = site_roles(gm.graph, found, {node for node, name in names.items() if name is None})
        infos = []
        for n, (site, (stack, attends)) in enumerate(zip(found, roles)):
            path, occurrence = keys[n] if keys is not None else (
                module_path(site.module_stack_path, module_names), site.occurrence)
            o_val = example_value(site.o_weight) if site.o_weight is not None else None
            d_model = None if o_val is None else int(o_val.shape[0] if site.o_layout == "out_in" else o_val.shape[1])
            o_proj = names.get(site.o_weight)
            shard = head_shard(self.model.get_submodule(path) if path else self.model, site.num_heads,
                               site.num_kv_heads, site.head_dim)
            if shard is not None:                  # the graph computes this process's heads; report them all
                site.head_offset, site.kv_head_offset = shard.offset, shard.kv_offset
            heads, kv_heads = (shard.total, shard.kv_total) if shard is not None else (site.num_heads, site.num_kv_heads)
            infos.append(SiteInfo(
                layer=self._layer_of.get((path, occurrence), -1), module_path=path,
                pattern=site.pattern, num_heads=heads, num_kv_heads=kv_heads,
                head_dim=site.head_dim, d_model=d_model, causal=site.causal, masked=site.masked,
                o_proj=o_proj, value_bias=names.get(site.v_bias),
                occurrence=occurrence, scale=site.scale, kv_heads_read=site.kv_heads_read * heads // site.num_heads,
                stack=stack, attends=attends, gated=site.gate is not None,
                extra_columns=site.extra_columns, shard=shard))
        if self._sites is not None and any(i.layer < 0 for i in infos):
            raise NoAttentionFoundError(
                f"a recompiled graph holds attention sites not seen when the model was first instrumented: "
                f"{[i.module_path for i in infos if i.layer < 0]}")
        final = final_norm_info(gm.graph, found, names, [(i.module_path, i.occurrence) for i in infos])
        return GraphInfo(tuple(infos), final, tuple(notes))

    def _final_norm_input(self, gm):
        norm = find_final_norm(gm.graph)
        return None if norm is None else norm.input

    def _user_inputs(self, gm, example_inputs, state_nodes: set) -> set:
        """Placeholders that are call arguments: neither parameters, buffers nor attnfx state."""
        names = self._placeholder_names(gm, example_inputs)
        return {node for node, name in names.items() if name is None and node not in state_nodes}

    def _placeholder_names(self, gm, example_inputs) -> dict:
        by_id = {id(t): n for n, t in itertools.chain(
            self.model.named_parameters(remove_duplicate=False), self.model.named_buffers(remove_duplicate=False))}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        return {node: by_id.get(id(value)) for node, value in zip(placeholders, example_inputs)}
