"""Pure analyses of a captured FX graph, by pattern (never by class name): `sites` (each attention
computation: q, k, v, z, W_O, heads, mask), `roles` (encoder / decoder, self / cross, by dataflow),
`blocks` (each layer's residual stream, attention and MLP outputs; the stream tree to the logits),
`norms` (LayerNorm / RMSNorm in any spelling), `unembed` (the final norm → unembedding path),
`lrp_plan` (which LRP rule applies to which node), `siteinfo` (what `im.sites` reports) and
`calls` (a call's arguments, its [batch, seq] and its logits). Nothing here changes a graph."""
