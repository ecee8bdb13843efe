"""Multi-stream (MusicGen-style) next-token generator over a tiny audio codec."""
import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from fitting import fit
from tessera.checkpoint import CheckpointError
from tessera.config import ConfigError
from tessera.generators.patterns import PATTERNS
from tessera.registry import build_model
from tessera.samplers.autoregressive import AutoregressiveSampler
from tessera.samplers.logits import SamplingConfig

RATE = 16000


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("codec") / "codec"
    build_model("audio_codec", "tiny").save_pretrained(path)
    return path


def tiny(codec_dir, **kw):
    overrides = {"tokenizer": str(codec_dir), "cond": "class", "num_classes": 3, **kw}
    return build_model("next_token_streams", "tiny", **overrides)


def test_shapes_follow_the_codec_and_pattern(codec_dir):
    model = tiny(codec_dir)
    codec = model.tokenizer
    assert model.modality == "audio" and model.sample_rate == RATE and model.clip_seconds == 0.25
    assert model.config.vocab_size == codec.vocab_size and model.config.num_codebooks == 4
    frames = codec.num_frames(round(0.25 * RATE))
    assert (model.n_units, model.unit_size) == (frames + 3, 4)  # delay: T + K - 1 steps of K slots
    flat = tiny(codec_dir, pattern="flattened", num_codebooks=2)
    assert (flat.n_units, flat.unit_size) == (2 * frames, 1)
    assert flat.token_embedding.num_embeddings == 2 * (codec.vocab_size + 1) and len(flat.heads) == 2


@pytest.mark.parametrize("pattern", PATTERNS)
def test_loss_is_finite_with_per_codebook_logs(codec_dir, pattern):
    model = tiny(codec_dir, pattern=pattern).train()
    audio = 0.3 * torch.randn(2, 1, round(0.2 * RATE))
    loss, logs = model.loss({"audio": audio, "lengths": torch.tensor([audio.shape[-1], 1000]),
                             "class": torch.tensor([0, 2])})
    loss.backward()
    assert torch.isfinite(loss) and model.heads[3].proj.weight.grad is not None
    assert {f"ce_q{k}" for k in range(4)} <= set(logs) and 0 <= float(logs["acc"]) <= 1
    assert torch.isclose(loss, torch.stack([logs[f"ce_q{k}"] for k in range(4)]).mean())


def test_frames_past_the_clip_length_do_not_count(codec_dir):
    model = tiny(codec_dir).eval()
    hop = model.tokenizer.hop_length
    codes = torch.randint(0, model.config.vocab_size, (2, 4, 12))
    lengths = torch.tensor([12 * hop, 7 * hop - 5])  # the second clip ends inside frame 6
    batch = {"codes": codes, "lengths": lengths, "class": torch.tensor([1, 2])}
    other = codes.clone()
    other[1, :, 7:] = torch.randint(0, model.config.vocab_size, (4, 5))
    a, _ = model.loss(batch)
    b, _ = model.loss({**batch, "codes": other})
    assert torch.equal(a, b)
    other[1, 0, 6] = (codes[1, 0, 6] + 1) % model.config.vocab_size
    c, _ = model.loss({**batch, "codes": other})
    assert not torch.equal(a, c)


def test_training_lowers_the_loss_on_a_fixed_batch(codec_dir):
    torch.manual_seed(0)
    model = tiny(codec_dir, cond="none").train()
    codes = torch.arange(4 * 10).reshape(1, 4, 10).repeat(4, 1, 1) % model.config.vocab_size
    losses, logs = fit(model, {"codes": codes}, steps=40, lr=3e-3)
    first = losses[0]
    assert losses[-1] < 0.3 * first
    assert all(float(logs[f"ce_q{k}"]) < first for k in range(4))


def test_holes_fed_back_are_replaced_by_the_special_token(codec_dir):
    model = tiny(codec_dir).double().eval()
    model.set_duration(0.02)
    prefix = model.prefix_embeddings(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.bool))
    units = torch.randint(0, model.config.vocab_size, (2, model.n_units - 1, 4))
    garbage = torch.where(model.step_valid[: model.n_units - 1], units, torch.randint_like(units, 0, 64))
    assert not torch.equal(units, garbage)
    torch.testing.assert_close(model.logits_all(prefix, units), model.logits_all(prefix, garbage), rtol=0, atol=0)
    full = torch.randint(0, model.config.vocab_size, (2, model.n_units, 4))
    full[0, 3, 0] = model.config.vocab_size  # the special id in a valid slot is not a code
    with pytest.raises(ValueError, match="outside"):
        model.decode_units(full)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cached_sampling_equals_uncached(codec_dir, pattern, cfg):
    model = tiny(codec_dir, pattern=pattern).double().eval()
    model.set_duration(0.02)  # 8 frames
    settings = SamplingConfig(cfg=cfg, top_k=10, top_p=0.9, temperature=1.0, seed=7)
    labels = torch.tensor([0, 1, 2])
    cached = AutoregressiveSampler(settings)(model, labels)
    uncached = AutoregressiveSampler(settings, use_cache=False)(model, labels)
    assert cached.shape == (3, model.n_units, model.unit_size)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("pattern", ["delay", "flattened"])
def test_sampled_waveforms_have_the_requested_duration(codec_dir, pattern):
    model = tiny(codec_dir, pattern=pattern, num_codebooks=2).eval()
    for seconds in (0.01, 0.0333):
        model.set_duration(seconds)
        wave = model.sample(torch.tensor([0, 2]), AutoregressiveSampler(SamplingConfig(cfg=2.0, seed=1)))
        assert wave.shape == (2, 1, round(seconds * RATE))
        assert wave.abs().max() <= 1 and torch.isfinite(wave).all()


def test_a_duration_past_the_trained_context_is_refused(codec_dir):
    model = tiny(codec_dir)
    model.set_duration(0.25)
    with pytest.raises(ConfigError, match="longer than the model's trained context of 0.25 s"):
        model.set_duration(0.5)
    with pytest.raises(ConfigError, match="trained context"):
        model.loss({"codes": torch.zeros(1, 4, model.max_frames + 1, dtype=torch.long),
                    "class": torch.tensor([0])})


def test_save_and_load_sample_identically(codec_dir, tmp_path):
    model = tiny(codec_dir, pattern="coarse_first").eval()
    with torch.no_grad():  # make the weights differ from a fresh init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer" / "config.json").is_file()  # codec copied in
    header = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert header["kind"] == "next_token_streams" and header["config"]["tokenizer"] == "tokenizer"
    loaded = type(model).from_pretrained(tmp_path / "ckpt").eval()
    settings = SamplingConfig(cfg=2.0, top_k=20, seed=5)
    for m in (model, loaded):
        m.set_duration(0.02)
    a = model.sample(torch.tensor([0, 1]), AutoregressiveSampler(settings))
    b = loaded.sample(torch.tensor([0, 1]), AutoregressiveSampler(settings))
    assert torch.equal(a, b)


def test_bad_pairings_and_configs_are_clear(codec_dir, tmp_path):
    build_model("vq", "tiny").save_pretrained(tmp_path / "vq")
    with pytest.raises(CheckpointError, match="'audio_codec'.*'vq'"):
        tiny(codec_dir, tokenizer=str(tmp_path / "vq"))
    with pytest.raises(ConfigError, match="rope_axes=1"):
        tiny(codec_dir, trunk={"rope_axes": 2})
    with pytest.raises(ConfigError, match="num_codebooks=5"):
        tiny(codec_dir, num_codebooks=5)
    with pytest.raises(ConfigError, match="tokenizer"):
        build_model("next_token_streams", "tiny", cond="none")
    with pytest.raises(ConfigError, match="pattern"):
        tiny(codec_dir, pattern="zigzag")


def _flac(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def test_trainer_runs_two_steps_on_audio_shards(codec_dir, tmp_path):
    from tessera.data.shards import DatasetInfo, DatasetWriter
    from tessera.train.recipe import Recipe
    from tessera.train.trainer import train

    captions = ["a low hum", "a high beep", "a middle tone", "a quiet whistle"]
    info = DatasetInfo(name="tones", source="test", license="CC0", resolution=0, sample_rate=RATE)
    with DatasetWriter(tmp_path / "tones", info, per_shard=2) as writer:
        for i, (freq, caption) in enumerate(zip((220, 880, 440, 1320), captions)):
            audio = (0.4 * np.sin(2 * np.pi * freq * np.arange(round(0.3 * RATE)) / RATE)).astype(np.float32)
            writer.write_record(f"tone{i}", {"flac": _flac(audio), "txt": caption.encode(),
                                             "json": json.dumps({"freq": freq}).encode()})
    recipe = Recipe.from_dict({
        "model": {"kind": "next_token_streams", "preset": "tiny",
                  "config": {"tokenizer": str(codec_dir), "cond": "text", "text_tokenizer": "auto", "text_len": 8}},
        "data": {"shards": str(tmp_path / "tones"), "shuffle_buffer": 0},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "ckpt_every": 2, "sample_every": 2, "warmup_steps": 0},
        "out": str(tmp_path / "run"),
    })
    metrics = train(recipe, progress=False)
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"]) and "ce_q3" in metrics
    assert list((tmp_path / "run" / "samples").glob("*.wav"))
    from tessera.sample import load_generator
    model = load_generator(tmp_path / "run", device="cpu")
    assert model.kind == "next_token_streams" and model.clip_seconds == 0.25
