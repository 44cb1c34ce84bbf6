"""Reading the weights of a model sharded by transformers' tensor parallelism (``tp_plan="auto"``).

transformers wraps every sharded parameter as a ``DTensor``; in inference its linear layers run on the
local shards, so the decoder layers called one by one already compute the tensor-parallel model. What
:mod:`earlyexit.hf` needs on top is the exit head: the lm_head is sharded by vocabulary rows
(``Shard(0)``, torch.chunk layout: chunks of ceil(V / W) rows, so the last ranks can be short or empty),
and the exit check reads this rank's rows and merges per-row statistics over the shard's process group
(:func:`earlyexit.exit_check` with ``group=``) instead of gathering [N, V] logits.

This module knows DTensor layouts, not HF module names (those stay in ``model_adapter.py``).
"""

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed support: no parameter is ever a DTensor
    DTensor = None


def _is_dtensor(t):
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t):
    """This rank's part of ``t``: the local shard of a DTensor, ``t`` itself for a plain tensor (or None)."""
    return t.to_local() if _is_dtensor(t) else t


def local_rows(weight, rows):
    """Rows of this rank's shard of a [rows, ...] weight (``rows`` when it is not sharded by rows)."""
    return local_tensor(weight).shape[0] if _is_dtensor(weight) else rows


def vocab_shard(weight):
    """The vocabulary-parallel arguments of :func:`earlyexit.exit_check` for a head weight [V, d].

    Returns:
        {} for a plain tensor or a replicated DTensor; for a DTensor sharded by rows (``Shard(0)``) on one
        mesh dimension: ``dict(group=, vocab_start=, vocab_size=)`` (the shard's ProcessGroup, the global id
        of this rank's first row, V).

    Raises:
        ValueError: any other layout (e.g. a head sharded over d), or local rows that are not the
            torch.chunk share of this rank.
    """
    if not _is_dtensor(weight):
        return {}
    placements = tuple(weight.placements)
    sharded = [i for i, p in enumerate(placements) if p != Replicate()]
    if not sharded:
        return {}
    if len(sharded) > 1 or placements[sharded[0]] != Shard(0):
        raise ValueError(
            f"weight: the exit head must be sharded by vocabulary rows (Shard(0)) on one mesh dimension, "
            f"got placements {placements}"
        )
    mesh, dim = weight.device_mesh, sharded[0]
    vocab, world, rank = weight.shape[0], mesh.size(dim), mesh.get_local_rank(dim)
    chunk = -(-vocab // world)
    start = min(rank * chunk, vocab)
    local = weight.to_local().shape[0]
    if local != min(chunk, vocab - start):
        raise ValueError(
            f"weight: rank {rank} of {world} holds {local} vocabulary rows, expected the torch.chunk share "
            f"{min(chunk, vocab - start)} of {vocab}"
        )
    return dict(group=mesh.get_group(dim), vocab_start=start, vocab_size=vocab)


def check_heads_per_rank(local_features, head_dim, name):
    """ValueError unless projection ``name``'s local output (``local_features`` wide) holds whole heads."""
    if local_features % head_dim:
        raise ValueError(
            f"model: the tensor-parallel plan splits the attention heads of {name} across ranks "
            f"({local_features} local features, head_dim {head_dim}), which transformers cannot run. Use a "
            "world size that divides the numbers of query and key/value heads, or mark the attention "
            "projections 'replicate' in the tp_plan"
        )
