"""The tensor-core decode kernel's index maps (csrc/cuda/mma_layout.h), checked on the host.

tests/mma_layout_harness.cpp moves data exactly as exit_check_mma.cuh does (16-byte vectors per lane,
the K permutation, MMA sub-steps, accumulator -> (vocabulary row, token), the lane that keeps each token)
but runs the mma.m16n8k16 fragments through an independent transcription of the PTX ISA layouts. A wrong
index map gives wrong logits on the GPU; here it fails on any machine with a C++ compiler.
"""

import subprocess

from host_build import build_harness


def test_fragment_layout_computes_every_logit(tmp_path):
    exe = build_harness(tmp_path / "mma_layout_harness", ["tests/mma_layout_harness.cpp"])
    out = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
