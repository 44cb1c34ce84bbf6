"""The compiled CUDA kernels of earlyexit._C hold the intended machine code (checked on the CPU machine).

Nothing CUDA runs without a GPU, but the SASS in the built extension can be read: the decode kernel for
fp16/bf16 must use tensor cores (HMMA) and 16-byte read-only weight loads, and no kernel may spill
registers to local memory. A refactor that silently falls back to scalar FMAs or starts spilling (the
kernels sit at 118-126 of their 128-register budget) fails here instead of on the next GPU run.
"""

import re
import subprocess

import pytest
from cuda_tools import cuobjdump

import earlyexit
from earlyexit.ops import backends

TOOL = cuobjdump()
pytestmark = [
    pytest.mark.skipif(backends.EXTENSION is None, reason="earlyexit._C is not built"),
    pytest.mark.skipif(not earlyexit.build_info()["cuda_archs"], reason="earlyexit._C has no CUDA kernels"),
    pytest.mark.skipif(TOOL is None, reason="no cuobjdump (Triton's bundle or the CUDA toolkit)"),
]


def _run(*args):
    return subprocess.run([TOOL, *args, backends.EXTENSION.__file__], capture_output=True, text=True, check=True).stdout


def _by_function(out, function_re):
    """{(arch, function name): [lines]} from cuobjdump output (functions listed per "arch = sm_XX" block)."""
    arch, name, funcs = None, None, {}
    for line in out.splitlines():
        if m := re.search(r"arch = sm_(\d+)", line):
            arch, name = int(m.group(1)), None
        elif m := re.search(function_re, line):
            name = m.group(1)
            funcs[(arch, name)] = []
        elif name is not None:
            funcs[(arch, name)].append(line)
    return funcs


@pytest.fixture(scope="module")
def sass():
    """{(arch, function name): SASS text} for every kernel in the extension."""
    return {k: "\n".join(v) for k, v in _by_function(_run("-sass"), r"Function : (\S+)").items()}


@pytest.fixture(scope="module")
def usage():
    """{(arch, function name): {"reg", "stack", "local", ...}} from cuobjdump's resource usage."""
    res = {}
    for key, lines in _by_function(_run("-res-usage"), r"Function (\S+):").items():
        fields = re.findall(r"([A-Z]+):(\d+)", " ".join(ln for ln in lines if "REG:" in ln))
        res[key] = {k.lower(): int(v) for k, v in fields}
    return res


def _archs():
    return [int(a) for a in earlyexit.build_info()["cuda_archs"]]


def test_every_arch_has_the_tensor_core_decode_kernel(sass):
    for arch in _archs():
        names = [n for (a, n) in sass if a == arch and "decode_mma_kernel" in n]
        # 2 dtypes x 4 token-tile widths (8, 16, 32, 64 columns)
        assert len(names) == 8, (arch, names)


def test_tensor_core_decode_uses_hmma_and_16_byte_weight_loads(sass):
    for (arch, name), code in sass.items():
        if "decode_mma_kernel" not in name:
            continue
        assert "HMMA.16816.F32" in code, (arch, name)
        assert re.search(r"LDG\.E\.128\.CONSTANT", code), (arch, name)


def test_no_kernel_spills(usage):
    kernels = {k: v for k, v in usage.items() if "earlyexit" in k[1]}
    assert kernels
    for key, res in kernels.items():
        assert res.get("local", 0) == 0, (key, res)
    for key, res in kernels.items():
        if "decode_mma_kernel" in key[1]:
            assert res["stack"] == 0 and res["reg"] <= 128, (key, res)


def test_every_arch_has_the_state_similarity_kernels(sass):
    for arch in _archs():
        names = [n for (a, n) in sass if a == arch and "state_similarity_kernel" in n]
        # 3 dtypes x (16-byte loads, scalar loads)
        assert len(names) == 6, (arch, names)


def test_state_similarity_vector_path_uses_16_byte_loads(sass):
    for (arch, name), code in sass.items():
        # Template argument kVec = true is mangled "Lb1E".
        if "state_similarity_kernel" in name and "Lb1E" in name:
            assert re.search(r"LDG\.E\.128", code), (arch, name)
