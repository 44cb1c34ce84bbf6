"""Contract tests of compact, partition_rows and scatter_rows, run on every backend that can run here.

The oracle is plain boolean indexing (x[keep]), independent of the reference implementation.
"""

import pytest
import torch
from backend_matrix import runnable_backends

import earlyexit
from earlyexit import compact, partition_rows, scatter_rows
from earlyexit.ops.compaction import compact_op, partition_rows_op, scatter_rows_op

BACKENDS = runnable_backends()
DTYPES = [torch.bool, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32]
TRAILING = [(), (7,), (3, 5)]
SIZES = [0, 1, 5, 1000, 70000]
PATTERNS = ["all", "none", "alternating", "random"]


def make_keep(n, pattern, device):
    if pattern == "all":
        keep = torch.ones(n, dtype=torch.bool)
    elif pattern == "none":
        keep = torch.zeros(n, dtype=torch.bool)
    elif pattern == "alternating":
        keep = torch.arange(n) % 2 == 0
    else:
        keep = torch.rand(n) < 0.4
    return keep.to(device)


def random_rows(shape, dtype):
    if dtype == torch.bool:
        return torch.rand(shape) < 0.5
    if dtype in (torch.int32, torch.int64):
        return torch.randint(-(2**30), 2**30, shape, dtype=dtype)
    return torch.randn(shape).to(dtype)


def make_tensors(n, device):
    """One tensor per (dtype, trailing shape), many of them non-contiguous.

    Every other tensor is a dim-0 slice with stride 2 (rows strided, trailing dense); (3, 5) tensors of
    every third dtype are transposed views (trailing dims not dense).
    """
    tensors = []
    for i, dtype in enumerate(DTYPES):
        for trailing in TRAILING:
            if trailing == (3, 5) and i % 3 == 0:
                x = random_rows((n, 5, 3), dtype).transpose(1, 2)
            elif (i + len(trailing)) % 2:
                x = random_rows((2 * n, *trailing), dtype)[::2]
            else:
                x = random_rows((n, *trailing), dtype)
            tensors.append(x.to(device))
    return tensors


def cases():
    """(backend, device, n) params; the Triton interpreter keeps to N <= 1000."""
    out = []
    for p in BACKENDS:
        name, device = p.values
        for n in SIZES:
            if name == "triton" and device == "cpu" and n > 1000:
                continue
            out.append(pytest.param(name, device, n, id=f"{p.id}-N{n}", marks=p.marks))
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("backend", "device", "n"), cases())
def test_compact(backend, device, n, pattern):
    keep = make_keep(n, pattern, device)
    tensors = make_tensors(n, device)
    packed, index = compact(keep, *tensors, backend=backend)
    assert isinstance(packed, tuple) and len(packed) == len(tensors)
    assert index.dtype == torch.int64 and index.device == keep.device
    assert torch.equal(index.cpu(), torch.nonzero(keep.cpu()).reshape(-1))
    for p, x in zip(packed, tensors):
        assert p.dtype == x.dtype and p.is_contiguous()
        assert torch.equal(p.cpu(), x.cpu()[keep.cpu()])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(("backend", "device", "n"), cases())
def test_partition_rows(backend, device, n, pattern):
    keep = make_keep(n, pattern, device)
    tensors = make_tensors(n, device)
    parts, perm, count = partition_rows(keep, *tensors, backend=backend)
    k_cpu = keep.cpu()
    expected_perm = torch.cat([torch.nonzero(k_cpu), torch.nonzero(~k_cpu)]).reshape(-1)
    assert perm.dtype == torch.int64 and perm.device == keep.device
    assert torch.equal(perm.cpu(), expected_perm)
    assert count.dtype == torch.int64 and count.dim() == 0 and count.device == keep.device
    assert int(count) == int(k_cpu.sum())
    for p, x in zip(parts, tensors):
        assert p.shape == x.shape and p.dtype == x.dtype
        assert torch.equal(p.cpu(), x.cpu()[expected_perm])


@pytest.mark.parametrize(("backend", "device"), [p.values for p in BACKENDS], ids=[p.id for p in BACKENDS])
def test_partition_rows_out(backend, device):
    n = 37
    keep = make_keep(n, "random", device)
    tensors = make_tensors(n, device)
    # One preallocated output is itself not dense per row (a transposed view): it must still be filled.
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in tensors]
    out[-1] = torch.empty(n, 5, 3, dtype=tensors[-1].dtype, device=device).transpose(1, 2)
    ptrs = [o.data_ptr() for o in out]
    parts, perm, _ = partition_rows(keep, *tensors, out=tuple(out), backend=backend)
    assert all(p is o for p, o in zip(parts, out))
    assert [p.data_ptr() for p in parts] == ptrs
    for p, x in zip(parts, tensors):
        assert torch.equal(p.cpu(), x.cpu()[perm.cpu()])


@pytest.mark.parametrize(("backend", "device"), [p.values for p in BACKENDS], ids=[p.id for p in BACKENDS])
@pytest.mark.parametrize("n", [6, 20000])
def test_mask_bytes_other_than_one_keep_their_rows(backend, device, n):
    # A bool tensor viewed from bytes can hold 2..255: any nonzero byte keeps its row, as in torch's own ops.
    # The C++ kernel once added the raw bytes up, wrote past the index and lost rows.
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8) * (torch.rand(n) < 0.4)
    keep = raw.view(torch.bool).to(device)
    rows = torch.arange(n, dtype=torch.float32, device=device)
    kept = (raw != 0).nonzero().reshape(-1)
    (packed,), index = compact(keep, rows, backend=backend)
    assert torch.equal(index.cpu(), kept) and torch.equal(packed.cpu(), kept.float())
    (parts,), perm, count = partition_rows(keep, rows, backend=backend)
    expected = torch.cat([kept, (raw == 0).nonzero().reshape(-1)])
    assert (
        int(count) == kept.numel() and torch.equal(perm.cpu(), expected) and torch.equal(parts.cpu(), expected.float())
    )


@pytest.mark.parametrize(("backend", "device"), [p.values for p in BACKENDS], ids=[p.id for p in BACKENDS])
def test_no_tensors_gives_index_and_perm_only(backend, device):
    keep = make_keep(41, "random", device)
    packed, index = compact(keep, backend=backend)
    parts, perm, count = partition_rows(keep, backend=backend)
    k = keep.cpu()
    assert packed == () and parts == ()
    assert torch.equal(index.cpu(), torch.nonzero(k).reshape(-1))
    assert torch.equal(perm.cpu(), torch.cat([torch.nonzero(k), torch.nonzero(~k)]).reshape(-1))
    assert int(count) == int(k.sum())


@pytest.mark.parametrize(("backend", "device", "n"), cases())
def test_scatter_rows_roundtrip(backend, device, n):
    keep = make_keep(n, "random", device)
    tensors = make_tensors(n, device)
    packed, index = compact(keep, *tensors, backend=backend)
    for p, x in zip(packed, tensors):
        dest = torch.zeros_like(x)
        assert scatter_rows(dest, index, p, backend=backend) is dest
        k = keep.cpu()
        assert torch.equal(dest.cpu()[k], x.cpu()[k])
        assert not dest.cpu()[~k].any()


@pytest.mark.parametrize(("backend", "device"), [p.values for p in BACKENDS], ids=[p.id for p in BACKENDS])
def test_scatter_rows_unordered_into_strided(backend, device):
    m, k = 50, 20
    base = torch.zeros(2 * m, 3, 4, device=device)
    dest = base[::2]  # rows strided, written in place through the view
    index = torch.randperm(m, device=device)[:k]
    src = torch.randn(k, 4, 3, device=device).transpose(1, 2)
    scatter_rows(dest, index, src, backend=backend)
    expected = torch.zeros(m, 3, 4)
    expected[index.cpu()] = src.cpu()
    assert torch.equal(base[::2].cpu(), expected)
    assert not base[1::2].any()


@pytest.mark.parametrize(("backend", "device"), [p.values for p in BACKENDS], ids=[p.id for p in BACKENDS])
def test_scatter_rows_into_cache_slice(backend, device):
    # dest as a model's KV cache update sees it: [batch, heads, a slice of the positions, head dim].
    cache = torch.zeros(6, 2, 9, 4, dtype=torch.bfloat16, device=device)
    dest = cache.narrow(2, 3, 2)
    index = torch.tensor([4, 0, 2], device=device)
    src = torch.randn(3, 2, 2, 4, device=device).to(torch.bfloat16)
    assert scatter_rows(dest, index, src, backend=backend) is dest
    expected = torch.zeros(6, 2, 9, 4, dtype=torch.bfloat16)
    expected[index.cpu(), :, 3:5] = src.cpu()
    assert torch.equal(cache.cpu(), expected)


@pytest.mark.parametrize(("backend", "device"), [p.values for p in BACKENDS], ids=[p.id for p in BACKENDS])
def test_scatter_rows_out_of_range_raises(backend, device):
    if device != "cpu":
        pytest.skip("on a GPU the check is an asynchronous device-side assert, which poisons the context")
    dest = torch.zeros(4, 2)
    for bad in ([0, 4], [-1, 1]):
        with pytest.raises(ValueError, match="index"):
            scatter_rows(dest, torch.tensor(bad), torch.ones(2, 2), backend=backend)
    assert not dest.any()


def test_partition_rows_compiles_fullgraph_cpu():
    def step(keep, hidden, pos):
        parts, perm, count = partition_rows(keep, hidden, pos)
        return parts[0] * 2, parts[1], perm, count

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for n in (9, 33):
        keep = torch.rand(n) < 0.5
        hidden, pos = torch.randn(n, 6), torch.arange(n)
        got = compiled(keep, hidden, pos)
        want = step(keep, hidden, pos)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_compact_and_scatter_compile_fullgraph_cpu():
    def step(keep, hidden):
        (packed,), index = compact(keep, hidden)
        out = torch.zeros_like(hidden)
        scatter_rows(out, index, packed + 1)
        return out

    compiled = torch.compile(step, fullgraph=True)
    keep = torch.tensor([True, False, True, True, False])
    hidden = torch.randn(5, 3)
    assert torch.equal(compiled(keep, hidden), step(keep, hidden))


@pytest.mark.parametrize(("backend", "device"), [p.values for p in BACKENDS], ids=[p.id for p in BACKENDS])
def test_opcheck(backend, device):
    keep = torch.tensor([True, False, True, True, False, False, True], device=device)
    x = torch.randn(7, 3, device=device)
    y = torch.arange(7, device=device)
    torch.library.opcheck(compact_op, (keep, [x, y], backend))
    torch.library.opcheck(partition_rows_op, (keep, [x, y], [torch.empty_like(x), torch.empty_like(y)], backend))
    index = torch.tensor([4, 0, 2], device=device)
    torch.library.opcheck(scatter_rows_op, (torch.zeros(7, 3, device=device), index, x[:3].clone(), backend))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
def test_partition_rows_cuda_graph(backend):
    if backend != "auto" and earlyexit.ops.backends.unavailable_reason(backend, "cuda"):
        pytest.skip(earlyexit.ops.backends.unavailable_reason(backend, "cuda"))
    n = 300
    keep = torch.zeros(n, dtype=torch.bool, device="cuda")
    hidden = torch.randn(n, 4096, dtype=torch.bfloat16, device="cuda")
    pos = torch.arange(n, device="cuda")
    out = (torch.empty_like(hidden), torch.empty_like(pos))
    partition_rows(keep, hidden, pos, out=out, backend=backend)  # warm up (compiles the kernel)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, perm, count = partition_rows(keep, hidden, pos, out=out, backend=backend)
    for trial in range(3):
        keep.copy_(torch.rand(n, device="cuda") < 0.3 * trial)
        hidden.normal_()
        graph.replay()
        expected = torch.cat([torch.nonzero(keep), torch.nonzero(~keep)]).reshape(-1)
        assert torch.equal(perm, expected)
        assert int(count) == int(keep.sum())
        assert torch.equal(out[0], hidden[expected]) and torch.equal(out[1], pos[expected])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
def test_partition_rows_never_synchronizes(backend):
    if backend != "auto" and earlyexit.ops.backends.unavailable_reason(backend, "cuda"):
        pytest.skip(earlyexit.ops.backends.unavailable_reason(backend, "cuda"))
    keep = torch.rand(100, device="cuda") < 0.5
    hidden = torch.randn(100, 64, device="cuda")
    partition_rows(keep, hidden, backend=backend)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        partition_rows(keep, hidden, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_runs_on_the_tensors_device_not_the_current_one(backend):
    """Triton launches on the current device: the launchers must switch to the tensors' device."""
    if earlyexit.ops.backends.unavailable_reason(backend, "cuda"):
        pytest.skip(earlyexit.ops.backends.unavailable_reason(backend, "cuda"))
    keep = torch.rand(300, device="cuda:1") < 0.5
    x = torch.randn(300, 40, device="cuda:1")
    with torch.cuda.device(0):
        (xk,), index = compact(keep, x, backend=backend)
        (xp,), perm, count = partition_rows(keep, x, backend=backend)
        dest = torch.zeros_like(x)
        scatter_rows(dest, index, xk, backend=backend)
    assert torch.equal(xk, x[keep]) and torch.equal(xp[: int(count)], x[keep]) and torch.equal(dest[keep], x[keep])


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

KEEP = torch.tensor([True, False, True])
X = torch.randn(3, 2)


@pytest.mark.parametrize("fn", [compact, partition_rows], ids=["compact", "partition_rows"])
@pytest.mark.parametrize(
    ("keep", "tensors", "match"),
    [
        ([True, False, True], (X,), "keep: expected a torch.Tensor"),
        (torch.tensor([1, 0, 1]), (X,), "keep: expected dtype bool"),
        (torch.ones(3, 1, dtype=torch.bool), (X,), "keep: expected a 1-D"),
        (KEEP, (X, torch.randn(4, 2)), r"tensors\[1\]: expected 3 rows"),
        (KEEP, (torch.tensor(1.0),), r"tensors\[0\]: expected a tensor with 3 rows"),
        (KEEP, (X, "x"), r"tensors\[1\]: expected a torch.Tensor"),
        (KEEP, (torch.empty(3, 2, device="meta"),), r"tensors\[0\]: expected a tensor on cpu"),
    ],
)
def test_bad_keep_and_tensors(fn, keep, tensors, match):
    with pytest.raises(ValueError, match=match):
        fn(keep, *tensors)


def _same_memory_twice():
    """out tensors of the right shapes and dtypes ([3, 2] float32, [3] int64) over one storage."""
    buf = torch.empty(12)
    return buf[:6].view(3, 2), buf[6:].view(torch.int64)


@pytest.mark.parametrize(
    ("out", "match"),
    [
        (torch.empty(3, 2), "out: expected a tuple"),
        ((torch.empty(3, 2),), "out: expected 2 tensors"),
        ((torch.empty(3, 2), torch.empty(4)), r"out\[1\]: expected shape \(3,\)"),
        ((torch.empty(3, 2), torch.empty(3)), r"out\[1\]: expected dtype int64"),
        ((torch.empty(3, 2, device="meta"), torch.empty(3, dtype=torch.int64)), r"out\[0\]: expected a tensor on cpu"),
        ((X, torch.empty(3, dtype=torch.int64)), r"out\[0\]: must not share memory with an input"),
        (_same_memory_twice(), r"out\[1\]: must not share memory with another out"),
    ],
)
def test_bad_out(out, match):
    with pytest.raises(ValueError, match=match):
        partition_rows(KEEP, X, torch.arange(3), out=out)


@pytest.mark.parametrize(
    ("dest", "index", "src", "match"),
    [
        (torch.tensor(1.0), torch.tensor([0]), torch.ones(1), "dest: expected a tensor with rows"),
        (X, torch.tensor([0], dtype=torch.int32), torch.ones(1, 2), "index: expected dtype int64"),
        (X, torch.tensor([[0]]), torch.ones(1, 2), "index: expected a 1-D"),
        (X, torch.tensor([0, 1]), torch.ones(1, 2), r"src: expected shape \(2, 2\)"),
        (X, torch.tensor([0]), torch.ones(1, 2, dtype=torch.float16), "src: expected dtype float32"),
        (X, torch.tensor([0]), torch.ones(1, 2, device="meta"), "src: expected a tensor on cpu"),
        (X, torch.tensor([0], device="meta"), torch.ones(1, 2), "index: expected a tensor on cpu"),
        (X, torch.tensor([0]), X[:1], "src: must not share memory with dest"),
    ],
)
def test_bad_scatter_rows(dest, index, src, match):
    with pytest.raises(ValueError, match=match):
        scatter_rows(dest, index, src)


def test_backend_errors():
    with pytest.raises(ValueError, match="backend"):
        compact(KEEP, X, backend="numpy")
    with pytest.raises(RuntimeError, match="cuda"):
        partition_rows(KEEP, X, backend="cuda")
