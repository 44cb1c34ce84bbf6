"""Exit check with a vocabulary-parallel head: gathering the logits vs gathering earlyexit's statistics.

Per exit check, on every rank of a tensor-parallel group whose ranks each hold V / W rows of the head:

- ``gather_logits`` (what engines do today): local logits with a matmul, ``all_gather`` of the [N, V / W]
  logits, then softmax, max, top-2 and entropy over the [N, V] logits on every rank;
- ``earlyexit``: ``earlyexit.exit_check(..., group=)``: the local shard's statistics and one ``all_gather``
  of 7 int32 words per row.

For each, the bytes every rank receives in the all_gather (its output, own slice included) and the median
time of the whole check (the slowest rank's, rounds of the two interleaved, a barrier before each call),
plus the median time of each one's all_gather alone (``comm_ms``) and of its local part alone
(``local_ms``: the shard's logits matmul; the shard's ``exit_stats``). Rank 0 prints a table and writes a CSV
to benchmarks/out/. Usage:

    python benchmarks/bench_tp_exit.py                        # CPU: spawns 2 local ranks (gloo, loopback)
    torchrun --nproc-per-node 8 benchmarks/bench_tp_exit.py --backend nccl   # one rank per GPU
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from bench_utils import environment, format_table, write_csv

import earlyexit
from earlyexit.ops import backends

HEADS = {"full": ((576, 49152), (256, 128256)), "quick": ((64, 4096),)}
ROWS = {"full": (1, 8, 64, 256), "quick": (1, 8)}
EPS = 1e-6
COLUMNS = (
    "d",
    "V",
    "N",
    "world",
    "bytes_logits",
    "bytes_stats",
    "bytes_ratio",
    "ms_logits",
    "ms_stats",
    "speedup",
    "comm_ms_logits",
    "comm_ms_stats",
    "local_ms_logits",
    "local_ms_stats",
    "tokens_agree",
    "rounds",
)


def local_logits(hidden, weight, norm_weight):
    """[N, V/W] logits of this rank's shard: RMSNorm in float32, then a matmul in the head's dtype."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * norm_weight.float()
    return x.to(weight.dtype) @ weight.T


def gather_logits_check(hidden, weight, norm_weight, threshold, vocab_size, group):
    """The engines' way: [N, V/W] local logits, all_gather, then the statistics of the [N, V] logits."""
    z_local = local_logits(hidden, weight, norm_weight)
    parts = [torch.empty_like(z_local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, z_local, group=group)
    z = torch.cat(parts, -1)[:, :vocab_size].float()
    lse = torch.logsumexp(z, -1)
    top = z.topk(2, -1)
    p = torch.exp(z - lse[:, None])
    entropy = lse - (p * z).sum(-1)
    max_prob = torch.exp(top.values[:, 0] - lse)
    margin = max_prob - torch.exp(top.values[:, 1] - lse)
    return top.indices[:, 0], max_prob >= threshold, max_prob, margin, entropy, lse


def timed(fn, group, device):
    """Seconds of one call on the slowest rank (all ranks start together after a barrier)."""
    dist.barrier(group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return elapsed.item()


def interleaved_medians(fns, args, group, device, warmup=2):
    """Median seconds of each callable in ``fns``; one call of each per round, the order alternating.

    At least ``args.rounds`` rounds, then more until ``args.budget_s`` of timed calls (at most
    ``args.max_rounds``): small calls get many samples, which a loaded machine needs. The stopping rule reads
    only the all-reduced times, so every rank takes the same number of rounds.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    spent, i = 0.0, 0
    while i < args.rounds or (spent < args.budget_s and i < args.max_rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name], group, device))
            spent += times[name][-1]
        i += 1
    return {name: statistics.median(t) for name, t in times.items()}, i


def bench_head(d, vocab, rows_list, args, group, device):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shard = -(-vocab // world)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    weight = (torch.randn(shard, d, generator=g) / d**0.5 * 6).to(device, args.dtype)
    norm_weight = torch.ones(d, device=device, dtype=args.dtype)
    elem = torch.empty(0, dtype=args.dtype).element_size()
    out = []
    for n in rows_list:
        hidden = torch.randn(n, d, generator=torch.Generator().manual_seed(n)).to(device, args.dtype)  # replicated
        words = torch.zeros(7, n, dtype=torch.int32, device=device)
        logits = torch.zeros(n, shard, dtype=args.dtype, device=device)

        def ours(hidden=hidden):
            return earlyexit.exit_check(
                hidden,
                weight,
                args.threshold,
                norm_weight=norm_weight,
                norm_eps=EPS,
                group=group,
                vocab_size=vocab,
                backend=args.ee_backend,
            )

        def theirs(hidden=hidden):
            return gather_logits_check(hidden, weight, norm_weight, args.threshold, vocab, group)

        def ours_local(hidden=hidden):
            return earlyexit.exit_stats(
                hidden,
                weight,
                norm_weight=norm_weight,
                norm_eps=EPS,
                vocab_start=rank * shard,
                vocab_size=vocab,
                backend=args.ee_backend,
            )

        def gather(t):
            return lambda: dist.all_gather([torch.empty_like(t) for _ in range(world)], t, group=group)

        agree = bool(torch.equal(ours().token, theirs()[0]))
        fns = {
            "logits": theirs,
            "stats": ours,
            "comm_logits": gather(logits),
            "comm_stats": gather(words),
            "local_logits": lambda hidden=hidden: local_logits(hidden, weight, norm_weight),
            "local_stats": ours_local,
        }
        ms, rounds = interleaved_medians(fns, args, group, device)
        b_logits, b_stats = world * n * shard * elem, world * n * 7 * 4
        out.append(
            dict(
                d=d,
                V=vocab,
                N=n,
                world=world,
                bytes_logits=b_logits,
                bytes_stats=b_stats,
                bytes_ratio=b_stats / b_logits,
                ms_logits=ms["logits"] * 1e3,
                ms_stats=ms["stats"] * 1e3,
                speedup=ms["logits"] / ms["stats"],
                comm_ms_logits=ms["comm_logits"] * 1e3,
                comm_ms_stats=ms["comm_stats"] * 1e3,
                local_ms_logits=ms["local_logits"] * 1e3,
                local_ms_stats=ms["local_stats"] * 1e3,
                tokens_agree=agree,
                rounds=rounds,
            )
        )
        if rank == 0:
            print(format_table(out[-1:], COLUMNS).splitlines()[-1], flush=True)
    return out


def run(args, group):
    device = torch.device("cuda", torch.cuda.current_device()) if args.backend == "nccl" else torch.device("cpu")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ee_backend = backends.resolve(args.ee_backend, device.type)
    if rank == 0:
        print(
            f"# exit check over {world} ranks ({args.backend}), {args.dtype} head, earlyexit backend {ee_backend}, "
            f"{torch.get_num_threads()} threads/rank, >= {args.rounds} interleaved rounds; bytes = all_gather "
            f"output per rank; ms = median of the slowest rank",
            flush=True,
        )
        print(format_table([], COLUMNS), flush=True)
    rows = []
    for d, vocab in HEADS[args.set]:
        rows += bench_head(d, vocab, args.n or ROWS[args.set], args, group, device)
    if rank == 0:
        env = environment(device)
        for r in rows:
            r.update(backend=args.backend, dtype=str(args.dtype).replace("torch.", ""), ee_backend=ee_backend, **env)
        print()
        print(format_table(rows, COLUMNS))
        path = os.path.join(args.out, f"tp_exit_{args.backend}_w{world}_{env['device']}.csv")
        write_csv(path, rows)
        print(f"wrote {path}")


def _spawned(rank, world, store_path, args):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the spawned ranks talk over loopback only
    store = dist.FileStore(store_path, world)
    dist.init_process_group(args.backend, store=store, rank=rank, world_size=world)
    try:
        run(args, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"), help="torch.distributed backend")
    p.add_argument("--world", type=int, default=2, help="ranks to spawn when not started by torchrun")
    p.add_argument("--set", default="full", choices=tuple(HEADS), help="head sizes and N values")
    p.add_argument("--n", type=int, nargs="+", help="rows per check (default: those of --set)")
    p.add_argument("--rounds", type=int, default=15, help="at least this many interleaved rounds per row")
    p.add_argument("--budget-s", type=float, default=4.0, help="then more rounds until this much timed per row")
    p.add_argument("--max-rounds", type=int, default=200)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--ee-backend", default="auto", help="earlyexit backend of the statistics")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        if args.backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(args.backend, timeout=datetime.timedelta(minutes=5))
        try:
            run(args, dist.group.WORLD)
        finally:
            dist.destroy_process_group()
        return
    if args.backend == "nccl":
        sys.exit("--backend nccl: start it with torchrun, one rank per GPU")
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(
            _spawned, args=(args.world, os.path.join(tmp, "store"), args), nprocs=args.world, start_method="spawn"
        )


if __name__ == "__main__":
    main()
