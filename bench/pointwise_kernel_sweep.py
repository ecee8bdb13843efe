"""Tile sizes of the trunk's memory-bound Triton kernels, against Inductor's kernels for the same math.

At VAR-d16's training shape (batch 96 by default, 680 positions, width 1024, 16 heads of 64,
SwiGLU hidden 2752, bf16), forward + backward of:

- `swiglu`: nn/swiglu.py's kernels under each BLOCK (columns per program), and the plain
  silu(gate) * up compiled by Inductor (`inductor`);
- `qk_norm_rope`: nn/qk_norm_rope.py's kernels on the query under each ROWS_PER_PROGRAM, and the
  plain RMSNorm + rotation compiled by Inductor;
- `gated_residual_norm`: nn/gated_residual_norm.py's kernels (the gated residual add and the MLP
  input's modulated norm of an AdaLN block) under each (ROWS_PER_STEP, NUM_WARPS, ROWS_PER_PROGRAM),
  and the plain ops compiled by Inductor.

Each row has the milliseconds and the effective bandwidth: the bytes the operation must move at
least (each input read once, each output written once) over the time, so a row near the GPU's
memory bandwidth has no more to gain.

GPU:  source .whl/setup.sh; python3 bench/pointwise_kernel_sweep.py --json $OUT/sweep.json
CPU smoke (the plain rows only):  .venv/bin/python bench/pointwise_kernel_sweep.py --device cpu --batch 1 --reps 1
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

_BENCH = Path(__file__).resolve().parent
for _p in (_BENCH.parent / "src", _BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from timing import environment, kernel_bench_parser, measure, write_json  # noqa: E402

from tessera.nn import gated_residual_norm, qk_norm_rope, swiglu  # noqa: E402
from tessera.nn.rope import RotaryEmbedding  # noqa: E402

LENGTH, HIDDEN, HEADS, HEAD_DIM = 680, 2752, 16, 64
SWIGLU_BLOCKS = (256, 512, 1024, 2048, 4096)
ROWS = (8, 16, 32, 64, 128)
WIDTH = 1024
RESIDUAL_NORM_TILES = ((1, 4, 64), (2, 4, 64), (4, 4, 64), (2, 8, 64), (4, 8, 64), (1, 2, 64), (1, 4, 32),
                       (2, 4, 128))  # (ROWS_PER_STEP, NUM_WARPS, ROWS_PER_PROGRAM)


def forward_backward(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    """One call of `fn` and its backward with `grad`."""
    def step() -> None:
        torch.autograd.grad(fn(*inputs), [t for t in inputs if t.requires_grad], grad)
    return step


def swiglu_rows(args, device: torch.device) -> list[dict[str, Any]]:
    rows_n = args.batch * LENGTH
    h13 = (torch.randn(rows_n, 2 * HIDDEN, device=device) * 2).bfloat16().requires_grad_()
    grad = torch.randn(rows_n, HIDDEN, device=device).bfloat16()
    # bf16 bytes: forward reads h13 and writes h (h's size is grad's); backward reads h13 and grad, writes d_h13
    least_bytes = 2 * (h13.numel() + grad.numel()) + 2 * (2 * h13.numel() + grad.numel())
    plain = torch.compile(swiglu.swiglu_reference, dynamic=False) if device.type == "cuda" else swiglu.swiglu_reference
    return sweep("swiglu", swiglu, [{"BLOCK": b} for b in SWIGLU_BLOCKS], forward_backward(plain, [h13], grad),
                 forward_backward(swiglu.swiglu, [h13], grad), least_bytes, args, device)


def qk_norm_rope_rows(args, device: torch.device) -> list[dict[str, Any]]:
    x = torch.randn(args.batch, LENGTH, HEADS, HEAD_DIM, device=device).bfloat16().transpose(1, 2).requires_grad_()
    weight = (1 + 0.1 * torch.randn(HEAD_DIM, device=device)).requires_grad_()
    cos, sin = RotaryEmbedding(HEAD_DIM, 2).to(device)(torch.rand(LENGTH, 2, device=device) * 16)
    grad = torch.randn_like(x)
    least_bytes = 2 * 2 * x.numel() + 2 * 3 * x.numel()  # bf16: forward reads x, writes out; backward reads x and grad, writes dx

    def fused(x, weight):
        return qk_norm_rope.rms_norm_rope(x, weight, cos, sin, 1e-6)

    def reference(x, weight):
        return qk_norm_rope.rms_norm_rope_reference(x, weight, cos, sin, 1e-6)
    plain = torch.compile(reference, dynamic=False) if device.type == "cuda" else reference
    return sweep("qk_norm_rope", qk_norm_rope, [{"ROWS_PER_PROGRAM": r} for r in ROWS],
                 forward_backward(plain, [x, weight], grad), forward_backward(fused, [x, weight], grad), least_bytes,
                 args, device)


def gated_residual_norm_rows(args, device: torch.device) -> list[dict[str, Any]]:
    x, a = (torch.randn(args.batch, LENGTH, WIDTH, device=device).bfloat16().requires_grad_() for _ in range(2))
    mods = (0.3 * torch.randn(args.batch, 1, 3 * WIDTH, device=device)).bfloat16().requires_grad_()
    grads = [torch.randn_like(x) for _ in range(2)]
    # bf16: forward reads x, a and writes x1, out; backward reads x, a and both gradients, writes dx, da
    least_bytes = 2 * 4 * x.numel() + 2 * 6 * x.numel()

    def step(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.grad(fn(x, a, *mods.chunk(3, -1), 1e-6), [x, a, mods], grads)
        return run
    reference = gated_residual_norm.gated_residual_norm_reference
    plain = torch.compile(reference, dynamic=False) if device.type == "cuda" else reference
    settings = [dict(zip(("ROWS_PER_STEP", "NUM_WARPS", "ROWS_PER_PROGRAM"), tiles)) for tiles in RESIDUAL_NORM_TILES]
    return sweep("gated_residual_norm", gated_residual_norm, settings, step(plain),
                 step(gated_residual_norm.gated_residual_norm), least_bytes, args, device)


def sweep(kernel: str, module, settings: list[dict[str, int]], plain: Callable[[], None],
          fused: Callable[[], None], least_bytes: int, args, device: torch.device) -> list[dict[str, Any]]:
    """Inductor's row, then (where Triton runs) the kernel's under each of `settings` (values of
    `module`'s constants, which are put back afterwards)."""
    rows = [_row(kernel, "inductor", plain, least_bytes, args, device)]
    if not module.triton_available(device):
        return rows
    chosen = {name: getattr(module, name) for name in settings[0]}
    try:
        for setting in settings:
            for name, value in setting.items():
                setattr(module, name, value)
            variant = "-".join(f"{name.lower()}-{value}" for name, value in setting.items())
            rows.append(_row(kernel, variant, fused, least_bytes, args, device))
    finally:
        for name, value in chosen.items():
            setattr(module, name, value)
    return rows


def _row(kernel: str, variant: str, step: Callable[[], None], least_bytes: int, args, device: torch.device) -> dict[str, Any]:
    ms = measure(step, device, args.warmup, args.reps)["median_s"] * 1e3
    row = {"kernel": kernel, "variant": variant, "ms": ms, "effective_gb_per_s": least_bytes / ms / 1e6}
    print(f"{kernel:>19} {variant:>48}: {ms:7.3f} ms  {row['effective_gb_per_s']:7.0f} GB/s", flush=True)
    return row


def main() -> None:
    args = kernel_bench_parser(__doc__, batch=96).parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = swiglu_rows(args, device) + qk_norm_rope_rows(args, device) + gated_residual_norm_rows(args, device)
    write_json(args.json, {"benchmark": "pointwise_kernel_sweep", "batch": args.batch, "env": environment(args.device),
                           "rows": rows})


if __name__ == "__main__":
    main()
