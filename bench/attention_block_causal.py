"""Block-causal (next-scale) attention, forward + backward, by each way of computing it.

VAR-d16's training shape by default: batch 32, 16 heads of 64, the 680 positions of scales
1, 2, 3, 4, 5, 6, 8, 10, 13, 16 (squared), bf16. q, k and v come out of one (B, L, 3, H, D)
projection as in the trunk, and the output goes back to (B, L, H * D); each variant is compiled
with torch.compile (as the trunk's blocks are) and timed for forward + backward:

- `dense`: one SDPA call with the dense boolean mask;
- `groups-N`: one SDPA call per group of query rows (nn/attention.py's `query_groups`): a block
  of at least N rows attends, unmasked, to the keys up to its end; smaller blocks merge;
- `flex`: FlexAttention with a block mask of the same rule (skips fully masked tiles);
- `prefix`: the Triton kernels of nn/prefix_attention.py (skip tiles no row sees, mask only tiles
  some rows see);
- `full`: unmasked attention over all positions, a reference speed (a different result).

`--sweep` times the prefix kernels alone under each tile configuration in SWEEP instead.

SDPA variants also run with each kernel family forced (cudnn, flash, efficient); one that cannot
take the inputs (flash takes no mask) is reported with its error. TFLOP/s count the dense
L x L work (4 * B * L^2 * H * D forward, 2.5x that backward), the MFU convention of train/throughput.py.

GPU:  source .whl/setup.sh; python3 bench/attention_block_causal.py --json $OUT/attention.json
CPU smoke:  .venv/bin/python bench/attention_block_causal.py --device cpu --batch 1 --reps 1 --variants dense,groups-64
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

_BENCH = Path(__file__).resolve().parent
for _p in (_BENCH.parent / "src", _BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from timing import environment, kernel_bench_parser, measure, write_json  # noqa: E402

from tessera.nn.attention import PreparedMask, attend, query_groups  # noqa: E402
from tessera.nn.masks import AttentionMask  # noqa: E402
from tessera.nn import prefix_attention as pa  # noqa: E402

SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
KERNELS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def prepared_masks(sizes: list[int], device: torch.device) -> dict[str, PreparedMask]:
    """Every variant's prepared mask (see the module docstring)."""
    from tessera.nn.attention import _flex_block_mask
    mask = AttentionMask.block_causal(sizes, device)
    pos = torch.arange(sum(sizes), device=device)
    out = {"dense": PreparedMask("sdpa", dense=mask.dense(pos, pos)), "full": PreparedMask("sdpa")}
    for rows in (1, 64, 128):
        out[f"groups-{rows}"] = PreparedMask("sdpa", groups=query_groups(mask, device, rows))
    if device.type == "cuda":
        out["flex"] = PreparedMask("flex", block_mask=_flex_block_mask(mask, pos, pos))
        out["prefix"] = PreparedMask("triton", prefix=pa.PrefixMask.block_causal(tuple(sizes), device))
    return out


SWEEP = {  # (block_m, block_n, num_warps, num_stages)
    "forward": [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 4, 2), (64, 32, 4, 2), (128, 32, 4, 3)],
    "backward_kv": [(32, 64, 4, 3), (32, 64, 4, 4), (32, 64, 4, 5), (32, 128, 4, 3), (32, 128, 4, 4),
                    (32, 128, 4, 5), (64, 128, 8, 3), (16, 64, 4, 4), (32, 64, 8, 4), (64, 64, 4, 4),
                    (64, 64, 8, 3), (16, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (32, 128, 8, 3),
                    (64, 128, 8, 2)],
    "backward_q": [(64, 32, 4, 3), (64, 32, 4, 4), (64, 32, 4, 5), (128, 32, 4, 4), (128, 32, 8, 4),
                   (128, 32, 8, 5), (64, 16, 4, 3), (128, 64, 8, 4)],
}


def sweep_tiles(qkv: torch.Tensor, sizes: list[int], heads: int, device: torch.device, warmup: int,
                reps: int) -> list[dict]:
    """The prefix kernels alone (forward; backward with one kernel's tiles varied) per tile configuration."""
    b, length, width = qkv.shape
    q, k, v = qkv.detach().view(b, length, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    mask = pa.PrefixMask.block_causal(tuple(sizes), device)
    out, lse = pa.triton_prefix_attention(q, k, v, mask.kv_end)
    grad = torch.randn_like(out)
    rows = []
    for kernel, configs in SWEEP.items():
        for config in configs:
            tiles = pa.TileConfig(*config)
            if kernel == "forward":
                fn = lambda: pa.triton_prefix_attention(q, k, v, mask.kv_end, tiles)  # noqa: E731
            elif kernel == "backward_kv":
                fn = lambda: pa.triton_prefix_attention_backward(grad, q, k, v, out, lse, mask.kv_end,  # noqa: E731
                                                                 mask.first_rows, kv_tiles=tiles)
            else:
                fn = lambda: pa.triton_prefix_attention_backward(grad, q, k, v, out, lse, mask.kv_end,  # noqa: E731
                                                                 mask.first_rows, q_tiles=tiles)
            row = {"kernel": kernel, "tiles": list(config)}
            try:
                row["ms"] = measure(fn, device, warmup, reps)["median_s"] * 1e3
                print(f"{kernel:>12} {config}: {row['ms']:.3f} ms", flush=True)
            except Exception as err:  # e.g. out of shared memory for this configuration
                row["error"] = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                print(f"{kernel:>12} {config}: {row['error']}", flush=True)
            rows.append(row)
    return rows


def attention_step(prepared: PreparedMask, heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, L, 3 * H * D) projections -> (B, L, H * D) attention output, as the trunk's Attention."""
    def step(qkv: torch.Tensor) -> torch.Tensor:
        b, length, width = qkv.shape
        q, k, v = qkv.view(b, length, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
        return attend(q, k, v, prepared).transpose(1, 2).reshape(b, length, -1)
    return step


def time_variant(step: Callable, qkv: torch.Tensor, kernel: SDPBackend | None, device: torch.device,
                 warmup: int, reps: int) -> dict:
    compiled = torch.compile(step, dynamic=False) if device.type == "cuda" else step
    grad = torch.randn(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3, device=device, dtype=qkv.dtype)

    def fwd_bwd():
        qkv.grad = None
        compiled(qkv).backward(grad)

    if kernel is None:
        return measure(fwd_bwd, device, warmup, reps)
    with sdpa_kernel([kernel]):
        return measure(fwd_bwd, device, warmup, reps)


def main() -> None:
    ap = kernel_bench_parser(__doc__, batch=32)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--scales", default=",".join(map(str, SCALES)), help="side of each scale, coarse to fine")
    ap.add_argument("--variants", default="dense,groups-1,groups-64,groups-128,flex,prefix,full")
    ap.add_argument("--sweep", action="store_true", help="time the prefix kernels per tile configuration")
    ap.add_argument("--kernels", default="default,cudnn,flash,efficient", help="SDPA kernel families to force")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = [int(s) ** 2 for s in args.scales.split(",")]
    length = sum(sizes)
    torch.manual_seed(0)
    qkv = torch.randn(args.batch, length, 3 * args.heads * args.head_dim, device=device, dtype=dtype,
                      requires_grad=True)
    flops = 3.5 * 4 * args.batch * length ** 2 * args.heads * args.head_dim
    if args.sweep:
        write_json(args.json, {"benchmark": "prefix_attention_tiles", "batch": args.batch, "heads": args.heads,
                               "head_dim": args.head_dim, "length": length, "sizes": sizes,
                               "env": environment(args.device),
                               "rows": sweep_tiles(qkv, sizes, args.heads, device, args.warmup, args.reps)})
        return
    masks = prepared_masks(sizes, device)
    rows, reference = [], None
    for name in args.variants.split(","):
        if name not in masks:
            continue
        kernels = ["default"] if name in ("flex", "prefix") else args.kernels.split(",")
        for kernel in kernels:
            row = {"variant": name, "kernel": kernel}
            try:
                result = time_variant(attention_step(masks[name], args.heads), qkv, KERNELS[kernel], device,
                                      args.warmup, args.reps)
            except Exception as err:  # a kernel family that cannot take these inputs
                row["error"] = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                print(f"{name:>12} {kernel:>9}: {row['error']}", flush=True)
                rows.append(row)
                continue
            out = attention_step(masks[name], args.heads)(qkv.detach()).float()
            if name != "full":
                reference = out if reference is None else reference
                row["max_abs_diff_vs_first"] = float((out - reference).abs().max())
            row["ms"] = result["median_s"] * 1e3
            row["tflops_dense_count"] = flops / result["median_s"] / 1e12
            print(f"{name:>12} {kernel:>9}: {row['ms']:.3f} ms  {row['tflops_dense_count']:.0f} TFLOP/s  "
                  f"diff {row.get('max_abs_diff_vs_first', float('nan')):.2e}", flush=True)
            rows.append(row)
    write_json(args.json, {"benchmark": "attention_block_causal", "batch": args.batch, "heads": args.heads,
                           "head_dim": args.head_dim, "length": length, "sizes": sizes,
                           "env": environment(args.device), "rows": rows})


if __name__ == "__main__":
    main()
