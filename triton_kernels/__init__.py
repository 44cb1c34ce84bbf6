"""Triton kernels of earlyexit (installed as ``earlyexit.triton_kernels``).

Kernels and their launchers only: they take validated tensors with known strides and
know nothing of models, dtypes policy or devices policy; earlyexit.ops owns those decisions.
"""
