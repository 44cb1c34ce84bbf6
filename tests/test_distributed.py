"""Exit checks over a process group (earlyexit.distributed): worlds of 2, 3 and 4 local gloo ranks.

Each world is started once (tests/distributed_worker.py) and runs every section; the tests below read its
per-rank results. A sharded check must give every rank the same bits, equal the single-device exit_check on the
unsharded head (tokens and decisions exactly, statistics within float32 rounding), and equal a single-process
merge of the same slices bit for bit.
"""

import functools
import math
import subprocess
import sys

import distributed_worker
import pytest
import torch
from distributed_cases import NONFINITE_ROWS, cases, huge_tie_sets

import earlyexit
from earlyexit import ExitResult, ExitStats, distributed

WORLDS = (2, 3, 4)


@functools.cache
def _world(n):
    return distributed_worker.run_world(n)


def section(n, name):
    """Per rank, the value section ``name`` returned in world ``n`` (fails the test if a rank failed)."""
    ranks = _world(n)
    for rank, res in enumerate(ranks):
        if "failed" in res:
            pytest.fail(f"world {n} rank {rank}: section {res['failed'][0]} raised\n{res['failed'][1]}")
        if res["exitcode"] != 0:
            pytest.fail(f"world {n} rank {rank}: exit code {res['exitcode']}")
    return [res["sections"][name] for res in ranks]


def _bits(x):
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32) if x.is_floating_point() else x


def assert_same_bits(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(_bits(x), _bits(y))


def single_device(case, threshold, measure, backend="torch"):
    return earlyexit.exit_check(
        case.hidden,
        case.weight,
        threshold,
        measure=measure,
        norm_weight=case.norm_weight,
        bias=case.bias,
        temperature=case.temperature,
        backend=backend,
    )


def assert_matches(got, want, threshold):
    """Tokens exactly; statistics within float32 rounding; decisions exactly unless the confidence is within
    rounding of the threshold."""
    got = ExitResult(*got)
    assert got.token.shape == want.token.shape
    assert torch.equal(got.token, want.token)
    for field in ("confidence", "max_prob", "margin", "entropy", "lse"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6, equal_nan=True)
    thr = torch.as_tensor(threshold, dtype=torch.float32).expand(want.confidence.shape)
    clear = ~((want.confidence - thr).abs() <= 1e-5 * thr.abs() + 1e-6)
    assert torch.equal(got.exit[clear], want.exit[clear])


def _case_params():
    return [pytest.param(w, name, id=f"w{w}-{name}") for w in WORLDS for name in cases(w)]


@pytest.mark.parametrize("world", WORLDS)
def test_world_runs_every_section(world):
    for rank, res in enumerate(_world(world)):
        assert res["exitcode"] == 0, f"rank {rank}"
        assert "failed" not in res, res.get("failed")
        assert tuple(res["sections"]) == distributed_worker.PLAN[world]


@pytest.mark.parametrize(("world", "name"), _case_params())
def test_sharded_equals_single_device(world, name):
    case = cases(world)[name]
    ranks = section(world, "cases")
    results = ranks[0][name]["results"]
    assert {k[0] for k in results} == set(distributed_worker.sharded_backends())
    for (backend, measure, kind), got in results.items():
        thr = case.thresholds(measure)[kind]
        assert_matches(got, single_device(case, thr, measure, backend), thr)


@pytest.mark.parametrize(("world", "name"), _case_params())
def test_every_rank_gets_the_same_bits(world, name):
    ranks = section(world, "cases")
    for rank in range(1, world):
        for key, got in ranks[rank][name]["results"].items():
            assert_same_bits(got, ranks[0][name]["results"][key])
        assert_same_bits(ranks[rank][name]["merged"], ranks[0][name]["merged"])


@pytest.mark.parametrize("world", WORLDS)
def test_gathered_merge_equals_single_process_merge(world):
    ranks = section(world, "cases")
    for name in cases(world):
        emulated = earlyexit.merge_exit_stats([ExitStats(*r[name]["local"]) for r in ranks])
        for r in ranks:
            assert_same_bits(r[name]["merged"], emulated)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["ties", "ties_reversed_ranks"])
def test_ties_across_shards_go_to_the_lowest_global_id(world, name):
    case = cases(world)[name]
    z = case.hidden.double() @ case.weight.double().T  # small integers: exact
    order = sorted(range(world), key=lambda r: case.layout[r][0])
    owner = torch.cat([torch.full((case.layout[r][1],), r) for r in order])
    for row in z:
        at_max = (row == row.max()).nonzero().flatten()
        assert len(set(owner[at_max].tolist())) >= 2, "the case must tie across shards"
    want = z.argmax(-1)  # the first maximum: the lowest id
    for r in section(world, "cases"):
        for got in r[name]["results"].values():
            assert torch.equal(got[0], want)


@pytest.mark.parametrize("world", WORLDS)
def test_padding_rows_are_ignored(world):
    case = cases(world)["padded"]
    padded_rows = sum(n for _, n in case.layout)
    assert padded_rows > case.vocab_size
    # With the zero padding rows counted, padding would win: every real logit is negative.
    padded_head = torch.cat([case.weight, case.weight.new_zeros(padded_rows - case.vocab_size, case.weight.shape[1])])
    assert (earlyexit.exit_check(case.hidden, padded_head, 0.5).token >= case.vocab_size).all()
    for name in ("padded", "all_padding_rank"):
        for r in section(world, "cases"):
            for got in r[name]["results"].values():
                assert ((got[0] >= 0) & (got[0] < cases(world)[name].vocab_size)).all()


@pytest.mark.parametrize("world", WORLDS)
def test_nonfinite_rows_never_exit_and_disturb_nothing(world):
    case = cases(world)["nonfinite"]
    bad = torch.zeros(case.hidden.shape[0], dtype=torch.bool)
    bad[list(NONFINITE_ROWS)] = True
    masked = case.layout[0][1]  # rank 0's columns all have a -inf bias
    for r in section(world, "cases"):
        for got in r["nonfinite"]["results"].values():
            got = ExitResult(*got)
            assert (got.token[bad] == -1).all() and not got.exit[bad].any()
            for x in got[2:]:
                assert x[bad].isnan().all() and x[~bad].isfinite().all()
            assert (got.token[~bad] >= masked).all()


@pytest.mark.parametrize("world", WORLDS)
def test_huge_logits_ties_are_exact(world):
    for r in section(world, "cases"):
        for got in r["huge_logits"]["results"].values():
            got = ExitResult(*got)
            for i, ids in enumerate(huge_tie_sets(world)):
                assert got.token[i] == min(ids)
                assert abs(got.max_prob[i].item() - 1 / len(ids)) <= 1e-6
                assert abs(got.margin[i].item()) <= 1e-6
                assert abs(got.entropy[i].item() - math.log(len(ids))) <= 1e-5
            assert abs(got.lse[-1].item() - (-2e4 + math.log(6))) <= 1e-2  # the row near -2e4: six ties


@pytest.mark.parametrize("world", WORLDS)
def test_empty_batch_returns_empty_results(world):
    for r in section(world, "cases"):
        for got in r["n0"]["results"].values():
            assert all(x.shape == (0,) for x in got)
    assert cases(world)["leading_dims"].hidden.dim() == 3
    for r in section(world, "cases"):
        for got in r["leading_dims"]["results"].values():
            assert all(x.shape == (2, 3) for x in got)


def test_empty_batch_issues_no_collective():
    # Only rank 0 checked an empty batch: had that issued a collective, the next check would not match.
    ranks = section(2, "n0_one_rank")
    assert all(x.shape == (0,) for x in ranks[0]["empty"])
    case = cases(2)["uneven"]
    for r in ranks:
        assert_matches(r["after"], single_device(case, 0.3, "max_prob"), 0.3)


@pytest.mark.parametrize("world", WORLDS)
def test_check_shards(world):
    ranks = section(world, "shards")
    for name, case in cases(world).items():
        for r in ranks:
            assert r["good"][name] == list(case.layout)
    for r in ranks[1:]:
        assert r["bad"] == ranks[0]["bad"], "every rank raises the same error"
    bad = {k: (v or {}).get("message") for k, v in ranks[0]["bad"].items()}
    last = world - 1
    assert bad["gap"] == f"vocab shards: gap at [{last * 10}, {last * 10 + 1}) between ranks {last - 1} and {last}"
    assert bad["overlap"] == "vocab shards: ranks 0 and 1 overlap at ids [9, 10)"
    assert bad["short"] == f"vocab shards: gap at [{world * 10}, {world * 10 + 5}) after rank {last}"
    assert bad["vocab_size_differs"].startswith("vocab_size: expected the same value on every rank")
    assert bad["bad_rows"].startswith("rows:") and "rank(s) [1]" in bad["bad_rows"]
    assert bad["start_past_end"].startswith("vocab_start:") and "rank(s) [0]" in bad["start_past_end"]


def test_non_member_raises_before_any_collective():
    ranks = section(3, "non_member")
    assert ranks[2]["non_member"]["type"] == "ValueError"
    assert ranks[2]["non_member"]["message"].startswith("group: this process (global rank 2) is not a member")
    case = cases(2)["uneven"]
    for r in ranks[:2]:
        assert_matches(r["member"], single_device(case, 0.3, "max_prob"), 0.3)


def test_bad_input_raises_on_every_rank_before_the_collective():
    names = {
        "vocab_start_past_end": "vocab_start",
        "vocab_start_negative": "vocab_start",
        "bias_shape": "bias",
        "threshold_shape": "threshold",
        "measure": "measure",
        "group_type": "group",
    }
    ranks = section(3, "local_errors")
    for r in ranks:
        for key, arg in names.items():
            assert r[key]["type"] == "ValueError" and r[key]["message"].startswith(f"{arg}:"), (key, r[key])
        # The ranks stayed in step: the next check works.
        assert_matches(r["after"], single_device(cases(3)["uneven"], 0.3, "max_prob"), 0.3)


def test_one_bad_rank_does_not_hang_the_others():
    ranks = section(3, "one_bad_rank")
    assert ranks[1]["error"]["type"] == "ValueError" and ranks[1]["error"]["message"].startswith("bias:")
    for rank in (0, 2):
        assert ranks[rank]["error"]["type"] in ("RuntimeError", "DistBackendError", "DistNetworkError")
        assert ranks[rank]["seconds"] < distributed_worker.GROUP_TIMEOUT_S + 5


def test_subgroups_use_group_ranks():
    ranks = section(4, "subgroups")
    for rank, r in enumerate(ranks):
        members = r["members"]
        case = cases(2)["equal" if members == (1, 3) else "ties_reversed_ranks"]
        assert_matches(r["result"], single_device(case, 1.5, "entropy"), 1.5)
        assert_same_bits(r["result"], ranks[members[0]]["result"])
        assert r["non_member"]["message"].startswith(f"group: this process (global rank {rank}) is not a member")


def test_triton_backend_tiny_case():
    if not distributed_worker.triton_runs():
        pytest.skip("triton cannot run here")
    got = section(2, "triton")
    case = cases(2)["equal"]
    for r in got:
        assert_matches(r, single_device(case, 0.3, "max_prob", "triton"), 0.3)
    assert_same_bits(got[0], got[1])


# Single-process checks: no group needed.


@pytest.mark.parametrize("n", [1, 2, 8])
def test_pack_roundtrip_is_bit_exact(n):
    ids = torch.tensor([-1, 0, 7, 2**31 - 1, 2**31 + 5, 2**40 + 3, 2**62, -(2**35)])[:n]
    f = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45, 3.4e38, -2e4])[:n]
    stats = ExitStats(f, ids, f.flip(0), f.roll(1), f.roll(2), torch.tensor([True, False] * 4)[:n])
    words = distributed._pack(stats)
    assert words.dtype == torch.int32 and words.shape == (7, n)
    assert_same_bits(distributed._unpack(words), stats)
    stacked = distributed._unpack(torch.stack([words, words.flip(1)]))  # [W, 7, N], as gathered
    assert_same_bits([x[1] for x in stacked], [x.flip(0) for x in stats])


@pytest.mark.parametrize(
    ("layout", "vocab_size", "problems"),
    [
        ([(0, 5), (5, 5)], 10, []),
        ([(5, 5), (0, 5)], 10, []),  # any rank order
        ([(0, 0), (0, 6), (6, 0), (6, 8)], 10, []),  # empty shards, padding at the end
        ([(0, 5), (5, 5), (10, 5)], 10, []),  # a rank of padding only
        ([(0, 5), (6, 4)], 10, ["gap at [5, 6) between ranks 0 and 1"]),
        ([(1, 9)], 10, ["gap at [0, 1) before rank 0"]),
        ([(0, 4), (4, 4)], 10, ["gap at [8, 10) after rank 1"]),
        ([(0, 0), (0, 0)], 10, ["gap at [0, 10): no rank holds a real vocabulary id"]),
        ([(0, 6), (5, 5)], 10, ["ranks 0 and 1 overlap at ids [5, 6)"]),
        ([(4, 6), (0, 6)], 10, ["ranks 0 and 1 overlap at ids [4, 6)"]),
    ],
)
def test_shard_layout_problems(layout, vocab_size, problems):
    assert distributed.shard_layout_problems(layout, vocab_size) == problems


def test_vocab_start_outside_the_vocabulary_raises():
    hidden, weight = torch.randn(3, 8), torch.randn(4, 8)
    for start in (-1, 11, 2.5):
        with pytest.raises(ValueError, match="^vocab_start:"):
            earlyexit.exit_stats(hidden, weight, vocab_start=start, vocab_size=10)
    earlyexit.exit_stats(hidden, weight, vocab_start=10, vocab_size=10)  # all padding: allowed


@pytest.mark.skipif(torch.distributed.is_initialized(), reason="needs an uninitialized torch.distributed")
def test_group_without_init_process_group_raises():
    with pytest.raises(ValueError, match="^group: torch.distributed is not initialized"):
        earlyexit.exit_check(torch.randn(3, 8), torch.randn(4, 8), 0.5, group=object())


NCCL_ONE_RANK = r"""
import sys, torch, torch.distributed as dist, earlyexit
dist.init_process_group("nccl", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1)
torch.cuda.set_device(0)
g = torch.Generator(device="cuda").manual_seed(0)
hidden = torch.randn(5, 256, device="cuda", generator=g).to(torch.bfloat16)
weight = (torch.randn(3000, 256, device="cuda", generator=g) / 16).to(torch.bfloat16)
norm = torch.rand(256, device="cuda", generator=g) + 0.5
for backend in ("triton", "cuda", "torch"):
    if earlyexit.ops.backends.unavailable_reason(backend, "cuda"):
        continue
    got = earlyexit.exit_check(hidden, weight, 0.2, norm_weight=norm, group=dist.group.WORLD, backend=backend)
    want = earlyexit.exit_check(hidden, weight, 0.2, norm_weight=norm, backend=backend)
    assert torch.equal(got.token, want.token) and torch.equal(got.exit, want.exit), backend
    torch.testing.assert_close(got.max_prob, want.max_prob, rtol=1e-5, atol=1e-6)
    print(backend, "ok")
dist.destroy_process_group()
"""


@pytest.mark.gpu
def test_nccl_on_one_gpu(tmp_path):
    """The NCCL path on CUDA tensors (one rank): packing, the collective and the merge on the device."""
    proc = subprocess.run(
        [sys.executable, "-c", NCCL_ONE_RANK, str(tmp_path / "store")], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout
