"""Test configuration: the Triton interpreter lane on CPU-only machines, GPU markers, seeding."""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when kernels are decorated: set it before earlyexit is imported,
# so that on a machine without CUDA the Triton kernels run on the CPU (numpy underneath).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
