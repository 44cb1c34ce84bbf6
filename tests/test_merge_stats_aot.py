"""The Triton merge of gathered exit statistics compiles for real GPUs (sm_80, sm_90) here, in every
variant a launch can take, without spills: what the interpreter lane cannot check."""

import pytest

pytest.importorskip("triton")

from aot_runner import run_aot_script  # noqa: E402

# Not imported from merge_stats_aot: the script turns the interpreter off for this process.
#: (world size, FINALIZE, STATISTIC): TP = 2 and 8, the statistics and each measure's decision.
VARIANTS = [(w, False, 0) for w in (2, 8)] + [(w, True, s) for w in (2, 8) for s in (0, 1, 2)]


@pytest.fixture(scope="module")
def compiled():
    return run_aot_script("merge_stats_aot.py")


def test_every_variant_compiles_for_both_archs(compiled):
    got = sorted((r["arch"], r["world"], r["finalize"], r["statistic"]) for r in compiled)
    assert got == sorted((a, *v) for a in (80, 90) for v in VARIANTS)


def test_no_spills(compiled):
    for rec in compiled:
        if rec["usage"] is not None:  # None: no cuobjdump here
            assert rec["usage"]["local"] == 0 and rec["usage"]["stack"] == 0, rec
