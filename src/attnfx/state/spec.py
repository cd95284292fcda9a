"""What a compiled graph must do beyond steering: the records it returns. One frozen Spec is
chosen per call, travels into the graph as a string constant of the state marker (dynamo
guards on it), and is parsed back by the backend."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

RECORD_KINDS = ("z", "readout", "contrib", "final_norm")
# Order of the runtime state tensors handed to the graph (the readout directions come next,
# only when "readout" is recorded, then one gate per probed component kind).
STEERING_STATE = ("q_scale", "v_scale", "v_scale_unbiased", "z_scale", "z_replace", "z_source")
# Components a probe gate can sit on (x ← x · gate, gate = 1 requiring grad: ∂f/∂gate = Σ x ⊙ ∂f/∂x).
PROBE_KINDS = ("tokens", "heads", "attn", "mlp", "resid")
# Components that can be patched (x ← lerp(x, source, w)), given an additive delta (x ← x + δ,
# δ = 0 requiring grad: ∂f/∂δ = ∂f/∂x) or captured (returned as a record): also the attention
# queries and keys, as the attention reads them.
COMPONENT_KINDS = PROBE_KINDS + ("queries", "keys", "values")
# The component kinds with a head axis ([b, t, H, d] per layer); the others are [b, t, d_model].
HEAD_KINDS = ("heads", "queries", "keys", "values")
# Captured only: each layer's masked attention logits [b, H, T, S] (fp32), and its attention
# statistics (log-sum-exp, mass on the key spans of state "stats_spans": passes/stats.py); the
# MLP's hidden activation and the stream it reads (blocks.py).
CAPTURE_ONLY = ("scores", "stats", "mlp_hidden", "resid_mid")
# Components a steering vector can be added to (x ← x + Σ_g m_g · v_lg: state vector_{kind}
# [L, G, d_model], group g's rows added at its positions m_g; "final": the final norm's input).
VECTOR_KINDS = ("resid", "attn", "mlp", "final")
# Position-selective steering (passes/positions.py): each position group's indices, whether it is
# every position, the call's first absolute position, and each head knob's group per (layer, head).
POSITION_STATE = ("where_index", "where_all", "where_offset", "at_q_scale", "at_v_scale",
                  "at_v_scale_unbiased", "at_z_scale", "at_z_replace")
NONE = -(2 ** 40)           # a where_index entry that matches no position, even after adding a length
# Backward rules of the lrp pass: AttnLRP, CP-LRP (q, k detached), or the plain gradient.
RULES = ("attnlrp", "cp-lrp", "gradient")
# And one that is no relevance rule: the gradient along the residual stream alone, every branch's
# reads held constant and every norm's σ frozen (direct logit attribution across graphs).
DIRECT = "direct"


@dataclass(frozen=True)
class Spec:
    discover: bool = False                       # only find sites; no state, no rewrite
    records: tuple[str, ...] = ()
    contrib_heads: tuple[tuple[int, int], ...] = ()   # (layer, head) pairs
    contrib_positions: tuple[int, ...] | None = None  # None: every position
    probes: tuple[str, ...] = ()                 # component kinds gated for attribution
    rule: str = "gradient"                       # backward rules when probed (the lrp pass)
    patches: tuple[str, ...] = ()                # component kinds patched from a runtime source
    deltas: tuple[str, ...] = ()                 # component kinds given an additive zero δ
    captures: tuple[str, ...] = ()               # component kinds returned as records
    capture_at: bool = False                     # captures read one position per row (state "capture_at" [b])
    capture_layers: tuple[int, ...] | None = None  # captured layers only (None: every layer)
    graddrop: bool = False                       # per-layer gradient switch on attn/MLP outputs
    value_unbiased: bool = False                 # on="value_unbiased" in use: κ = β·W_V + b_V in the graph
    vectors: tuple[str, ...] = ()                # kinds with a steering vector added (state vector_{kind} [L, G, d])
    positions: bool = False                      # some knob or vector acts on chosen positions only

    def __post_init__(self):
        unknown = sorted(set(self.records) - set(RECORD_KINDS))
        if unknown:
            raise ValueError(f"unknown record kind(s) {unknown}; expected any of {RECORD_KINDS}")
        unknown = sorted(set(self.probes) - set(PROBE_KINDS))
        if unknown:
            raise ValueError(f"unknown probe kind(s) {unknown}; expected any of {PROBE_KINDS}")
        unknown = sorted(set(self.patches + self.deltas) - set(COMPONENT_KINDS))
        unknown += sorted(set(self.captures) - set(COMPONENT_KINDS + CAPTURE_ONLY))
        if unknown:
            raise ValueError(f"unknown component kind(s) {unknown}; expected any of {COMPONENT_KINDS + CAPTURE_ONLY}")
        unknown = sorted(set(self.vectors) - set(VECTOR_KINDS))
        if unknown:
            raise ValueError(f"unknown steering vector kind(s) {unknown}; expected any of {VECTOR_KINDS}")
        if self.rule not in RULES + (DIRECT,):
            raise ValueError(f"unknown rule {self.rule!r}; expected one of {RULES + (DIRECT,)}")
        if self.capture_at and not self.captures:
            raise ValueError("capture_at selects positions of captures: name the captured kinds")
        if "contrib" in self.records and not self.contrib_heads:
            raise ValueError("recording 'contrib' needs contrib_heads=[(layer, head), ...]")

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, key: str) -> "Spec":
        raw = json.loads(key)
        raw["records"] = tuple(raw["records"])
        raw["contrib_heads"] = tuple(tuple(p) for p in raw["contrib_heads"])
        for name in ("probes", "patches", "deltas", "captures", "vectors"):
            raw[name] = tuple(raw[name])
        if raw["capture_layers"] is not None:
            raw["capture_layers"] = tuple(raw["capture_layers"])
        if raw["contrib_positions"] is not None:
            raw["contrib_positions"] = tuple(raw["contrib_positions"])
        return cls(**raw)

    def state_names(self) -> tuple[str, ...]:
        if self.discover:
            return ()
        readout = ("readout_directions",) if "readout" in self.records else ()
        return (STEERING_STATE + readout + tuple(gate_name(kind) for kind in self.probes)
                + tuple(name for kind in self.patches for name in (f"patch_w_{kind}", f"patch_src_{kind}"))
                + tuple(f"delta_{kind}" for kind in self.deltas) + (("grad_keep",) if self.graddrop else ())
                + (("capture_at",) if self.capture_at else ()) + (("stats_spans",) if "stats" in self.captures else ())
                + tuple(f"vector_{kind}" for kind in self.vectors) + (POSITION_STATE if self.positions else ()))

    def touches(self) -> bool:
        """Whether the probe pass has anything to do."""
        return bool(self.probes or self.patches or self.deltas or self.captures or self.graddrop or self.vectors)


def gate_name(kind: str) -> str:
    return f"gate_{kind}"


DISCOVER = Spec(discover=True)
PLAIN = Spec()
