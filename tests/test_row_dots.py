"""csrc/cpu/row_dots.cpp on its own (ctypes): the decode-regime head GEMM of the CPU kernel.

The widening entry points convert the weight to float32 in registers: bf16 by a shift, fp16 with F16C
where the CPU has it and otherwise by hand (exponent rebias, Inf/NaN, subnormals through a magic
subtraction); both fp16 paths are tested here. Every one of the 65536 16-bit patterns goes through
each of the 8 vector lanes and must come out as torch converts it. On CPUs with AVX512-BF16, bf16 uses
bf16-pair dot products instead (row_dots_avx512bf16.cpp): every pattern through each of its 32 lanes,
subnormals read as zero as that instruction does. The float32 path and the tails (d not a multiple of
the vector width, 1-8 rows) are checked against float64.
"""

import ctypes

import pytest
import torch
from host_build import build_harness


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    sources = [
        "csrc/cpu/row_dots.cpp",
        "csrc/cpu/row_dots_f16c.cpp",
        "csrc/cpu/row_dots_avx512bf16.cpp",
        "tests/row_dots_harness.cpp",
    ]
    so = build_harness(tmp_path_factory.mktemp("row_dots") / "librow_dots.so", sources, shared=True)
    return ctypes.CDLL(so)


@pytest.fixture
def pairs(lib):
    """Skips the test on a CPU without AVX512-BF16 (the pair path cannot run there)."""
    available = getattr(lib, "rd_bf16_pairs_available", None)
    if available is None or not available():
        pytest.skip("this CPU has no AVX512-BF16 (or this is not x86-64 GCC)")


def _row_dots(lib, name, x, w):
    """z [n, nc] = x [n, d] (float32) @ w [nc, d].T through the named entry point (w float32 or 16-bit)."""
    n, d = x.shape
    z = torch.empty(n, w.shape[0])
    args = [x.data_ptr(), n, d, w.data_ptr(), w.stride(0), w.shape[0], z.data_ptr()]
    fn = getattr(lib, name)
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    fn(*args)
    return z


@pytest.mark.parametrize("flush_denormal", [False, True])
@pytest.mark.parametrize(
    "dtype,name",
    [
        (torch.bfloat16, "rd_bf16_widen"),
        (torch.float16, "rd_f16"),
        (torch.float16, "rd_f16_portable"),
    ],
)
def test_every_16_bit_pattern_widens_exactly_in_every_lane(lib, dtype, name, flush_denormal):
    # Weight row j holds pattern j in lane j % 8 and zeros elsewhere; x row r is one-hot at column r, so
    # z[j % 8, j] = 1 * pattern_j + (0 * 0 terms): the widened pattern (a -0 pattern reads as +0).
    # fp16 subnormals widen to normal float32s, so flush-denormal mode must not change them.
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    w = torch.zeros(65536, 8, dtype=torch.int16)
    lane = torch.arange(65536) % 8
    w[torch.arange(65536), lane] = patterns
    if flush_denormal and dtype == torch.bfloat16:
        pytest.skip("bf16 subnormals are float32 subnormals: flush-denormal mode zeroes them in any arithmetic")
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        z = _row_dots(lib, name, torch.eye(8), w)
    finally:
        torch.set_flush_denormal(False)
    got = z[lane, torch.arange(65536)]
    want = patterns.view(dtype).float()
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite] + 0.0)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("d", [1, 7, 8, 61, 576])
@pytest.mark.parametrize(
    "dtype,name",
    [
        (torch.float32, "rd_f32"),
        (torch.bfloat16, "rd_bf16"),
        (torch.bfloat16, "rd_bf16_widen"),
        (torch.float16, "rd_f16"),
        (torch.float16, "rd_f16_portable"),
    ],
)
def test_matches_float64(lib, n, d, dtype, name):
    g = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn(n, d, generator=g)
    if dtype == torch.bfloat16:
        x = x.bfloat16().float()  # row_dots_bf16's contract: rows that hold bf16 values
    w = torch.randn(37, d + 3, generator=g).to(dtype)[:, :d]  # row stride d + 3: ldw != d
    raw = w if dtype == torch.float32 else w.view(torch.int16)
    z = _row_dots(lib, name, x, raw)
    want = x.double() @ w.double().T
    torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-5 * d**0.5)


def test_bf16_pairs_read_every_pattern_in_every_lane(lib, pairs):
    # As above, over the 32 bf16 lanes of a 512-bit register: weight row j holds pattern j in lane j % 32;
    # each call's 8 x rows are one-hot at columns shift..shift + 7, so z[lane - shift, j] reads pattern j
    # for the lanes of that call, and four calls cover the 32 lanes.
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    lane = torch.arange(65536) % 32
    w = torch.zeros(65536, 32, dtype=torch.int16)
    w[torch.arange(65536), lane] = patterns
    got = torch.empty(65536)
    for shift in range(0, 32, 8):
        x = torch.zeros(8, 32)
        x[torch.arange(8), torch.arange(8) + shift] = 1.0
        z = _row_dots(lib, "rd_bf16_pairs", x, w)
        mine = (lane >= shift) & (lane < shift + 8)
        got[mine] = z[lane[mine] - shift, torch.arange(65536)[mine]]
    want = patterns.view(torch.bfloat16).float()
    want = torch.where(want.abs() < torch.finfo(torch.float32).tiny, 0.0, want)  # subnormals read as zero
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite] + 0.0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 19])
@pytest.mark.parametrize("d", [1, 31, 32, 33, 576])
def test_bf16_pairs_match_float64(lib, pairs, n, d):
    # Row counts of each weight-row grouping and past 8 (groups of 8 and a remainder: this path takes
    # any number of rows), d below, at and past one 32-lane register (the masked tail), nc = 37 (not a
    # multiple of any group), ldw != d.
    g = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn(n, d, generator=g).bfloat16().float()
    w = torch.randn(37, d + 3, generator=g).bfloat16()[:, :d]
    z = _row_dots(lib, "rd_bf16_pairs", x, w.view(torch.int16))
    want = x.double() @ w.double().T
    torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-5 * d**0.5)


def test_bf16_pairs_round_x_to_nearest_even(lib, pairs):
    # x that is not a bf16 value is rounded to nearest even first, as torch rounds it.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 45, generator=g)
    w = torch.randn(5, 45, generator=g).bfloat16()
    z = _row_dots(lib, "rd_bf16_pairs", x, w.view(torch.int16))
    want = x.bfloat16().double() @ w.double().T
    torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-5)
