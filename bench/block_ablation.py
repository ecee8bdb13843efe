"""What each part of one trunk block costs in training: forward + backward of one compiled block
(in the form the trunk runs its blocks after the first) at VAR-d16's shape (batch 32, 680
positions, width 1024, 16 heads, AdaLN from a 1024-d condition, QK-norm, 2-axis RoPE, SwiGLU),
bf16 autocast over float32 weights and a float32 residual stream, as the trainer runs it, with one
part taken out at a time:

- `block`: the block as trained (block-causal attention on the prefix-mask Triton kernels,
  nn/prefix_attention.py; QK-norm and RoPE in one Triton kernel, nn/qk_norm_rope.py);
- `unfused-qk-rope`: QK-norm and RoPE as plain PyTorch ops (fused by Inductor) instead;
- `unfused-swiglu`: the SwiGLU activation as plain PyTorch ops (fused by Inductor), not nn/swiglu.py's kernels;
- `unfused-residual-norm`: the gated residual add and the MLP input's modulated norm as plain ops (fused by
  Inductor), not nn/gated_residual_norm.py's kernels;
- `dense-mask`: attention as one SDPA call with the dense mask instead;
- `sdpa-groups`: attention as SDPA query groups of at least 64 rows instead;
- `no-qk-norm`, `no-rope`: without that part, the other one as plain ops (compare with `unfused-qk-rope`);
- `no-adaln`: without AdaLN (learned norm gains instead);
- `no-attention`: attention replaced by its values (no softmax kernel at all);
- `matmuls`: only the block's four projections (qkv, out, w13, w2) on bf16 activations: the floor
  the matmuls set.

The difference between `block` and a variant is what that part costs (norms, rotations and
modulations are memory-bound: their cost is the traffic Inductor's kernels make).

GPU:  source .whl/setup.sh; python3 bench/block_ablation.py --json $OUT/block.json
CPU smoke:  .venv/bin/python bench/block_ablation.py --device cpu --batch 1 --dim 64 --heads 4 --reps 1
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

_BENCH = Path(__file__).resolve().parent
for _p in (_BENCH.parent / "src", _BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from timing import environment, kernel_bench_parser, measure, write_json  # noqa: E402

from tessera.nn import qk_norm_rope  # noqa: E402
from tessera.nn import trunk as trunk_module  # noqa: E402
from tessera.nn.attention import PreparedMask, prepare_mask  # noqa: E402
from tessera.nn.layers import swiglu_hidden  # noqa: E402
from tessera.nn.masks import AttentionMask  # noqa: E402
from tessera.nn.rope import RotaryEmbedding  # noqa: E402

SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VARIANTS = ("block", "unfused-qk-rope", "unfused-swiglu", "unfused-residual-norm", "dense-mask", "sdpa-groups",
            "no-qk-norm", "no-rope", "no-adaln", "no-attention", "matmuls")


@contextlib.contextmanager
def patched(module, name: str, value) -> Iterator[None]:
    """Temporarily replace a function `module` calls."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def block_step(variant: str, args, device: torch.device) -> tuple[Callable[[], None], contextlib.AbstractContextManager]:
    """A compiled forward + backward of one block in `variant`, and the patch it runs under."""
    cfg = trunk_module.TrunkConfig(dim=args.dim, n_layers=1, n_heads=args.heads, qk_norm=variant != "no-qk-norm",
                                   fused_qk_rope=variant not in ("unfused-qk-rope", "no-rope"),
                                   fused_swiglu=variant != "unfused-swiglu",
                                   fused_residual_norm=variant != "unfused-residual-norm",
                                   cond_dim=0 if variant == "no-adaln" else args.dim)
    sizes = [s * s for s in SCALES]
    length = sum(sizes)
    pos = torch.arange(length, device=device)
    mask = AttentionMask.block_causal(sizes, device)
    if variant == "dense-mask":
        prepared = PreparedMask("sdpa", dense=mask.dense(pos, pos))
    else:
        prepared = prepare_mask(mask, pos, pos, "sdpa" if variant == "sdpa-groups" else "auto", full_sequence=True,
                                group_rows=64)
    rope = RotaryEmbedding(cfg.head_dim, 2).to(device)(torch.rand(length, 2, device=device) * 16)
    x = torch.randn(args.batch, length, args.dim, device=device, requires_grad=True)
    cond = torch.randn(args.batch, args.dim, device=device) if cfg.cond_dim else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if variant == "matmuls":
        hidden = swiglu_hidden(args.dim, cfg.mlp_ratio, cfg.multiple_of)
        shapes = [(args.dim, 3 * args.dim), (args.dim, args.dim), (args.dim, 2 * hidden), (hidden, args.dim)]
        weights = [(torch.randn(i, o, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_() for i, o in shapes]
        inputs = [torch.randn(args.batch * length, i, device=device, dtype=torch.bfloat16, requires_grad=True)
                  for i, _ in shapes]

        def matmuls() -> None:
            outs = [a @ w for a, w in zip(inputs, weights)]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return matmuls, contextlib.nullcontext()
    block = trunk_module.Block(cfg).to(device)
    compiled = torch.compile(block, dynamic=False) if device.type == "cuda" else block
    grad = torch.randn_like(x)
    # AdaLN blocks as the trunk runs them after the first: the previous block's MLP branch comes in, and
    # this block's goes out, each added in a norm's kernel
    pending = None if cond is None else trunk_module.PendingBranch(
        torch.randn_like(x).requires_grad_(), torch.zeros(args.batch, 1, args.dim, device=device, requires_grad=True))

    def step() -> None:
        x.grad = None
        with autocast:
            out, branch = compiled(x, rope, prepared, cond, None, 0, None, None, pending, defer=pending is not None)
        outs = [out] if branch is None else [out, branch.out]
        torch.autograd.backward(outs, [grad] * len(outs))
    if variant == "no-rope":
        return step, patched(qk_norm_rope, "apply_rotary", lambda t, cos, sin: t)
    if variant == "no-attention":
        return step, patched(trunk_module, "attend", lambda q, k, v, p: v)
    return step, contextlib.nullcontext()


def main() -> None:
    ap = kernel_bench_parser(__doc__, batch=32)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        step, patch = block_step(variant, args, device)
        with patch:
            ms = measure(step, device, args.warmup, args.reps)["median_s"] * 1e3
        rows.append({"variant": variant, "ms": ms})
        print(f"{variant:>13}: {ms:.3f} ms", flush=True)
    base = next((r["ms"] for r in rows if r["variant"] == "block"), None)
    if base is not None:
        for r in rows:
            r["cost_ms"] = base - r["ms"]
    write_json(args.json, {"benchmark": "block_ablation", "batch": args.batch, "dim": args.dim, "heads": args.heads,
                           "env": environment(args.device), "rows": rows})


if __name__ == "__main__":
    main()
