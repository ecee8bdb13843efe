"""Run test code with Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, set before import)."""
import os
import subprocess
import sys
import textwrap


def run_interpreted(code: str) -> str:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1; its stdout (a failure shows stderr)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
