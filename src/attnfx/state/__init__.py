"""The per-model runtime state the user sets and reads, and what a compiled graph is specialised
on: `spec` (the frozen Spec of what a graph records and computes), `steering` (im.steering: the
knobs, written into the state buffers the graph reads), `positions` (positions= and rows=: the
position groups the graph turns into masks), `recording` (im.record(...): sorting the graph's
extra outputs), `probing` (the probe pass's gates, patches and captures for a call), `indices`
(layer / head / position arguments checked and normalised)."""
