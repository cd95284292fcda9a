"""Models dispatched by accelerate (`from_pretrained(device_map=...)`, `dispatch_model`).

accelerate moves each module's inputs to its execution device with an `AlignDevicesHook` on the
module (`module._hf_hook`, its forward wrapped). A block offloaded to CPU or disk keeps its
parameters on the meta device between calls, and the hook of each submodule holding tensors loads
them from a weights map before that submodule runs (`_onload_weights`, compiler-disabled) and
drops them after. Two consequences for attnfx:

* the meta parameters are not an unloaded model: `offloaded_tensors` names those a hook loads,
  and `execution_device` says where the model runs;
* a per-submodule load is a graph break before q_proj, k_proj, v_proj and o_proj: the graph
  holding the attention reads no parameter (so the layer cannot be told) and not W_O. `merge`
  gives each offloaded block one hook that loads the whole block before it runs (accelerate's own
  `preload_module_classes` form: `place_submodules=True`), from the same weights, to the same
  device, so the block's forward is one frame with its parameters as inputs. The block is the
  model's no-split class (`_no_split_modules`: HF's decoder layers) or, where a fully offloaded
  subtree holds none, the outermost module of that subtree;
* inside a block whose hook places (or loads) every tensor of it on one device, accelerate also
  hooks each submodule to move its inputs to that same device: a no-op `.to(device)` in the
  graph between z and W_O that hides the output projection. `merge` lifts those hooks too: the
  block's hook has already moved its inputs, and its tensors are all on that device. (A submodule
  also called from outside its block, with inputs on another device, would then fail loudly with
  torch's device-mismatch error instead of being moved.)

`Merged.restore()` puts back every hook attribute it changed, as it was; the weights are never
touched (offloaded ones stay on the meta device between calls, as accelerate leaves them).
"""
from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping

import torch
from torch import nn

_HOOK_ATTRIBUTES = ("_hf_hook", "_old_forward", "forward")


def _align_hooks(module) -> list:
    """The AlignDevicesHooks on a module (inside a SequentialHook too); [] without accelerate."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None or "accelerate.hooks" not in sys.modules:
        return []
    from accelerate.hooks import AlignDevicesHook, SequentialHook
    hooks = hook.hooks if isinstance(hook, SequentialHook) else (hook,)
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _loads(hook) -> bool:
    return bool(hook.offload) and hook.weights_map is not None


def offloaded_tensors(model: nn.Module) -> set[int]:
    """ids of the model's tensors that an accelerate hook loads before the module using them runs
    (on the meta device between calls: loaded, not missing)."""
    covered = set()
    for module in model.modules():
        for hook in _align_hooks(module):
            if _loads(hook):
                covered.update(id(t) for t in itertools.chain(module.parameters(recurse=hook.place_submodules),
                                                              module.buffers(recurse=hook.place_submodules)))
    return covered


def execution_device(model: nn.Module, name: str) -> torch.device | None:
    """Where an offloaded tensor `name` of the model is loaded to run: the execution device of
    the innermost hook that loads it; None when no hook does."""
    path = name.rsplit(".", 1)[0] if "." in name else ""
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        for hook in _align_hooks(module):
            if _loads(hook) and (depth == len(parts) or hook.place_submodules) and hook.execution_device is not None:
                device = hook.execution_device
                return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return None


def breaking_blocks(model: nn.Module) -> int:
    """How many blocks accelerate hooks when some load their weights in the hook: a graph break
    before each, after which every block runs the same frame (the hook's); 0 without offload."""
    hooks = [hook for module in model.modules() for hook in _align_hooks(module)]
    if not any(_loads(hook) for hook in hooks):
        return 0
    return sum(1 for hook in hooks if _loads(hook) or hook.place_submodules)


# ---- block-level offload -------------------------------------------------------------------
class _MergedWeights(Mapping):
    """The block's weights map: each name below the block read from the map of the submodule hook
    that loaded it (lazily: a disk-offloaded tensor is read when its block loads)."""

    def __init__(self, entries: dict):
        self._entries = entries                  # name below the block → (submodule's map, its name)

    def __getitem__(self, name):
        weights, key = self._entries[name]
        return weights[key]

    def __contains__(self, name):
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


class Merged:
    """The hooks `merge` replaced; `restore()` puts each module's hook attributes back."""

    def __init__(self, saved: list):
        self._saved = saved                      # (module, {attribute: value}) as before merging
        self.blocks = 0

    def restore(self) -> None:
        for module, attributes in reversed(self._saved):
            for name in _HOOK_ATTRIBUTES:
                module.__dict__.pop(name, None)
            module.__dict__.update(attributes)
        self._saved = []


def merge(model: nn.Module) -> Merged:
    """Give every offloaded block one loading hook (see the module); returns what to restore."""
    merged = Merged([])
    if not any("_hf_hook" in module.__dict__ for module in model.modules()):
        return merged                            # not dispatched by accelerate
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    for path, block in _blocks(model, no_split):
        _merge_block(block, merged)
        merged.blocks += 1
    for block in model.modules():
        hooks = _align_hooks(block)
        if len(hooks) == 1 and hooks[0].place_submodules and hooks[0].execution_device is not None:
            _lift_moves(block, hooks[0].execution_device, merged)
    return merged


def _lift_moves(block, device, merged: Merged) -> None:
    """Unhook the submodules whose only hook moves their inputs to the block's own device."""
    for module in block.modules():
        hook = module.__dict__.get("_hf_hook")
        hooks = _align_hooks(module)
        if module is block or hook is None or hooks != [hook]:
            continue
        if not (hook.offload or hook.place_submodules or hook.io_same_device) and \
                str(hook.execution_device) == str(device) and "_old_forward" in module.__dict__:
            merged._saved.append((module, _attributes(module)))
            _unhook(module)


def _blocks(model, no_split) -> list:
    """(path, module) of the outermost modules whose tensors are all loaded per submodule by
    offload hooks of one device, descending to the no-split modules they hold."""
    found = []
    for path, module in model.named_modules():
        if any(path.startswith(done + ".") for done, _ in found):
            continue
        if _per_submodule(module) and not any(m is not module and type(m).__name__ in no_split
                                              for m in module.modules()):
            found.append((path, module))
            if not path:                         # the whole model is one block
                break
    return found


def _per_submodule(block) -> bool:
    """Every submodule of `block` holding tensors loads them with its own offload hook, all for
    one device, and the block's own hook (if any) is a plain AlignDevicesHook; more than one
    submodule: a single one is block-level already."""
    hooked, devices = 0, set()
    for module in block.modules():
        hook, hooks = module.__dict__.get("_hf_hook"), _align_hooks(module)
        if hook is not None and hooks != [hook]:
            return False                         # another kind of hook (or a chain): left alone
        loads = [h for h in hooks if _loads(h) and not h.place_submodules]
        if _own_tensors(module, None):
            if not loads:
                return False
            hooked += 1
            devices.add((str(loads[0].execution_device), loads[0].offload_buffers))
        elif hooks and (_loads(hooks[0]) or hooks[0].place_submodules):
            return False
    return hooked > 1 and len(devices) == 1


def _own_tensors(module, hook) -> list:
    """The tensors the module's offload hook loads (its own parameters, and buffers if offloaded);
    without a hook, every tensor of its own."""
    from accelerate.utils import named_module_tensors
    include_buffers = True if hook is None else hook.offload_buffers
    return [name for name, _ in named_module_tensors(module, include_buffers=include_buffers,
                                                      remove_non_persistent=True)]


def _merge_block(block, merged: Merged) -> None:
    """One hook loading every tensor of the block, from the maps its submodules' hooks load them
    from, to their device; the block's own hook (moving its inputs, or loading its own tensors)
    is replaced, its input/output placement kept."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    entries, tied, first = {}, set(), None
    for below, module in block.named_modules():
        hooks = [h for h in _align_hooks(module) if _loads(h) and not h.place_submodules]
        if not hooks:
            continue
        hook, prefix = hooks[0], below + "." if below else ""
        first = first or hook
        entries.update({prefix + name: (hook.weights_map, name) for name in _own_tensors(module, hook)})
        tied.update(prefix + name for name in getattr(hook, "tied_params_names", ()))
        if module is not block:
            merged._saved.append((module, _attributes(module)))
            _unhook(module)
    placement = (_align_hooks(block) or [first])[0]
    merged._saved.append((block, _attributes(block)))
    hook = AlignDevicesHook(execution_device=first.execution_device, offload=True,
                            io_same_device=placement.io_same_device, weights_map=_MergedWeights(entries),
                            offload_buffers=first.offload_buffers, place_submodules=True,
                            skip_keys=placement.skip_keys, tied_params_map=first.tied_params_map)
    add_hook_to_module(block, hook)              # replaces the block's own hook, keeps its original forward
    hook.tied_params_names = tied                # init_hook sees meta tensors only: the submodules' own record


def _attributes(module) -> dict:
    return {name: module.__dict__[name] for name in _HOOK_ATTRIBUTES if name in module.__dict__}


def _unhook(module) -> None:
    """The module's forward as before accelerate hooked it, its tensors left as they are (meta:
    accelerate's remove_hook_from_module would load them back to their original devices)."""
    original = module.__dict__.pop("_old_forward")
    module.__dict__.pop("_hf_hook")
    module.__dict__.pop("forward", None)
    own = getattr(original, "__func__", None) is type(module).forward and getattr(original, "__self__", None) is module
    if not own:                           # a forward of its own before accelerate's: kept
        module.__dict__["forward"] = original
