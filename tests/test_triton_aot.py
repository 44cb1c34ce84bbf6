"""The Triton kernels compile for real GPUs (sm_80, sm_90) on this machine, with the intended code.

Catches what the interpreter cannot: GPU-compiler errors, 2-byte instead of 16-byte weight loads,
a missing tensor-core path, register spills.
"""

import pytest

pytest.importorskip("triton")

from aot_runner import run_aot_script  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    return run_aot_script("triton_aot.py")


def test_every_variant_compiles(compiled):
    shapes = {(r["dtype"], r["n_rows"], r["arch"]) for r in compiled if r["variant"] == "default"}
    assert shapes == {("bf16", 1, 90), ("bf16", 64, 90), ("bf16", 1, 80), ("fp32", 32, 90)}
    heads = {(r["dtype"], r["variant"]) for r in compiled if r["variant"] != "default"}
    assert heads == {
        ("bf16", "exit_stats"),
        ("bf16", "softcap"),
        ("bf16", "margin"),
        ("bf16", "entropy"),
        ("bf16", "no_norm_no_bias"),
        ("fp16", "softcap"),
    }


def test_weight_streams_with_16_byte_async_copies(compiled):
    for rec in compiled:
        # The per-tile bias / norm-weight vectors may load 2 bytes per thread (a few instructions);
        # a weight stream that lost its 16-byte path shows up as dozens of 2-byte loads (81 seen).
        assert rec["cp_async_16"] > 0 and rec["ld_b16"] <= 2, rec


def test_half_precision_uses_tensor_cores(compiled):
    for rec in compiled:
        if rec["dtype"] != "fp32":
            assert rec["mma"] + rec["wgmma"] > 0, rec
        if rec["dtype"] != "fp32" and rec["arch"] == 90 and rec["block_n"] >= 64:
            assert rec["wgmma"] > 0, rec


def test_no_spills_on_the_half_precision_paths(compiled):
    for rec in compiled:
        if rec["usage"] is not None and rec["dtype"] != "fp32":
            assert rec["usage"]["stack"] == 0 and rec["usage"]["local"] == 0, rec
