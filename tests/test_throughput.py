"""Throughput accounting: analytic training FLOPs vs FlopCounterMode, GPU peaks, the meter."""
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from tessera.registry import build_model
from tessera.train import throughput
from tessera.train.throughput import (PEAK_BF16_TFLOPS, ThroughputMeter, peak_flops, training_flops_per_sample,
                                      training_sequence_length)

aten = torch.ops.aten
B = 2
# FlopCounterMode has no formula for the CPU flash kernel that F.scaled_dot_product_attention takes
# here; give it torch's own SDPA formulas (dense: masked-out blocks are counted, as in the model count).
SDPA_FORWARD = {aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)}
SDPA_BACKWARD = {aten._scaled_dot_product_flash_attention_for_cpu_backward:
                 lambda grad, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v)}
# Tolerance: FlopCounterMode counts every matmul actually run, our count is 3x the forward. They differ
# only where a layer's input needs no gradient (scale input projections, the flow head's input and time
# MLP), whose backward is 1x rather than 2x, and where the loss itself multiplies (multi-stream's per-codebook
# einsum). Measured gaps: <= 0.01% (next_token, maskgit, magnet, streams), 0.1% (next_scale), 1.3% (flow_ar).
# 3% leaves room; a missing head, a wrong sequence length or a doubled count is far outside it.
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    torch.manual_seed(0)
    folders = {}
    for kind, kw in (("vq", {}), ("multiscale_vq", {}), ("kl", {"image_size": 32}), ("audio_codec", {})):
        folders[kind] = tmp_path_factory.mktemp(kind) / "tok"
        build_model(kind, "tiny", **kw).save_pretrained(folders[kind])
    return folders


def measured_flops(model, batch) -> tuple[float, float]:
    """(model FLOPs per sample, SDPA forward FLOPs per sample) of one loss + backward, by FlopCounterMode.

    Its SDPA backward formula counts the flash kernel's recomputation of QK^T (5 products); model
    FLOPs count 4 (2x the forward), so the SDPA backward is replaced by 2x the SDPA forward.
    """
    counter = FlopCounterMode(display=False, custom_mapping={**SDPA_FORWARD, **SDPA_BACKWARD})
    with counter:
        loss, _ = model.loss(batch)
        loss.backward()
    counts = counter.get_flop_counts()["Global"]
    attn_fwd = sum(counts.get(op, 0) for op in SDPA_FORWARD)
    attn_bwd = sum(counts.get(op, 0) for op in SDPA_BACKWARD)
    return (counter.get_total_flops() - attn_bwd + 2 * attn_fwd) / B, attn_fwd / B


def labels():
    return torch.tensor([0, 2])


def next_token(_, **kw):
    model = build_model("next_token", "tiny", vocab_size=1024, grid_size=8, num_classes=3, **kw)
    return model, {"tokens": torch.randint(0, 1024, (B, 8, 8)), "class": labels()}


def streams(tokenizers, **kw):
    model = build_model("next_token_streams", "tiny", tokenizer=str(tokenizers["audio_codec"]), num_classes=3, **kw)
    codes = torch.randint(0, model.special, (B, model.num_codebooks, model.max_frames))
    return model, {"codes": codes, "class": labels()}


def next_scale(tokenizers):
    model = build_model("next_scale", "tiny", tokenizer=str(tokenizers["multiscale_vq"]), num_classes=3)
    tokens = torch.randint(0, model.vocab_size, (B, model.seq_len))
    # The frozen tokenizer's teacher-forcing inputs (its phi convolutions) are computed outside the count.
    teacher = model.tokenizer.teacher_inputs(model.tokenizer.split_scales(tokens))
    model.tokenizer.teacher_inputs = lambda codes: teacher
    return model, {"tokens": tokens, "class": labels()}


def flow_ar(tokenizers):
    model = build_model("flow_ar", "tiny", tokenizer=str(tokenizers["kl"]), image_size=32, num_classes=3,
                        head_width=32, head_depth=2)
    return model, {"latents": torch.randn(B, model.latent_channels, model.side, model.side), "class": labels()}


def maskgit(tokenizers):
    model = build_model("maskgit", "tiny", tokenizer=str(tokenizers["vq"]), num_classes=3)
    return model, {"tokens": torch.randint(0, model.vocab_size, (B, model.grid, model.grid)), "class": labels()}


def magnet(tokenizers):
    model = build_model("magnet", "tiny", tokenizer=str(tokenizers["audio_codec"]), num_classes=3, clip_seconds=0.05)
    codes = torch.randint(0, model.vocab_size, (B, model.num_streams, model.max_frames))
    return model, {"codes": codes, "class": labels()}


CASES = {
    "next_token": next_token,
    "next_token_shuffle": lambda t: next_token(t, token_shuffle=2),
    "streams_delay": streams,
    "streams_flattened": lambda t: streams(t, pattern="flattened"),
    "next_scale": next_scale,
    "flow_ar": flow_ar,
    "maskgit": maskgit,
    "magnet": magnet,
}


@pytest.mark.parametrize("case", CASES)
def test_training_flops_match_flop_counter(tokenizers, case, monkeypatch):
    torch.manual_seed(0)
    model, batch = CASES[case](tokenizers)
    model.train()
    if case in ("maskgit", "magnet"):  # heads run on the masked positions: mask at the schedule's mean ratio
        fraction = throughput.expected_masked_fraction(model)
        monkeypatch.setattr(type(model), "draw_ratios", lambda self, b, device: torch.full((b,), fraction))
    measured, attention = measured_flops(model, batch)
    analytic = training_flops_per_sample(model)
    cfg = model.trunk.config
    # Dense attention at the analytic training length (this pins the sequence length exactly).
    assert attention == cfg.n_layers * 4 * training_sequence_length(model) ** 2 * cfg.dim
    assert abs(analytic / measured - 1) < TOLERANCE, (case, analytic, measured)


def test_uncountable_kinds_are_named():
    with pytest.raises(ValueError, match="'vq'"):
        training_flops_per_sample(build_model("vq", "tiny"))


def test_peak_flops_cpu_table_and_override(monkeypatch):
    monkeypatch.delenv(throughput.PEAK_ENV, raising=False)
    assert peak_flops(torch.device("cpu")) == (None, "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda")) == (989e12, "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda"))[0] == PEAK_BF16_TFLOPS["H100 PCIe"] * 1e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    assert peak_flops(torch.device("cuda"))[0] == 362e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert peak_flops(torch.device("cuda")) == (None, "Mystery GPU")
    monkeypatch.setenv(throughput.PEAK_ENV, "123.5")
    assert peak_flops(torch.device("cuda")) == (123.5e12, "Mystery GPU")
    assert peak_flops(torch.device("cpu")) == (None, "cpu")
    monkeypatch.setenv(throughput.PEAK_ENV, "fast")
    with pytest.raises(ValueError, match=throughput.PEAK_ENV):
        peak_flops(torch.device("cuda"))


def test_meter_reports_rates_and_resets():
    meter = ThroughputMeter(1e12, peak_flops=10e12, num_processes=4, tokens_per_sample=16,
                            device=torch.device("cpu"))
    meter.update(6)
    meter.update(4)
    meter.start -= 2.0  # 10 local samples in (about) 2 s
    window = meter.close_window()
    meter.update(100)  # counted in the next window
    expected = {"samples_per_s": 20.0, "tokens_per_s": 320.0, "tflops_per_s": 5.0, "mfu": 0.5}
    assert window.rates() == pytest.approx(expected, rel=1e-3)
    assert meter.samples == 100
    no_peak = ThroughputMeter(1e12, peak_flops=None, num_processes=1, device=torch.device("cpu"))
    assert set(no_peak.close_window().rates()) == {"samples_per_s", "tflops_per_s"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events time the window on a GPU; the CPU test above times it on the host")
def test_meter_times_a_gpu_window_without_waiting_for_it():
    meter = ThroughputMeter(1e12, peak_flops=None, num_processes=1, device=torch.device("cuda"))
    torch.cuda.synchronize()
    meter.start_event.record()
    torch.cuda._sleep(int(2e9))  # about a second of GPU work at 1.5-2 GHz
    meter.update(10)
    host_start = time.perf_counter()
    window = meter.close_window()
    closing = time.perf_counter() - host_start
    seconds = window.seconds()
    assert closing < 0.1 * seconds  # closing did not wait for the GPU
    assert window.rates()["samples_per_s"] == pytest.approx(10 / seconds) and seconds > 0.2
