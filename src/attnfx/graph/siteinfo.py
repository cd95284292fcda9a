"""What `im.sites` reports: one frozen SiteInfo per attention computation, the final norm's
description for attribution, and the table `print(im)` shows."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SiteInfo:
    """One instrumented attention computation, as `im.sites` reports it."""

    layer: int
    module_path: str
    pattern: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_model: int | None           # width of the output projection (None: projection not found)
    causal: bool | None           # declared is_causal; None when an explicit mask decides
    masked: bool
    o_proj: str | None            # parameter name of W_O
    value_bias: str | None        # parameter name of the bias that produces v, if any
    occurrence: int = 0
    scale: float | None = None    # the softmax scale on q·k (None: not a constant)
    kv_heads_read: int = 0        # heads of k and v as the attention reads them (after any repeat)
    stack: str | None = None      # "encoder" | "decoder" in an encoder–decoder graph, else None
    attends: str = "self"         # "self" | "cross" (keys and values from another stream)
    gated: bool = False           # W_O reads z ⊙ g (an elementwise gate): z records are pre-gate,
                                  # readouts and contributions use z ⊙ g
    extra_columns: int = 0        # score columns joined before the softmax and dropped after (sinks)
    shard: object = None          # tensor parallel: this process's HeadShard (counts above are global)


@dataclass(frozen=True)
class FinalNormInfo:
    """The path from the residual stream to the logits (attnfx.graph.unembed), parameters by name:
    logits = post(((offset + γ) ⊙ norm(x) + β) W_Uᵀ + b_U), then cap·tanh(·/cap) when softcap."""
    kind: str                     # "layer_norm" | "rms_norm" | "identity" (no final norm)
    eps: float
    weight: str | None            # parameter names
    unembed: str
    unembed_layout: str
    bias: str | None = None       # β of a final LayerNorm
    weight_offset: float = 0.0    # 1.0 for a (1 + w) gain
    unembed_bias: str | None = None
    post: tuple = ()              # after x̂ W_Uᵀ, innermost first: ("scale" | "inverse", float | name),
                                  # ("bias", name) — b_U included
    softcap: float | None = None  # the logits are cap·tanh(l/cap): DLA attributes l, the pre-cap logit
    stream: tuple | None = None   # the norm's input over its components (unembed.describe_stream)


@dataclass(frozen=True)
class GraphInfo:
    sites: tuple[SiteInfo, ...]
    final_norm: FinalNormInfo | None
    notes: tuple[str, ...]


_INDEX = re.compile(r"\[(\d+)\]")


def module_path(stack_path: str, module_names: set[str]) -> str:
    """dynamo's "L['self']._model_forward.__self__.model.layers[0].attn" → "model.layers.0.attn"."""
    parts = _INDEX.sub(r".\1", stack_path).split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in module_names:
            return candidate
    return ""


def format_sites(sites) -> str:
    header = ("layer", "module", "pattern", "role", "heads", "kv heads", "head dim", "mask", "W_O")
    rows = [header] + [(str(s.layer), s.module_path or "<root>", s.pattern,
                        " ".join(filter(None, (s.stack, s.attends))), str(s.num_heads),
                        str(s.num_kv_heads), str(s.head_dim),
                        "causal" if s.causal else ("explicit" if s.masked else "none"),
                        s.o_proj or "-") for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
