"""Device facts shared by the Triton launchers: the multiprocessor count and the launch device.

Triton launches on the current CUDA device, not on the device of the tensors it is given, so every
launcher runs under :func:`on_device` of its tensors' device; counters and workspaces keyed by that
device then belong to the device the kernel really runs on.
"""

import contextlib

import torch

_SM_COUNT = {}


def device_index(device):
    """The CUDA device index of ``device`` (a bare "cuda" means the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device):
    """Multiprocessors of a CUDA device (1 for a CPU device: the interpreter lane), cached per index."""
    if device.type != "cuda":
        return 1
    key = device_index(device)
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def on_device(device):
    """Context in which a Triton launch runs on ``device`` (a no-op on the CPU and when already current)."""
    if device.type != "cuda" or device_index(device) == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
