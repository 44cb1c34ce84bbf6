"""Run an ahead-of-time Triton compile script (triton_aot.py, compaction_aot.py) in a subprocess.

A subprocess, because TRITON_INTERPRET must be off when kernels are decorated while this test
process runs them under the interpreter.
"""

import json
import os
import subprocess
import sys


def run_aot_script(name):
    """Run tests/<name> with TRITON_INTERPRET=0; returns its JSON records (one dict per line)."""
    script = os.path.join(os.path.dirname(__file__), name)
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
