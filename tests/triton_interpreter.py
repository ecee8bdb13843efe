"""Run test code with Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, set before import)."""
import os
import subprocess
import sys
import textwrap

import pytest

try:
    import triton
    _VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
except ImportError:
    _VERSION = (0, 0)

# Kernels whose loops run to bounds loaded at run time (decode and prefix attention): Triton 3.6's
# interpreter (the GPU image's) holds such scalars as 1-element arrays and cannot iterate to them;
# 3.9's can. On such machines the compiled kernels are tested on the GPU instead.
needs_runtime_loop_bounds = pytest.mark.skipif(
    _VERSION < (3, 9), reason="this Triton's CPU interpreter cannot run loops to bounds loaded at run time "
                              "(Triton >= 3.9 can); the GPU tests run the compiled kernels")


def run_interpreted(code: str) -> str:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1; its stdout (a failure shows stderr)."""
    tests = os.path.dirname(os.path.abspath(__file__))  # so `code` can import this module's helpers
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_trunks_agree(plain, trunk, x, positions, mask, cond) -> None:
    """Two trunks with the same weights: the same outputs and every parameter's gradient."""
    import torch
    outs = [t(x, positions, mask, cond=cond) for t in (plain, trunk)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad((o * o).sum(), list(t.parameters())) for o, t in zip(outs, (plain, trunk))]
    for (name, _), want, got in zip(plain.named_parameters(), *grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
