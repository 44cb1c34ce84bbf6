"""The (backend, device) pairs that can run on this machine, as pytest params."""

import pytest
import torch

from earlyexit.ops import backends


def runnable_backends():
    """pytest params of (backend, device) for every backend that can run here; CUDA ones marked gpu."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    params = []
    for device in devices:
        for name in backends.BACKENDS:
            if backends.unavailable_reason(name, device) is None:
                marks = [pytest.mark.gpu] if device == "cuda" else []
                params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params
