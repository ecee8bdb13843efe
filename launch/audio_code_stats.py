"""How predictable are an audio codec's codes? A diagnostic for the audio evidence runs.

Over the real (unpadded) frames of the clips in a shard folder, per codebook: the share of frames
whose code repeats the previous frame's (what a copy-the-last-frame predictor scores), the share
of the most common code, and the teacher-forced accuracy and cross-entropy of a multi-stream
next-token model on the same clips. Writes a JSON report.

    python3 launch/audio_code_stats.py --ar runs/musicgen_audio --shards data/audio_val --out stats.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

from tessera.data.audio_loader import make_audio_loader  # noqa: E402
from tessera.modeling import TesseraModel  # noqa: E402


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ar", required=True, help="next_token_streams run folder (its codec codes the clips)")
    p.add_argument("--shards", required=True)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ar = TesseraModel.from_pretrained(args.ar).to(device).eval()
    codec = ar.tokenizer
    loader = make_audio_loader(args.shards, 16, codec.config.sample_rate, ar.clip_seconds, seed=12345,
                               shuffle_buffer=0, infinite=False)
    k, v = ar.num_codebooks, codec.config.codebook_size
    repeats, frames, counts = torch.zeros(k), 0, torch.zeros(k, v)
    ce, acc, n = torch.zeros(k), 0.0, 0
    for i, batch in enumerate(loader):
        if i >= args.batches:
            break
        batch = {key: (value.to(device) if torch.is_tensor(value) else value) for key, value in batch.items()}
        codes, real = ar.codes_from_batch(batch)
        inside = torch.arange(codes.shape[-1], device=device)[None, :] < real[:, None]  # (B, T)
        same = (codes[..., 1:] == codes[..., :-1]) & inside[:, None, 1:]
        repeats += same.sum((0, 2)).float().cpu()
        frames += int(inside[:, 1:].sum())
        for q in range(k):
            counts[q] += torch.bincount(codes[:, q][inside], minlength=v).float().cpu()
        _, logs = ar.loss(batch)
        ce += torch.stack([logs[f"ce_q{q}"] for q in range(k)]).float().cpu()
        acc += float(logs["acc"])
        n += 1
    report = {"ar": args.ar, "shards": args.shards, "batches": n, "frames": frames,
              "repeat_previous_frame": (repeats / max(frames, 1)).tolist(),
              "top_code_share": (counts.max(1).values / counts.sum(1).clamp_min(1)).tolist(),
              "ar_teacher_forced_ce": (ce / max(n, 1)).tolist(), "ar_teacher_forced_acc": acc / max(n, 1)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
