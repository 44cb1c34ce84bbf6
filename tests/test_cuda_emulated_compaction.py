"""The CUDA compaction kernels, run unchanged on the host emulator (tests/cuda_emu), without a GPU.

The harness launches compaction_kernel and scatter_rows_kernel (csrc/cuda/compaction_kernels.cuh) with
the launchers' grids for an H200's 132 SMs and their groups of kMaxTensors tensors; cub's block scan and
reduce are tests/cuda_emu/cub, which keep cub's contract strict (a reduction is defined in thread 0 only;
reusing temporary storage without a barrier corrupts other threads' inputs). Rows are moved as bytes, so
the oracle is exact: the public ops with backend="torch" on the same bytes. Checked here: compact,
partition and scatter over odd row counts (around the 256-row scan chunk) and row sizes, every mask
pattern, every access width (16/8/4/2/1 bytes), strided and misaligned rows, more tensors than one launch
takes, out-of-range scatter rows; that no byte outside the destination rows is written (the gaps of a
strided destination keep their contents); the same bits in every block and thread order; and an
AddressSanitizer/UBSan build.
"""

import functools

import pytest
import torch
from cuda_emulator import emulated_compaction, harness_fixtures

import earlyexit

HARNESS = "tests/cuda_emu/compaction_emu.cpp"
POISON = 0xAB


emu, emu_sanitized, run = harness_fixtures(HARNESS, emulated_compaction)


def mask_of(n, pattern, seed=0):
    """A keep mask as bytes (uint8 [n]): true is any nonzero byte, as a bool tensor may hold."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "random":
        keep = torch.rand(n, generator=g) < 0.5
    elif pattern == "all":
        keep = torch.ones(n, dtype=torch.bool)
    elif pattern == "none":
        keep = torch.zeros(n, dtype=torch.bool)
    else:  # alternating
        keep = torch.arange(n) % 2 == 0
    nonzero = torch.randint(1, 256, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
    return torch.where(keep, nonzero, torch.zeros_like(nonzero))


def byte_rows(rows, row_bytes, stride=None, seed=1, fill=None):
    """uint8 [rows, stride]: random bytes in each row's first row_bytes, POISON in the gap after them."""
    g = torch.Generator().manual_seed(seed)
    stride = stride or row_bytes
    buf = torch.full((rows, stride), POISON, dtype=torch.uint8)
    if fill is None:
        buf[:, :row_bytes] = torch.randint(0, 256, (rows, row_bytes), generator=g, dtype=torch.int32).to(torch.uint8)
    else:
        buf[:, :row_bytes] = fill
    return buf


def check_moves(op, mask, row_bytes, srcs, outs, index, count, dst_before):
    """outs, index and count equal the torch reference on the same bytes; every gap byte is untouched."""
    keep = mask != 0
    rows = [s[:, :rb] for (s, _), rb in zip(srcs, row_bytes)]
    if op == "compact":
        want, want_index = earlyexit.compact(keep, *rows, backend="torch")
    else:
        want, want_index, k = earlyexit.partition_rows(keep, *rows, backend="torch")
        assert count == int(k) == int(keep.sum())
    assert torch.equal(index, want_index), "index differs from the reference"
    for t, (got, rb) in enumerate(zip(outs, row_bytes)):
        assert torch.equal(got[: want[t].shape[0], :rb], want[t]), f"tensor {t}: moved rows differ"
        assert torch.equal(got[want[t].shape[0] :], dst_before[t][want[t].shape[0] :]), "rows past the output"
        assert torch.equal(got[:, rb:], dst_before[t][:, rb:]), f"tensor {t}: a gap byte was written"


def compaction_case(run, op, n, row_bytes, *, pattern="random", strides=None, shifts=None, order=0, seed=0):
    """Runs op on n rows of each of the tensors row_bytes (with destination strides/shifts) and checks it."""
    strides = strides or [None] * len(row_bytes)
    shifts = shifts or [0] * len(row_bytes)
    mask = mask_of(n, pattern, seed)
    out_rows = int((mask != 0).sum()) if op == "compact" else n
    srcs = [(byte_rows(n, rb, st, seed=seed + t), sh) for t, (rb, st, sh) in enumerate(zip(row_bytes, strides, shifts))]
    # Two rows more than the output: the kernels must leave them alone.
    dsts = [(byte_rows(out_rows + 2, rb, st, fill=POISON), sh) for rb, st, sh in zip(row_bytes, strides, shifts)]
    before = [d.clone() for d, _ in dsts]
    outs, index, count, plan = run(op, mask, row_bytes, srcs, dsts, index_rows=out_rows, order=order)
    check_moves(op, mask, row_bytes, srcs, outs, index, count, before)
    return plan


# Row counts around the 256-row scan chunk and the 16-row groups; row sizes of every access width, odd
# sizes and rows longer than one 1 KiB column chunk.
SHAPES = [(1, 1), (3, 24), (5, 8197), (16, 2), (255, 16), (256, 3), (257, 1000), (1000, 64), (4099, 8)]


@pytest.mark.parametrize("op", ["compact", "partition"])
@pytest.mark.parametrize("n,row_bytes", SHAPES)
def test_matches_the_reference(run, op, n, row_bytes):
    plan = compaction_case(run, op, n, [row_bytes], order=1)
    assert "grid=" in plan


@pytest.mark.parametrize("op", ["compact", "partition"])
@pytest.mark.parametrize("pattern", ["all", "none", "alternating"])
@pytest.mark.parametrize("n", [7, 300])
def test_mask_patterns(run, op, pattern, n):
    compaction_case(run, op, n, [12, 40], pattern=pattern)


def test_empty_mask(run):
    dst = (byte_rows(0, 8, fill=POISON), 0)
    outs, index, count, plan = run("partition", torch.zeros(0, dtype=torch.uint8), [8], [dst], [dst], index_rows=0)
    assert count == 0 and plan == "empty" and index.numel() == 0


@pytest.mark.parametrize("op", ["compact", "partition"])
def test_every_access_width_and_more_tensors_than_a_launch(run, op):
    # Ten tensors: two launches (kMaxTensors = 8), row sizes giving 16-, 8-, 4-, 2- and 1-byte accesses.
    sizes = [16, 8, 4, 2, 1, 48, 24, 12, 6, 3]
    plan = compaction_case(run, op, 300, sizes)
    widths = [int(w) for w in plan.split("vec=")[1].strip(",").split(",")]
    assert widths == [16, 8, 4, 2, 1, 16, 8, 4, 2, 1], plan


@pytest.mark.parametrize("op", ["compact", "partition"])
def test_strided_and_misaligned_rows(run, op):
    # Strides leave gaps the kernels must not write; shifts break 16-byte alignment down to 1 byte.
    plan = compaction_case(run, op, 270, [64, 64, 30], strides=[80, 72, 33], shifts=[0, 4, 1])
    assert plan.split("vec=")[1].strip(",") == "16,4,1", plan


@pytest.mark.parametrize("order", [0, 1, 2])
def test_same_bits_in_every_schedule(run, order):
    compaction_case(run, "partition", 700, [40, 8], order=order, seed=3)


def test_fewer_multiprocessors(emu, tmp_path):
    small = {"sms": 2, "smem_optin": 232448}  # few blocks: each covers several 16-row groups
    call = functools.partial(emulated_compaction, emu, str(tmp_path / "case"), device=small)
    plan = compaction_case(call, "partition", 2000, [24])
    assert "rows_per_block=" in plan and "rows_per_block=16 " not in plan, plan


def scatter_case(run, m, k, row_bytes, *, stride=None, shift=0, out_of_range=(), order=0):
    g = torch.Generator().manual_seed(5)
    index = torch.randperm(m, generator=g)[:k].to(torch.int64)
    for pos, value in out_of_range:
        index[pos] = value
    src = (byte_rows(k, row_bytes, stride, seed=7), shift)
    dest = (byte_rows(m, row_bytes, stride, seed=9), shift)
    before = dest[0].clone()
    outs, _, _, plan = run("scatter", index, [row_bytes], [src], [dest], order=order)
    want = before.clone()
    ok = (index >= 0) & (index < m)
    want[index[ok], :row_bytes] = src[0][ok, :row_bytes]
    assert torch.equal(outs[0], want), "scatter differs from dest[index] = src (in-range rows only)"
    return plan


@pytest.mark.parametrize("m,k,row_bytes", [(1, 1, 4), (10, 3, 1000), (300, 257, 12), (5000, 4000, 16)])
def test_scatter_matches_the_reference(run, m, k, row_bytes):
    scatter_case(run, m, k, row_bytes, order=1)


def test_scatter_strided_misaligned_and_out_of_range(run):
    plan = scatter_case(run, 400, 300, 36, stride=37, shift=3, out_of_range=[(0, -1), (5, 400), (299, 10**9)])
    assert plan.endswith("vec=1,"), plan


@pytest.mark.parametrize(
    "op,n,row_bytes,kw",
    [
        ("compact", 257, [24, 3], {}),
        ("partition", 300, [64, 30], {"strides": [80, 33], "shifts": [4, 1]}),
        ("partition", 40, [16, 8, 4, 2, 1, 48, 24, 12, 6], {}),
    ],
)
def test_sanitized_no_bad_access(emu_sanitized, tmp_path, op, n, row_bytes, kw):
    call = functools.partial(emulated_compaction, emu_sanitized, str(tmp_path / "case"))
    compaction_case(call, op, n, row_bytes, **kw)


def test_sanitized_scatter(emu_sanitized, tmp_path):
    call = functools.partial(emulated_compaction, emu_sanitized, str(tmp_path / "case"))
    scatter_case(call, 100, 60, 20, stride=23, shift=1, out_of_range=[(1, -5), (2, 100)])
