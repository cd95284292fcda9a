"""What a compiled graph must do beyond steering: the records it returns. One frozen Spec is
chosen per call, travels into the graph as a string constant of the state marker (dynamo
guards on it), and is parsed back by the backend."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

RECORD_KINDS = ("z", "readout", "contrib", "final_norm")
# Order of the runtime state tensors handed to the graph (the readout directions come last,
# only when "readout" is recorded).
STEERING_STATE = ("q_scale", "v_scale", "v_scale_unbiased", "z_scale", "z_replace", "z_source")


@dataclass(frozen=True)
class Spec:
    discover: bool = False                       # only find sites; no state, no rewrite
    records: tuple[str, ...] = ()
    contrib_heads: tuple[tuple[int, int], ...] = ()   # (layer, head) pairs
    contrib_positions: tuple[int, ...] | None = None  # None: every position

    def __post_init__(self):
        unknown = sorted(set(self.records) - set(RECORD_KINDS))
        if unknown:
            raise ValueError(f"unknown record kind(s) {unknown}; expected any of {RECORD_KINDS}")
        if "contrib" in self.records and not self.contrib_heads:
            raise ValueError("recording 'contrib' needs contrib_heads=[(layer, head), ...]")

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, key: str) -> "Spec":
        raw = json.loads(key)
        raw["records"] = tuple(raw["records"])
        raw["contrib_heads"] = tuple(tuple(p) for p in raw["contrib_heads"])
        if raw["contrib_positions"] is not None:
            raw["contrib_positions"] = tuple(raw["contrib_positions"])
        return cls(**raw)

    def state_names(self) -> tuple[str, ...]:
        if self.discover:
            return ()
        return STEERING_STATE + (("readout_directions",) if "readout" in self.records else ())


DISCOVER = Spec(discover=True)
PLAIN = Spec()
