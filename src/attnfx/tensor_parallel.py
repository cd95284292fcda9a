"""Heads split across processes by tensor parallelism (torch.distributed.tensor.parallel).

With the attention's projections sharded Megatron-style — q, k, v column-wise, the output
projection W_O row-wise (`parallelize_module(..., {"q_proj": ColwiseParallel(), …,
"o_proj": RowwiseParallel()})`, as HF's tp_plans lay them out) — each process computes a
contiguous run of heads, [offset, offset + H_local), and W_O's all-reduce sums them. The
attention the graph holds is that process's local one; attnfx reads the split off W_O, a DTensor
sharded along its input (head) axis, so that

- `im.sites` reports global head counts and steering takes global head indices: the per-head
  state stays [L, H_global] on every process and each process's graph reads its own rows;
- records with a head axis (z, q, k, v, the pattern, the attention statistics) are gathered
  from the group, in head order, so every process holds the full heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ShapeMismatchError, UnsupportedModelError

__all__ = ["HeadShard", "head_shard", "gather_heads", "refuse_sharded"]


@dataclass(frozen=True)
class HeadShard:
    """This process's heads of a tensor-parallel attention: query heads [offset, offset + heads)
    of `total`, kv heads [kv_offset, kv_offset + kv_heads) of `kv_total`, over `world` processes."""
    rank: int
    world: int
    offset: int
    heads: int
    total: int
    kv_offset: int
    kv_heads: int
    kv_total: int
    splits: tuple[int, ...] = ()        # every process's number of query heads, in rank order
    group: object = field(default=None, compare=False, repr=False)     # the mesh dimension's ProcessGroup

    def __repr__(self):
        return (f"HeadShard(rank {self.rank}/{self.world}: heads {self.offset}…{self.offset + self.heads - 1} "
                f"of {self.total}, kv heads {self.kv_offset}…{self.kv_offset + self.kv_heads - 1} of {self.kv_total})")


def _row_sharded(module, width: int):
    """(W_O, mesh, mesh dim): the attention module's 2-D DTensor parameter sharded along its input
    axis whose local input width is this process's heads' (H_local · d); None without one. The
    graph cannot name W_O here: its product runs on DTensors (from_local → linear → all-reduce)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:                                  # torch built without distributed
        return None
    found = []
    for weight in module.parameters():
        if isinstance(weight, DTensor) and weight.dim() == 2 and weight.to_local().shape[1] == width:
            dims = [i for i, p in enumerate(weight.placements) if isinstance(p, Shard) and p.dim in (1, -1)]
            found += [(weight, weight.device_mesh, dim) for dim in dims]
    if len(found) > 1:
        raise UnsupportedModelError(f"{len(found)} parameters of the attention module could be its W_O sharded "
                                    "along its heads; attnfx reads heads split over one")
    return found[0] if found else None


def head_shard(attention: nn.Module, heads: int, kv_heads: int, head_dim: int) -> HeadShard | None:
    """The split of a site's heads when its attention module's W_O [d_model, H·d_head] (out, in) is
    a DTensor sharded along its input axis; None when it is not. heads, kv_heads: the counts the
    local graph computes (H_local, H_kv_local)."""
    found = _row_sharded(attention, heads * head_dim)
    if found is None:
        return None
    o_weight, mesh, dim = found
    rank, world = mesh.get_local_rank(dim), mesh.size(dim)
    features = int(o_weight.shape[1])                      # global input width: H·d
    chunk = math.ceil(features / world)                    # DTensor's Shard splits as torch.chunk does
    start = min(rank * chunk, features)
    if features % head_dim or start % head_dim:
        raise UnsupportedModelError(
            f"W_O's {features} input features are split over {world} processes in pieces of {chunk}, which cut "
            f"heads of {head_dim}: shard attention by whole heads")
    total, offset = features // head_dim, start // head_dim
    if (offset * kv_heads) % heads or (total * kv_heads) % heads:
        raise UnsupportedModelError(f"the process with heads {offset}… holds {kv_heads} kv heads for {heads} query "
                                    "heads, not whole groups: shard a GQA attention by whole kv groups")
    splits = tuple((min((r + 1) * chunk, features) - min(r * chunk, features)) // head_dim for r in range(world))
    return HeadShard(rank, world, offset, heads, total, offset * kv_heads // heads, kv_heads,
                     total * kv_heads // heads, splits, mesh.get_group(dim))


def gather_heads(x: torch.Tensor, dim: int, shard: HeadShard) -> torch.Tensor:
    """Every process's heads of a record, concatenated in head order along `dim`: x holds this
    process's H_local query heads (or H_kv_local kv heads: k, v) there, the result all H (H_kv),
    e.g. z [b, t, H_local, d_head] → [b, t, H, d_head] (dim 2), pattern [b, H_local, t, s] →
    [b, H, t, s] (dim 1). A collective: every process of the group calls it with the same record
    (they run the same calls). Each process's count is known from the split: no extra exchange."""
    import torch.distributed as dist

    local = int(x.shape[dim])
    if local == shard.heads:
        sizes = shard.splits
    elif local == shard.kv_heads:
        sizes = tuple(n * shard.kv_total // shard.total for n in shard.splits)
    else:
        raise ShapeMismatchError(f"a record with {local} heads along dim {dim}; this process computes "
                                 f"{shard.heads} query heads and {shard.kv_heads} kv heads")
    x = x.contiguous()
    parts = [x.new_empty((*x.shape[:dim], size, *x.shape[dim + 1:])) for size in sizes]
    dist.all_gather(parts, x, group=shard.group)
    return torch.cat(parts, dim)


def refuse_sharded(im, analysis: str) -> None:
    """Analyses that differentiate through the heads or project them through W_O (relevance,
    patching, direct logit attribution) read per-head gates and weights as one process's graph
    cannot: refused, rather than computed from this process's heads alone."""
    sharded = [site.layer for site in (im._sites or ()) if site.shard is not None]
    if sharded:
        raise UnsupportedModelError(
            f"{analysis} on {type(im.model).__name__}: layer(s) {sharded} run tensor parallel (heads split across "
            "processes); steer and record it (records gather every head), or run the analysis on the unsharded "
            "model (or one sharded by device_map)")
