"""Trainer parts: EMA arithmetic, the lr schedule, checkpoint pruning and the latest pointer."""
import math

import torch

from tessera.registry import build_model
from tessera.train.ema import EMA
from tessera.train.schedule import warmup_cosine
from tessera.train.state import save_training_checkpoint


def test_ema_averages_and_codebook_follows_live_weights():
    model = build_model("vq", "tiny")
    ema = EMA(model, decay=0.5)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 2/11) = 2/11
    live = model.trainable_state_dict()
    decay = 2 / 11
    key = "encoder.conv_in.weight" if "encoder.conv_in.weight" in live else next(
        k for k in live if k.startswith("encoder.") and k.endswith("weight"))
    torch.testing.assert_close(ema.state_dict()[key], decay * before[key] + (1 - decay) * live[key])
    codebook = next(k for k in live if k.startswith("quantizer.") and live[k].dtype.is_floating_point)
    torch.testing.assert_close(ema.state_dict()[codebook], live[codebook].float())


def test_warmup_then_cosine_to_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == 0.1
    assert warmup_cosine(9, 10, 100, 0.1) == 1.0
    assert math.isclose(warmup_cosine(55, 10, 100, 0.1), 0.1 + 0.9 * 0.5)
    assert math.isclose(warmup_cosine(100, 10, 100, 0.1), 0.1)


def test_checkpoints_are_pruned_and_latest_points_at_newest(tmp_path):
    model = build_model("vq", "tiny")
    ema = EMA(model, 0.9)
    for step in (1, 2, 3):
        save_training_checkpoint(tmp_path, model, ema.state_dict(), {"step": step}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-0000002", "step-0000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000003"
