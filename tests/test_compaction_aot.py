"""The Triton compaction kernels compile for real GPUs (sm_80, sm_90) here, and move wide rows with
16-byte loads and stores: what the interpreter lane cannot check."""

import pytest

pytest.importorskip("triton")

from aot_runner import run_aot_script  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    return run_aot_script("compaction_aot.py")


def test_every_kernel_compiles_for_both_archs(compiled):
    assert sorted((r["kernel"], r["arch"]) for r in compiled) == sorted(
        (k, a) for k in ("compact", "partition", "scatter") for a in (80, 90)
    )


def test_aligned_rows_move_in_16_byte_accesses(compiled):
    for rec in compiled:
        acc = rec["accesses"]
        assert acc.get("ld.global.v4.b32", 0) > 0 and acc.get("st.global.v4.b32", 0) > 0, rec


def test_no_spills(compiled):
    for rec in compiled:
        if rec["usage"] is not None:
            assert rec["usage"]["local"] == 0 and rec["usage"]["stack"] == 0, rec
