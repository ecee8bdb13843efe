"""Where the time of one compiled next-token decode step goes, and which attention kernel wins.

Times tessera's compiled decode step (trunk step over the KV cache + CFG + sampling, one CUDA
graph) at LlamaGen's GPT-L shape and architecture (as bench/next_token_sampling.py: batch 64
doubled for CFG, bf16, random weights) at one decode position, with the attention of every layer computed by one of:

- `kernel`: tessera's default on CUDA, the Triton decode kernel (nn/decode_attention.py) over
  the written slots only;
- `sdpa`: F.scaled_dot_product_attention with the dense boolean mask;
- `math`: softmax(q k^T / sqrt(d)) v written out, left to inductor;
- `flex`: FlexAttention with a block mask built from the dense mask (inductor's split-KV
  flex-decoding kernel skips key blocks that are masked out).

For each it reports the GPU time per step (CUDA events over many replays), the CPU time per
call (how long the Python side takes to issue one step; if it is close to the GPU time, the
loop is launch-bound), and optionally a profiler table of the top kernels.

    source .whl/setup.sh; python3 bench/decode_step_variants.py --json $OUT/decode_variants.json
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
for _p in (_BENCH.parent / "src", _BENCH):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from timing import environment, write_json  # noqa: E402

VARIANTS = ("kernel", "sdpa", "math", "flex")


def install_attention(variant: str, kv_block: int) -> None:
    """Route the trunk's attention through `variant`."""
    import tessera.nn.trunk as trunk
    from tessera.nn import attention, decode_attention

    # Only `kernel` takes the decode kernel; the others see a dense mask.
    attention.triton_available = decode_attention.triton_available if variant == "kernel" else (lambda device: False)
    if variant in ("kernel", "sdpa"):
        trunk.attend = attention.attend
        return

    def attend(q, k, v, prepared):
        dense = prepared.dense
        if variant == "math":
            scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
            if dense is not None:
                scores = scores.masked_fill(~dense, float("-inf"))
            return scores.softmax(-1).to(v.dtype) @ v
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        lq, lk = dense.shape
        n_blocks = -(-lk // kv_block)
        padded = torch.nn.functional.pad(dense, (0, n_blocks * kv_block - lk))
        live = padded.view(lq, n_blocks, kv_block).any(-1).any(0)  # (n_blocks,)
        num = live.sum().to(torch.int32).view(1, 1, 1)
        idx = torch.argsort((~live).to(torch.int8), stable=True).to(torch.int32).view(1, 1, 1, n_blocks)

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[q_idx, kv_idx]
        block_mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(128, kv_block),
                                              mask_mod=mask_mod, seq_lengths=(lq, lk))
        return flex_attention(q, k, v, block_mask=block_mask)
    trunk.attend = attend


def kernel_parity() -> list[dict]:
    """The decode kernel against the float32 reference on random bf16 inputs, on this GPU."""
    from tessera.nn.decode_attention import decode_attention, reference_decode_attention
    out = []
    gen = torch.Generator("cuda").manual_seed(0)
    for b, h, s, d, length in [(128, 16, 257, 64, 129), (2, 16, 257, 64, 257), (1, 4, 1000, 64, 777),
                               (3, 2, 70, 32, 1)]:
        q, k, v = (torch.randn(b, h, n, d, generator=gen, device="cuda", dtype=torch.bfloat16) for n in (1, s, s))
        n = torch.tensor([length], device="cuda")
        err = (decode_attention(q, k, v, n).float() - reference_decode_attention(q, k, v, n).float()).abs().max()
        out.append({"shape": [b, h, s, d], "length": length, "max_abs_err": float(err)})
    return out


def sweep_kernel(blocks=(16, 32, 64), warps=(1, 2), targets=(2048, 4096, 8192), stages=(1, 2, 3)) -> dict:
    """Time the decode kernel alone (CUDA-graph replay) over launch settings, at GPT-L's decode
    shape with CFG (batch 64 -> 128 rows x 16 heads) and batch 1 (2 rows), at a few lengths;
    cuDNN SDPA over a 64-slot bucket with a dense mask as the yardstick."""
    import torch.nn.functional as F
    from triton.testing import do_bench_cudagraph

    from tessera.nn.decode_attention import DecodeKernelConfig, triton_decode_attention
    gen = torch.Generator("cuda").manual_seed(0)
    cases = [(128, 65), (128, 130), (128, 257), (2, 130)]
    tables: dict[str, dict] = {}
    for rows, length in cases:
        q = torch.randn(rows, 16, 1, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(rows, 16, 257, 64, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        n = torch.tensor([length], device="cuda")
        bucket = min(257, -(-length // 64) * 64)
        mask = torch.arange(bucket, device="cuda")[None, :] < length
        key = f"rows{rows}_len{length}"
        tables[key] = {"sdpa_bucket_us": 1e3 * do_bench_cudagraph(
            lambda: F.scaled_dot_product_attention(q, k[:, :, :bucket], v[:, :, :bucket], attn_mask=mask)),
            "kv_bytes": rows * 16 * length * 64 * 2 * 2}
        for config in itertools.product(blocks, warps, targets, stages):
            cfg = DecodeKernelConfig(*config)
            us = 1e3 * do_bench_cudagraph(lambda: triton_decode_attention(q, k, v, n, cfg))
            tables[key][",".join(map(str, config))] = us
    configs = [c for c in tables["rows128_len130"] if "," in c]
    score = {c: sum(tables[f"rows128_len{n}"][c] for n in (65, 130, 257)) for c in configs}
    best = min(score, key=score.get)
    summary = {key: {"sdpa_bucket_us": t["sdpa_bucket_us"], "best_config_us": t[best],
                     "best_config_TB_s": t["kv_bytes"] / t[best] / 1e6,
                     "fastest": min(configs, key=t.get), "fastest_us": min(t[c] for c in configs)}
               for key, t in tables.items()}
    return {"best": best, "summary": summary, "tables": tables}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="kernel,sdpa")
    p.add_argument("--position", type=int, default=128, help="decode step index j (attends over p + j slots)")
    p.add_argument("--kv-len", type=int, default=192, help="static attended slots for sdpa/math (0: whole cache)")
    p.add_argument("--kv-block", type=int, default=64, help="flex: key block size")
    p.add_argument("--modes", default="reduce-overhead", help="torch.compile modes, comma-separated")
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--qk-norm", action="store_true", help="tessera's QK-norm on (default: LlamaGen's GPT-L architecture)")
    p.add_argument("--sweep", action="store_true", help="time the kernel alone over launch settings first, "
                   "then use the best for the decode-step rows")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from tessera.registry import build_model
    from tessera.samplers.autoregressive import draw
    from tessera.samplers.logits import SamplingConfig

    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    torch.manual_seed(0)
    from next_token_sampling import LLAMAGEN_ARCHITECTURE
    model = build_model("next_token", "gpt-l", vocab_size=16384, grid_size=16, num_classes=1000,
                        trunk={**LLAMAGEN_ARCHITECTURE, "qk_norm": args.qk_norm})
    model = model.to(device, torch.bfloat16).eval()
    settings = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, cfg=4.0)
    rows = 2 * args.batch
    result = {"env": environment("cuda"), "args": vars(args), "kernel_parity": kernel_parity(), "rows": []}
    print("kernel parity (max |kernel - float32 reference|):", result["kernel_parity"], flush=True)
    if args.sweep:
        from tessera.nn import decode_attention
        result["sweep"] = sweep_kernel()
        decode_attention.KERNEL = decode_attention.DecodeKernelConfig(*map(int, result["sweep"]["best"].split(",")))
        print("sweep:", result["sweep"]["best"], result["sweep"]["summary"], flush=True)
        write_json(args.json, result)
    unit = torch.randint(0, 16384, (args.batch, 1), device=device)
    index = torch.full((1,), args.position, device=device)
    noise = torch.empty(args.batch, 1, 16384, device=device).exponential_()
    weight = torch.tensor(4.0, device=device)

    for mode in args.modes.split(","):
        for variant in args.variants.split(","):
            install_attention(variant, args.kv_block)
            torch._dynamo.reset()
            cache = model.new_cache(rows, torch.bfloat16, device)
            cache.k0.normal_()  # contents do not matter for timing
            for buf in cache.buffers():
                torch._dynamo.mark_static_address(buf)
            kv_len = None if variant in ("kernel", "flex") or args.kv_len == 0 else args.kv_len

            def step(unit, index, weight, noise):
                return draw(model.decode_step(unit.repeat(2, 1), index, cache, kv_len), weight, noise, True, settings)
            compiled = torch.compile(step, mode=mode, fullgraph=True, dynamic=False)
            row = {"variant": variant, "mode": mode, "kv_len": kv_len or cache.max_len}
            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    for _ in range(3):
                        torch.compiler.cudagraph_mark_step_begin()
                        out = compiled(unit, index, weight, noise)
                    torch.cuda.synchronize()
                    row["compile_s"] = time.perf_counter() - t0
                    eager = step(unit, index, weight, noise)
                    row["tokens_equal_eager"] = float((out == eager).float().mean())
                    cpu, starts, ends = [], [], []
                    for _ in range(args.replays):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        t = time.perf_counter()
                        s.record()
                        torch.compiler.cudagraph_mark_step_begin()
                        compiled(unit, index, weight, noise)
                        e.record()
                        cpu.append(time.perf_counter() - t)
                        starts.append(s)
                        ends.append(e)
                    torch.cuda.synchronize()
                    gpu = [s.elapsed_time(e) for s, e in zip(starts, ends)]
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    for _ in range(args.replays):
                        torch.compiler.cudagraph_mark_step_begin()
                        compiled(unit, index, weight, noise)
                    torch.cuda.synchronize()
                    row["loop_ms_per_step"] = 1e3 * (time.perf_counter() - t) / args.replays
                row["gpu_ms_median"] = statistics.median(gpu)
                row["cpu_ms_per_call_median"] = 1e3 * statistics.median(cpu)
                if args.profile:
                    from torch.profiler import ProfilerActivity, profile
                    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(10):
                            torch.compiler.cudagraph_mark_step_begin()
                            compiled(unit, index, weight, noise)
                        torch.cuda.synchronize()
                    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
                    row["profile"] = table
                    print(table, flush=True)
            except Exception as exc:  # keep the other variants
                import traceback
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {exc}".split("\n")[0][:300]
            print({k: v for k, v in row.items() if k != "profile"}, flush=True)
            result["rows"].append(row)
            write_json(args.json, result)


if __name__ == "__main__":
    main()
