"""Runs earlyexit's CUDA exit-check and state-similarity kernels on CPU tensors on the host emulator.

The emulator and its harnesses live in tests/cuda_emu. Each harness executable comes in two builds: an
optimized one for the many cases, and one with AddressSanitizer and UndefinedBehaviorSanitizer, where an
out-of-bounds or misaligned access or an overflow in a kernel's index arithmetic fails the run, like
compute-sanitizer's memcheck on a GPU. Each call writes its inputs to a folder, runs the executable there
and reads the outputs back.
"""

import functools
import os
import subprocess

import pytest
import torch
from host_build import build_harness

from earlyexit import ExitResult, ExitStats
from earlyexit.ops.measures import get_head_measure

#: An H200 as the launchers see it: SMs and opt-in shared memory per block (bytes).
H200 = {"sms": 132, "smem_optin": 232448}
# nvcc's aliasing rules: the kernels read 16-byte vectors as elements through reinterpret_cast.
FAST = ("-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas")
SANITIZED = (*FAST[1:], "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
VECTOR_KINDS = {None: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def build_emulated(out, source, *, sanitized=False):
    """Builds the tests/cuda_emu harness ``source`` into ``out``, optimized or sanitized (skips without a compiler)."""
    return build_harness(out, [source], includes=["tests/cuda_emu"], flags=SANITIZED if sanitized else FAST)


def harness_fixtures(source, emulated):
    """The pytest fixtures of a test module for harness ``source``: (emu, emu_sanitized, run).

    emu / emu_sanitized: the optimized and sanitized executables, built once per module. run: ``emulated``
    (emulated_exit_check, emulated_state_similarity or emulated_compaction) bound to emu and a fresh folder.
    """
    name = os.path.splitext(os.path.basename(source))[0]

    @pytest.fixture(scope="module", name="emu")
    def emu(tmp_path_factory):
        return build_emulated(tmp_path_factory.mktemp("emu") / name, source)

    @pytest.fixture(scope="module", name="emu_sanitized")
    def emu_sanitized(tmp_path_factory):
        return build_emulated(tmp_path_factory.mktemp("emu_asan") / name, source, sanitized=True)

    @pytest.fixture(name="run")
    def run(emu, tmp_path):
        return functools.partial(emulated, emu, str(tmp_path / "case"))

    return emu, emu_sanitized, run


def _raw(t, stride=None):
    """The bytes of 2-D ``t`` laid out with row stride ``stride`` (elements), ending at its last element."""
    if t.dim() == 1:
        return t.contiguous().view(torch.uint8).numpy().tobytes()
    n, d = t.shape
    stride = d if stride is None else stride
    buf = torch.zeros(n, stride, dtype=t.dtype)
    buf[:, :d] = t
    flat = buf.reshape(-1)[: max(0, (n - 1) * stride + d)]
    return flat.contiguous().view(torch.uint8).numpy().tobytes()


def _span(buf, row_bytes):
    """The bytes of uint8 [rows, stride] ``buf`` from its first byte to the end of its last row's row_bytes."""
    rows, stride = buf.shape
    return buf.reshape(-1)[: max(0, (rows - 1) * stride + row_bytes)].numpy().tobytes()


class EmulatorError(RuntimeError):
    """The emulator reported a fault (deadlock, divergent collective, trap, sanitizer report, nondeterminism)."""


def _run_harness(exe, workdir, files, args, out_file="out.bin"):
    """Writes ``files`` (name: bytes) and args.txt to ``workdir``, runs ``exe`` there; returns (out_file's bytes, plan).

    out_file None: the caller reads the harness's outputs itself (the bytes returned are None).
    """
    os.makedirs(workdir, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(workdir, name), "wb") as f:
            f.write(data)
    with open(os.path.join(workdir, "args.txt"), "w") as f:
        f.writelines(f"{k} {val}\n" for k, val in args.items())
    run = subprocess.run([exe, workdir], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise EmulatorError(f"exit status {run.returncode}: {run.stderr[-3000:]}")
    raw = None
    if out_file is not None:
        with open(os.path.join(workdir, out_file), "rb") as f:
            raw = f.read()
    with open(os.path.join(workdir, "plan.txt")) as f:
        return raw, f.read().strip()


def emulated_exit_check(
    exe,
    workdir,
    hidden,
    weight,
    threshold=0.5,
    *,
    norm_weight=None,
    bias=None,
    temperature=1.0,
    eps=1e-6,
    norm_offset=0.0,
    softcap=None,
    measure="max_prob",
    stats=False,
    path="auto",
    order=0,
    calls=1,
    hidden_stride=None,
    weight_stride=None,
    weight_shift=0,
    device=H200,
):
    """The CUDA kernels' outputs for 2-D CPU ``hidden`` [N, d] and ``weight`` [V, d] (one dtype).

    stats: exit_stats outputs (an ExitStats, argmax -1 on invalid rows as the op writes it) instead of
    an ExitResult. path: "auto" (the launcher's choice), "decode", "mma" or "chunked". order: 0, 1, 2
    schedule blocks and threads forward, reversed or shuffled. calls: run that many times and require
    the same bits each time. hidden_stride / weight_stride: row strides in elements; weight_shift moves
    the weight that many elements off 16-byte alignment. device: "sms" and "smem_optin" of the GPU.
    Returns (result, the plan the harness launched).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    hs, ws = hidden_stride or d, weight_stride or d
    files = {"hidden.bin": _raw(hidden, hs), "weight.bin": _raw(weight, ws)}
    if bias is not None:
        files["bias.bin"] = _raw(bias)
    if norm_weight is not None:
        files["norm.bin"] = _raw(norm_weight)
    thr = torch.zeros(n, dtype=torch.float32) + torch.as_tensor(threshold, dtype=torch.float32)
    files["threshold.bin"] = _raw(thr)
    m = get_head_measure(measure)
    args = {
        "dtype": DTYPES[hidden.dtype],
        "n": n,
        "d": d,
        "v": v,
        "hidden_stride": hs,
        "weight_stride": ws,
        "weight_shift": weight_shift,
        "bias_kind": VECTOR_KINDS[None if bias is None else bias.dtype],
        "norm_kind": VECTOR_KINDS[None if norm_weight is None else norm_weight.dtype],
        "eps": repr(float(eps)),
        "temperature": repr(float(temperature)),
        "norm_offset": repr(float(norm_offset)),
        "softcap": repr(float(softcap or 0.0)),
        "statistic": m.code,
        "exit_above": int(m.exit_above),
        "mode": "stats" if stats else "check",
        "path": path,
        "order": order,
        "calls": calls,
        **device,
    }
    raw, plan = _run_harness(exe, workdir, files, args)
    layout = (
        [torch.float32, torch.int64, torch.float32, torch.float32, torch.float32, torch.bool]
        if stats
        else [torch.int64, torch.bool, *[torch.float32] * 5]
    )
    fields, pos = [], 0
    for dt in layout:
        size = n * torch.empty(0, dtype=dt).element_size()
        fields.append(torch.frombuffer(bytearray(raw[pos : pos + size]), dtype=torch.uint8).view(dt).clone())
        pos += size
    if stats:
        fields[1] = torch.where(fields[5], torch.full_like(fields[1], -1), fields[1])
        return ExitStats(*fields), plan
    return ExitResult(*fields), plan


def emulated_state_similarity(exe, workdir, h, p, *, path="auto", order=0, h_stride=None, p_stride=None, shift=0):
    """The CUDA state-similarity kernel's float32 [N] output for 2-D CPU ``h``, ``p`` [N, d] (one dtype).

    path: "auto" (the launcher's choice from the addresses, strides and d), "vector" (16-byte loads) or
    "scalar". order: 0, 1, 2 schedule blocks and threads forward, reversed or shuffled. h_stride /
    p_stride: row strides in elements; shift moves both rows that many elements off 16-byte alignment.
    Returns (cosines, the plan the harness launched).
    """
    n, d = h.shape
    hs, ps = h_stride or d, p_stride or d
    files = {"h.bin": _raw(h, hs), "p.bin": _raw(p, ps)}
    args = {"dtype": DTYPES[h.dtype], "n": n, "d": d, "ldh": hs, "ldp": ps, "h_shift": shift, "p_shift": shift}
    raw, plan = _run_harness(exe, workdir, files, {**args, "path": path, "order": order})
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).clone() if n else torch.empty(0), plan


def emulated_compaction(exe, workdir, op, rows, row_bytes, srcs, dsts, *, index_rows=0, order=0, device=H200):
    """The CUDA compaction kernels on byte rows: the destinations' bytes (and index, count) after one call.

    op: "compact" or "partition" (rows: the keep mask, uint8 [N], any nonzero byte true) or "scatter"
    (rows: int64 [K] destination rows; one tensor). row_bytes: each tensor's row size. srcs / dsts: per
    tensor (uint8 [rows, stride] buffer, shift): each row's first row_bytes bytes are the tensor's row, the
    rest of the stride a gap no kernel may write; shift places the buffer that many bytes past 16-byte
    alignment. dsts hold the destinations' contents before the call. index_rows: the length of the index
    output (compact: K, partition: N). Returns ([uint8 [rows, stride] per destination], the index
    (int64 [index_rows]), the count (partition; else None), the plan the harness launched).
    """
    files = {("index.bin" if op == "scatter" else "keep.bin"): _raw(rows)}
    args = {"op": op, "n": rows.shape[0], "m": dsts[0][0].shape[0], "tensors": len(srcs)}
    args.update({"index_rows": index_rows, "order": order, "sms": device["sms"]})
    for t, (rb, (s, s_shift), (d, d_shift)) in enumerate(zip(row_bytes, srcs, dsts)):
        files[f"src{t}.bin"], files[f"dst{t}.bin"] = _span(s, rb), _span(d, rb)
        args.update({f"rb{t}": rb, f"ss{t}": s.shape[1], f"ds{t}": d.shape[1]})
        args.update({f"sshift{t}": s_shift, f"dshift{t}": d_shift})
    _, plan = _run_harness(exe, workdir, files, args, out_file=None)
    outs = []
    for t, (d, _) in enumerate(dsts):
        with open(os.path.join(workdir, f"dst{t}.out"), "rb") as f:
            raw = f.read()
        got = d.clone()  # past the last row's end: not the kernel's memory
        if raw:
            got.view(-1)[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        outs.append(got)
    count = None
    if op == "partition":
        with open(os.path.join(workdir, "count.out"), "rb") as f:
            count = int(torch.frombuffer(bytearray(f.read()), dtype=torch.int64)[0])
    index = torch.empty(0, dtype=torch.int64)
    if op != "scatter" and index_rows:
        with open(os.path.join(workdir, "index.out"), "rb") as f:
            index = torch.frombuffer(bytearray(f.read()), dtype=torch.int64).clone()
    return outs, index, count, plan
