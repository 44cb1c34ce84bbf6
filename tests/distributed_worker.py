"""Worlds of local processes for tests/test_distributed.py: a gloo group on the loopback interface, the sections
each rank runs in it, and the per-rank results handed back through files.

Processes come from a forkserver that has imported torch and earlyexit once, so a world starts in well under
a second instead of an import per rank. The group is rendezvoused through a FileStore in a temporary
directory (no port to pick), gloo is pinned to the loopback interface, and both the group's timeout and the
parent's join are bounded, so a rank that fails or hangs ends the world instead of the test run.
"""

import datetime
import os
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_cases import MEASURES, cases

import earlyexit
from earlyexit import distributed
from earlyexit.ops import backends

#: The group's timeout: a collective whose peer never comes raises after this long.
GROUP_TIMEOUT_S = 30
#: The parent kills a world still running after this long.
WORLD_DEADLINE_S = 100


def sharded_backends():
    """Backends that run every case here: the reference always, the C++ one once built."""
    return ["torch"] + (["cpu"] if backends.unavailable_reason("cpu", "cpu") is None else [])


def triton_runs():
    return backends.unavailable_reason("triton", "cpu") is None


def _error(e):
    return {"type": type(e).__name__, "message": str(e)}


def _check(case, rank, backend, measure, threshold, group=None):
    weight, _ = case.shard(rank)
    kw = case.sharded_kwargs(rank)
    res = earlyexit.exit_check(case.hidden, weight, threshold, measure=measure, backend=backend, group=group, **kw)
    return tuple(res)


def section_cases(rank, world):
    """Every case, backend, measure and threshold kind; plus this rank's local and merged statistics."""
    out = {}
    for name, case in cases(world).items():
        weight, _ = case.shard(rank)
        kw = case.sharded_kwargs(rank)
        entry = {"results": {}}
        for backend in sharded_backends():
            for measure in MEASURES:
                for kind, thr in case.thresholds(measure).items():
                    key = (backend, measure, kind)
                    entry["results"][key] = _check(case, rank, backend, measure, thr, dist.group.WORLD)
        if kw["vocab_start"] is None:
            kw["vocab_start"] = distributed.default_vocab_start(dist.group.WORLD, weight.shape[0])
        entry["local"] = tuple(earlyexit.exit_stats(case.hidden, weight, backend="torch", **kw))
        entry["merged"] = tuple(
            earlyexit.exit_stats(case.hidden, weight, backend="torch", group=dist.group.WORLD, **kw)
        )
        out[name] = entry
    return out


def section_triton(rank, world):
    """One tiny case on the Triton kernels (interpreted on CPU: slow, so one call)."""
    if not triton_runs():
        return None
    case = cases(world)["equal"]
    return _check(case, rank, "triton", "max_prob", 0.3, dist.group.WORLD)


def section_shards(rank, world):
    """check_shards on every case's layout (must pass) and on bad layouts (must raise, the same everywhere)."""
    out = {"good": {}, "bad": {}}
    for name, case in cases(world).items():
        start, rows = case.layout[rank]
        out["good"][name] = distributed.check_shards(None, start, rows, case.vocab_size)
    bad = {
        "gap": lambda r: (r * 10 + (r == world - 1), 10, world * 10),  # the last rank starts one late
        "overlap": lambda r: (r * 10 - (r == 1), 10 + (r == 1), world * 10),  # rank 1 starts one early
        "short": lambda r: (r * 10, 10, world * 10 + 5),  # nobody holds the last 5 ids
        "vocab_size_differs": lambda r: (r * 10, 10, world * 10 + r),
        "bad_rows": lambda r: (r * 10, -1 if r == 1 else 10, world * 10),
        "start_past_end": lambda r: (r * 10 if r else world * 10 + 1, 10, world * 10),
    }
    for name, layout in bad.items():
        try:
            distributed.check_shards(dist.group.WORLD, *layout(rank))
            out["bad"][name] = None
        except ValueError as e:
            out["bad"][name] = _error(e)
    return out


def section_n0_one_rank(rank, world):
    """Only rank 0 checks an empty batch; if that issued a collective, the next check would not match."""
    case = cases(world)["uneven"]
    empty = None
    if rank == 0:
        weight, _ = case.shard(rank)
        kw = case.sharded_kwargs(rank)
        empty = tuple(earlyexit.exit_check(case.hidden[:0], weight, 0.5, group=dist.group.WORLD, **kw))
    return {"empty": empty, "after": _check(case, rank, "torch", "max_prob", 0.3, dist.group.WORLD)}


def section_local_errors(rank, world):
    """Bad input raised on every rank before any collective (so no rank waits), then a check that still works."""
    case = cases(world)["uneven"]
    weight, bias = case.shard(rank)
    kw = case.sharded_kwargs(rank)
    vs = case.vocab_size
    bad = {
        "vocab_start_past_end": dict(kw, vocab_start=vs + 1),
        "vocab_start_negative": dict(kw, vocab_start=-1),
        "bias_shape": dict(kw, bias=torch.zeros(weight.shape[0] + 1)),
        "threshold_shape": dict(kw, threshold=torch.zeros(3, 3)),
        "measure": dict(kw, measure="top1"),
        "group_type": dict(kw, group="tp"),
    }
    out = {}
    for name, args in bad.items():
        args = {"threshold": 0.5, "group": dist.group.WORLD, **args}
        try:
            earlyexit.exit_check(case.hidden, weight, args.pop("threshold"), **args)
            out[name] = None
        except ValueError as e:
            out[name] = _error(e)
    out["after"] = _check(case, rank, "torch", "max_prob", 0.3, dist.group.WORLD)
    return out


def section_non_member(rank, world):
    """A group of ranks [0, 1]: the others are not members and must fail at once, while the members check."""
    group = dist.new_group([0, 1])  # every rank takes part in creating it
    case = cases(2)["uneven"]
    if rank < 2:
        return {"member": _check(case, rank, "torch", "max_prob", 0.3, group)}
    weight, _ = case.shard(0)
    try:
        earlyexit.exit_check(case.hidden, weight, 0.5, group=group, **case.sharded_kwargs(0))
        return {"non_member": None}
    except ValueError as e:
        return {"non_member": _error(e)}


def section_subgroups(rank, world):
    """Two disjoint groups at once, [1, 3] and [0, 2]: group ranks differ from global ranks."""
    groups = {(1, 3): dist.new_group([1, 3]), (0, 2): dist.new_group([0, 2])}
    members = (1, 3) if rank in (1, 3) else (0, 2)
    case = cases(2)["equal" if members == (1, 3) else "ties_reversed_ranks"]
    group_rank = members.index(rank)
    out = {"members": members, "result": _check(case, group_rank, "torch", "entropy", 1.5, groups[members])}
    other = groups[(0, 2) if members == (1, 3) else (1, 3)]
    try:
        _check(case, group_rank, "torch", "max_prob", 0.5, other)
        out["non_member"] = None
    except ValueError as e:
        out["non_member"] = _error(e)
    return out


def section_one_bad_rank(rank, world):
    """Rank 1 passes a bias of the wrong shape: it raises ValueError at once; the others, left waiting in the
    all_gather, must get an error when rank 1 leaves (or at the group timeout), not hang. Always the last."""
    case = cases(world)["uneven"]
    weight, bias = case.shard(rank)
    kw = case.sharded_kwargs(rank)
    if rank == 1:
        kw["bias"] = torch.zeros(weight.shape[0] + 1)
    t0 = time.monotonic()
    try:
        earlyexit.exit_check(case.hidden, weight, 0.5, group=dist.group.WORLD, **kw)
        return {"error": None}
    except (ValueError, RuntimeError) as e:
        return {"error": _error(e), "seconds": time.monotonic() - t0}


SECTIONS = {
    "cases": section_cases,
    "triton": section_triton,
    "shards": section_shards,
    "n0_one_rank": section_n0_one_rank,
    "local_errors": section_local_errors,
    "non_member": section_non_member,
    "subgroups": section_subgroups,
    "one_bad_rank": section_one_bad_rank,
}
#: What each world runs, in order (a section that leaves ranks out of step comes last).
PLAN = {
    2: ("cases", "shards", "triton", "n0_one_rank"),
    3: ("cases", "shards", "non_member", "local_errors", "one_bad_rank"),
    4: ("cases", "shards", "subgroups"),
}


def _rank_main(rank, world, store_path, out_dir, plan):
    # Loopback only: gloo would otherwise pick the interface of the host name.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    # As pyproject.toml's filterwarnings: the interpreter evaluates both sides of tl.where on NaN rows.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    results = {"sections": {}}
    path = os.path.join(out_dir, f"rank{rank}.pt")
    store = dist.FileStore(store_path, world)
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        for name in plan:
            try:
                results["sections"][name] = SECTIONS[name](rank, world)
            except Exception:
                # A failed section can leave the ranks out of step: stop here and report it.
                results["failed"] = (name, traceback.format_exc())
                break
            finally:
                torch.save(results, path)
    finally:
        dist.destroy_process_group()


def run_world(world, plan=None):
    """Run ``plan`` (default PLAN[world]) on ``world`` local ranks; returns one result dict per rank.

    Each dict: {"sections": {name: value}, "failed": (section, traceback) if one raised, "exitcode": int}.
    Raises RuntimeError if a rank did not finish within WORLD_DEADLINE_S (the stragglers are killed).
    """
    ctx = mp.get_context("forkserver")
    # torch._dynamo: the first call of a torch.library op imports it, seconds per process otherwise.
    ctx.set_forkserver_preload(["torch._dynamo", "distributed_worker"])
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, os.path.join(tmp, "store"), tmp, plan or PLAN[world])
        procs = [ctx.Process(target=_rank_main, args=(rank, *args), daemon=True) for rank in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + WORLD_DEADLINE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        stuck = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for rank in stuck:
            procs[rank].kill()
            procs[rank].join(5)
        if stuck:
            raise RuntimeError(f"world {world}: ranks {stuck} still running after {WORLD_DEADLINE_S} s, killed")
        out = []
        for rank, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{rank}.pt")
            res = torch.load(path, weights_only=False) if os.path.exists(path) else {"sections": {}}
            res["exitcode"] = p.exitcode
            out.append(res)
        return out
