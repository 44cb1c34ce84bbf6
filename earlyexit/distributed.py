"""Exit checks over a torch.distributed process group whose ranks each hold a vocabulary shard of the head.

Engines gather the [N, V] logits to decide a token; an exit check needs five numbers per row and shard.
Each rank computes the :class:`earlyexit.ExitStats` of its shard, one ``all_gather`` moves them (the
argmax ids as exact int64 words, never through float32), and every rank merges them in rank order with
the same code, so all ranks hold bitwise identical statistics and take the same exit decisions: their
compaction and state propagation stay in lock step with no further communication. Any ProcessGroup
works (gloo on CPU tensors, NCCL on CUDA tensors; vLLM's or Megatron's tensor-parallel group, a
DeviceMesh's ``get_group()``).

Every rank must call with the same number of rows (``hidden`` is replicated): like any collective, a
mismatch is a programming error that the transport reports (gloo aborts the process), not a ValueError.
:func:`check_shards` checks the vocabulary layout once, at setup.
"""

import operator

import torch
import torch.distributed as dist

from earlyexit.ops.backends import resolve
from earlyexit.ops.exit_types import ExitResult, ExitStats
from earlyexit.ops.measures import get_head_measure
from earlyexit.ops.reference import finalize_stats, merge_stats


def check_member(group):
    """ValueError (naming ``group``) unless torch.distributed is initialized and this rank is in ``group``.

    Runs locally, with no communication, so a rank that is not a member fails before any collective
    instead of leaving the members waiting.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call init_process_group first)")
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        hint = " (pass mesh.get_group())" if type(group).__name__ == "DeviceMesh" else ""
        raise ValueError(f"group: expected a torch.distributed ProcessGroup, got {type(group).__name__}{hint}")
    try:
        rank = dist.get_rank(group)
    except (RuntimeError, ValueError):
        rank = -1
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")


def default_vocab_start(group, rows):
    """The equal-shard layout of vLLM and Megatron: rank r holds global rows [r * rows, (r + 1) * rows)."""
    return dist.get_rank(group) * rows


def _pack(stats):
    """[N] ExitStats fields -> the [7, N] int32 words on the wire.

    Rows: max_logit, second_logit, sum_exp, sum_exp_z (float32 bit patterns), argmax (the int64 as two int32
    halves: exact for any id, where a float32 lane would round ids above 2^24), invalid.
    """
    f32 = torch.stack([stats.max_logit, stats.second_logit, stats.sum_exp, stats.sum_exp_z]).view(torch.int32)
    ids = stats.argmax.contiguous().view(torch.int32).reshape(-1, 2).T
    return torch.cat([f32, ids, stats.invalid.to(torch.int32)[None]]).contiguous()


def _unpack(words):
    """The inverse of :func:`_pack`, bit for bit: [..., 7, N] int32 -> ExitStats of [..., N] fields."""
    f32 = words[..., :4, :].view(torch.float32)
    # A fresh [..., N, 2] tensor: a transposed view can pass as contiguous (N = 1) with strides view() rejects.
    argmax = torch.stack((words[..., 4, :], words[..., 5, :]), -1).view(torch.int64).squeeze(-1)
    return ExitStats(f32[..., 0, :], argmax, f32[..., 1, :], f32[..., 2, :], f32[..., 3, :], words[..., 6, :] != 0)


def all_gather_exit_stats(stats, group, backend="auto"):
    """The statistics of every rank's slice, merged in rank order, identical on every rank.

    Args:
        stats: this rank's :class:`earlyexit.ExitStats` (fields of any one shape, N elements, the same N on
            every rank; argmax as global vocabulary ids).
        group: the ProcessGroup (None: the default group); exactly one ``all_gather`` of 7 x N int32 words
            per rank (none when N = 0: every rank knows N, and gloo rejects empty tensors).
        backend: the exit check's backend, which also merges (see :func:`merge_gathered`).
    Returns:
        :class:`earlyexit.ExitStats` of the union of the ranks' slices, [N] fields.
    """
    flat, words = _gather(stats, group)
    return flat if words is None else merge_gathered(words, backend)


def all_gather_exit_check(stats, group, threshold, measure, backend="auto"):
    """The exit decision of every rank's slice: :func:`all_gather_exit_stats` and then
    :func:`earlyexit.finalize_exit_stats`; with the Triton backend one kernel after the collective.

    Args:
        stats, group, backend: as :func:`all_gather_exit_stats`. threshold: float32 [N]. measure: a head
            measure's name.
    Returns:
        :class:`earlyexit.ExitResult` of [N] fields, identical on every rank.
    """
    flat, words = _gather(stats, group)
    spec = get_head_measure(measure)
    if words is not None and _merges_in_triton(words, backend):
        from earlyexit.triton_kernels.merge_stats import merge_check_gathered_triton

        thr = threshold.reshape(-1).to(torch.float32).contiguous()
        return ExitResult(*merge_check_gathered_triton(words, thr, spec.code, spec.exit_above))
    merged = flat if words is None else merge_gathered(words, backend)
    return ExitResult(*finalize_stats(merged, threshold.reshape(-1), measure))


def _gather(stats, group):
    """(this rank's fields flattened to [N], the gathered words [W, 7, N] or None when N = 0)."""
    check_member(group)
    flat = ExitStats(*(x.reshape(-1) for x in stats))
    if flat.max_logit.numel() == 0:
        return flat, None
    words = _pack(flat)
    gathered = [torch.empty_like(words) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, words, group=group)
    return flat, torch.stack(gathered)


def _merges_in_triton(words, backend):
    """Whether ``backend`` (as :func:`earlyexit.ops.backends.resolve` takes it) is Triton for the words' device."""
    return resolve(backend, words.device.type) == "triton"


def merge_gathered(words, backend="auto"):
    """The merge of gathered words [W, 7, N] (rank order) into :class:`earlyexit.ExitStats` of [N] fields.

    When ``backend`` is (or "auto" picks, as on CUDA tensors) Triton, one kernel
    (``earlyexit.triton_kernels.merge_stats``); otherwise the unpack and
    :func:`~earlyexit.ops.reference.merge_stats`, whose rules it follows.
    """
    if _merges_in_triton(words, backend):
        from earlyexit.triton_kernels.merge_stats import merge_gathered_triton

        return ExitStats(*merge_gathered_triton(words))
    every = _unpack(words)  # [W, N] fields, unpacked at once
    return ExitStats(*merge_stats([ExitStats(*(x[r] for x in every)) for r in range(words.shape[0])]))


def max_over_ranks(values, group):
    """The elementwise max over the group's ranks of a few floats (one small all_reduce), as a list.

    For measurements that steer a choice every rank must make alike, such as exact mode's draft policy
    learning from wall-clock times: each rank's own clock would let ranks choose differently and then
    wait forever in different collectives.
    """
    t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def _collective_device(group):
    """Where the group's collectives take tensors: CPU for gloo/MPI (or a CPU backend in a mixed group)."""
    backend = str(dist.get_backend(group))
    if backend in ("gloo", "mpi") or "cpu:" in backend:
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


# Bits of the "bad argument" word each rank sends, so that every rank raises the same error.
_BAD_ARGS = (
    ("vocab_start", "an integer in [0, vocab_size]"),
    ("rows", "an integer >= 0"),
    ("vocab_size", "an integer >= 1"),
)


def _as_int(x):
    """x as a Python int if it is an integer that fits an int64 word (not a bool), else None."""
    if isinstance(x, bool):
        return None
    try:
        x = operator.index(x)
    except TypeError:
        return None
    return x if -(2**63) <= x < 2**63 else None


def _local_words(vocab_start, rows, vocab_size):
    """(vocab_start, rows, vocab_size, bad-argument bits) as int64 words, bad values sent as -1."""
    values = [_as_int(v) for v in (vocab_start, rows, vocab_size)]
    fits = [v is not None for v in values]
    vocab_start, rows, vocab_size = values
    ok = [
        fits[0] and vocab_start >= 0 and (not fits[2] or vocab_start <= vocab_size),
        fits[1] and rows >= 0,
        fits[2] and vocab_size >= 1,
    ]
    bad = sum(1 << i for i, good in enumerate(ok) if not good)
    return [v if f else -1 for v, f in zip(values, fits)] + [bad]


def shard_layout_problems(layout, vocab_size):
    """What is wrong with a vocabulary layout, as sentences naming ranks (empty: the layout is good).

    Args:
        layout: per group rank, (vocab_start, rows): rank r holds global ids [start, start + rows).
        vocab_size: int; ids >= vocab_size are padding (a shard may run past the end; only real ids count).
    Returns:
        A list of strings, each naming the offending ranks and ids: gaps and overlaps of the real ids.
    """
    real = sorted((start, min(start + rows, vocab_size), rank) for rank, (start, rows) in enumerate(layout))
    real = [(a, b, r) for a, b, r in real if b > a]
    problems = []
    if not real:
        return [f"gap at [0, {vocab_size}): no rank holds a real vocabulary id"]
    covered, owner = 0, None  # ids [0, covered) are held; owner holds id covered - 1
    for start, stop, rank in real:
        if start > covered:
            where = f"between ranks {owner} and {rank}" if owner is not None else f"before rank {rank}"
            problems.append(f"gap at [{covered}, {start}) {where}")
        elif start < covered:
            pair = sorted((owner, rank))
            problems.append(f"ranks {pair[0]} and {pair[1]} overlap at ids [{start}, {min(stop, covered)})")
        if stop > covered:
            covered, owner = stop, rank
    if covered < vocab_size:
        problems.append(f"gap at [{covered}, {vocab_size}) after rank {owner}")
    return problems


def check_shards(group, vocab_start, rows, vocab_size):
    """Check, once at setup, that the ranks' vocabulary shards tile [0, vocab_size) exactly.

    Call it on every rank of ``group`` with this rank's shard: global ids [vocab_start, vocab_start + rows)
    (``rows`` = ``weight.shape[0]``, possibly 0). Rows at ids >= vocab_size are padding (as vLLM pads its
    head with zero rows) and may only run past the end; shards may be uneven, empty, in any rank order.
    One small collective (an all_gather of 4 int64 words per rank).

    Args:
        group: the ProcessGroup (None: the default group).
        vocab_start, rows, vocab_size: ints; vocab_size must be the same on every rank.
    Returns:
        The layout: a list of (vocab_start, rows) per group rank.
    Raises:
        ValueError, the same on every rank: naming ``group`` (this rank is not a member: raised before the
        collective), an invalid argument and the ranks that passed it, or the gaps and overlaps between
        ranks ("vocab shards: ranks 1 and 2 overlap at ids [5, 8)").
    """
    check_member(group)
    words = torch.tensor(_local_words(vocab_start, rows, vocab_size), dtype=torch.int64)
    device = _collective_device(group)
    gathered = [torch.empty(4, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, words.to(device), group=group)
    table = [tuple(int(x) for x in w.tolist()) for w in gathered]
    for bit, (name, expected) in enumerate(_BAD_ARGS):
        ranks = [r for r, w in enumerate(table) if w[3] >> bit & 1]
        if ranks:
            raise ValueError(f"{name}: expected {expected}, got an invalid value on rank(s) {ranks}")
    sizes = {w[2] for w in table}
    if len(sizes) > 1:
        per_rank = ", ".join(f"rank {r}: {w[2]}" for r, w in enumerate(table))
        raise ValueError(f"vocab_size: expected the same value on every rank, got {per_rank}")
    layout = [(w[0], w[1]) for w in table]
    problems = shard_layout_problems(layout, table[0][2])
    if problems:
        raise ValueError("vocab shards: " + "; ".join(problems))
    return layout
