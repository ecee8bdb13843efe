"""MaskGIT and MAGNeT: masked loss, exact decoding schedule, known tokens kept, restricted context,
stream-by-stream decoding, rescoring, hybrid prefixes, checkpoints."""
import math

import pytest
import torch

from fitting import fit
from tessera.checkpoint import CheckpointError
from tessera.config import ConfigError
from tessera.modeling import TesseraModel
from tessera.registry import build_model
from tessera.samplers.logits import SamplingConfig
from tessera.samplers.masked import MaskedSampler, MaskedSamplingConfig, StreamMaskedSampler


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vq") / "vq"
    build_model("vq", "tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("codec") / "codec"
    build_model("audio_codec", "tiny").save_pretrained(folder)
    return folder


def maskgit(vq_dir, **overrides):
    torch.manual_seed(0)
    return build_model("maskgit", "tiny", tokenizer=str(vq_dir), num_classes=3, **overrides).eval()


def magnet(codec_dir, **overrides):
    torch.manual_seed(0)
    return build_model("magnet", "tiny", tokenizer=str(codec_dir), num_classes=3, clip_seconds=0.05,
                       **overrides).eval()


def test_decoding_follows_the_schedule_exactly(vq_dir):
    model = maskgit(vq_dir)
    counts = []
    masked = MaskedSamplingConfig(steps=6, schedule="cosine")
    sampler = MaskedSampler(SamplingConfig(cfg=2.0, seed=0), masked,
                            on_step=lambda t, tokens: counts.append((tokens == model.mask_id).sum(1).tolist()))
    tokens = sampler(model, torch.tensor([0, 1]))
    n = model.n_tokens
    assert counts == [[math.floor(n * math.cos(math.pi / 2 * (t + 1) / 6))] * 2 for t in range(5)] + [[0, 0]]
    assert tokens.shape == (2, n) and int(tokens.max()) < model.vocab_size
    images = model.sample(torch.tensor([0, 1]), sampler)
    assert images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("schedule", ["constant", "decreasing", "increasing"])
def test_a_fully_known_sequence_changes_nothing(vq_dir, schedule):
    model = maskgit(vq_dir)
    known = torch.randint(0, model.vocab_size, (2, model.n_tokens))
    settings = SamplingConfig(cfg=3.0, cfg_schedule=schedule, seed=1)
    assert torch.equal(MaskedSampler(settings)(model, torch.tensor([0, 2]), init=known), known)
    partly = known.clone()
    partly[:, ::2] = model.mask_id
    filled = MaskedSampler(settings)(model, torch.tensor([0, 2]), init=partly)
    assert torch.equal(filled[:, 1::2], known[:, 1::2]) and (filled != model.mask_id).all()


def test_maskgit_loss_is_on_masked_positions_and_trains(vq_dir):
    model = maskgit(vq_dir).train()
    tokens = model.tokenizer.encode(torch.rand(4, 3, 32, 32) * 2 - 1)
    batch = {"tokens": tokens, "class": torch.tensor([0, 1, 2, 0])}
    losses, logs = fit(model, batch, steps=40, lr=3e-3)
    assert 0 < logs["masked_frac"] <= 1 and sum(losses[-5:]) < 0.85 * sum(losses[:5])  # ratios vary per step; measured 0.77
    # the loss never sees unmasked positions: with every ratio forced to its minimum (one token), only one counts
    model.draw_ratios = lambda b, device: torch.zeros(b, device=device)
    _, logs = model(batch)
    assert logs["masked_frac"] == pytest.approx(1 / model.n_tokens)


def test_magnet_restricted_context_for_streams_above_zero(codec_dir):
    model = magnet(codec_dir, stage_context=2)
    t = model.frames
    codes = torch.randint(0, model.vocab_size, (1, model.num_streams, t))
    prefix = model.prefix_embeddings(torch.tensor([0]), torch.zeros(1, dtype=torch.bool))
    far = codes.clone()
    far[:, :, -1] = (far[:, :, -1] + 1) % model.vocab_size  # change the last frame only
    with torch.no_grad():
        for stage in (0, 1):
            base, moved = model.stage_logits(prefix, codes, stage), model.stage_logits(prefix, far, stage)
            reach = 2 * model.config.trunk.n_layers  # +-2 frames per layer
            far_frames_same = torch.allclose(base[:, : t - 1 - reach], moved[:, : t - 1 - reach], atol=1e-6)
            assert far_frames_same == (stage > 0)  # stage 0 attends globally; the others within the band


def test_magnet_decodes_stream_by_stream_with_per_stream_steps(codec_dir):
    model = magnet(codec_dir)
    seen = []
    masked = MaskedSamplingConfig.magnet(stage_steps=[4, 2, 2, 2])
    sampler = StreamMaskedSampler(SamplingConfig(cfg=3.0, cfg_schedule="decreasing", temperature=3.0, top_p=0.9),
                                  masked, on_step=lambda k, codes: seen.append(
                                      (k, [(codes[:, j] == model.mask_id).any().item() for j in range(4)])))
    codes = sampler(model, torch.tensor([0, 1]))
    assert [k for k, _ in seen] == [0] * 4 + [1] * 2 + [2] * 2 + [3] * 2
    # while stream k decodes, the streams above it stay fully masked; after its last step it is complete
    assert seen[3] == (0, [False, True, True, True]) and seen[5] == (1, [False, False, True, True])
    assert codes.shape == (2, 4, model.frames) and (codes < model.vocab_size).all()
    wave = model.sample(torch.tensor([0, 1]), sampler)
    assert wave.shape == (2, 1, model.frames * model.tokenizer.hop_length)


def test_magnet_hybrid_prefix_is_kept_and_rescoring_ranks_positions(codec_dir):
    model = magnet(codec_dir)
    t = model.frames
    init = torch.full((1, 4, t), model.mask_id)
    init[:, :, :3] = torch.randint(0, model.vocab_size, (1, 4, 3))
    out = StreamMaskedSampler(SamplingConfig(seed=2), MaskedSamplingConfig.magnet(stage_steps=[3, 1, 1, 1]))(
        model, torch.tensor([1]), init=init)
    assert torch.equal(out[:, :, :3], init[:, :, :3]) and (out != model.mask_id).all()
    # with weight 1 and no Gumbel noise, the rescorer alone decides which positions are kept first:
    # it prefers late frames, so after the first step of stream 0 the earliest frames are still masked
    first = []
    rescorer = lambda codes, k, cond: torch.arange(codes.shape[-1], dtype=torch.float32).expand(codes.shape[0], -1)  # noqa: E731
    sampler = StreamMaskedSampler(SamplingConfig(seed=0), MaskedSamplingConfig.magnet(
        stage_steps=[4, 1, 1, 1], span=1, rescore_weight=1.0), rescorer=rescorer,
        on_step=lambda k, codes: first.append(codes[0, 0].clone()) if not first else None)
    sampler(model, torch.tensor([0]))
    still_masked = (first[0] == model.mask_id).nonzero().flatten().tolist()
    assert still_masked == list(range(len(still_masked))) and 0 < len(still_masked) < t


def test_magnet_trains_with_span_masks_and_checks_durations(codec_dir, tmp_path):
    model = magnet(codec_dir).train()
    batch = {"audio": torch.randn(3, 1, 800) * 0.1, "lengths": torch.tensor([800, 600, 400]),
             "class": torch.tensor([0, 1, 2])}
    loss, logs = model(batch)
    assert torch.isfinite(loss) and 0 < logs["masked_frac"] < 1
    loss.backward()
    with pytest.raises(ConfigError, match="trained context"):
        model.set_duration(1.0)
    model.set_duration(0.025)
    assert model.frames == 10
    model.eval().save_pretrained(tmp_path / "magnet")
    loaded = TesseraModel.from_pretrained(tmp_path / "magnet", ema=False)
    settings = SamplingConfig(seed=4)
    masked = MaskedSamplingConfig.magnet(stage_steps=[2, 1, 1, 1])
    assert torch.equal(StreamMaskedSampler(settings, masked)(loaded, torch.tensor([0])),
                       StreamMaskedSampler(settings, masked)(magnet(codec_dir), torch.tensor([0])))


def test_wrong_tokenizer_kinds_are_named(vq_dir, codec_dir):
    with pytest.raises(CheckpointError, match="audio_codec"):
        build_model("maskgit", "tiny", tokenizer=str(codec_dir))
    with pytest.raises(CheckpointError, match="vq"):
        build_model("magnet", "tiny", tokenizer=str(vq_dir))
    with pytest.raises(ConfigError, match="stage_steps"):
        MaskedSamplingConfig.from_dict({"stage_steps": []})


def test_train_and_sample_cli_end_to_end(tmp_path, audio_shards):
    import soundfile
    from PIL import Image

    from tessera.cli import main
    from tessera.data.shapes import write_shapes_dataset
    from tessera.train.recipe import Recipe
    from tessera.train.trainer import train

    quick = {"steps": 2, "batch_size": 2, "log_every": 1, "ckpt_every": 2, "sample_every": 2, "warmup_steps": 1}
    shapes = tmp_path / "shapes"
    write_shapes_dataset(shapes, n=8, resolution=32, seed=0)
    train(Recipe.from_dict({"model": {"kind": "vq", "preset": "tiny"}, "data": {"shards": str(shapes)},
                            "train": quick, "out": str(tmp_path / "vq")}), progress=False)
    metrics = train(Recipe.from_dict({
        "model": {"kind": "maskgit", "preset": "tiny", "config": {"tokenizer": str(tmp_path / "vq"), "cond": "text",
                                                                  "text_tokenizer": "auto"}},
        "data": {"shards": str(shapes)}, "train": quick, "out": str(tmp_path / "maskgit")}), progress=False)
    assert metrics["step"] == 2 and "acc" in metrics
    grid = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(tmp_path / "maskgit"), "--prompt", "a red circle", "--n", "2", "--steps", "4",
                 "--cfg", "2", "--cfg-schedule", "increasing", "--out", str(grid)]) == 0
    assert Image.open(grid).size == (2 * 32 + 3 * 2, 32 + 2 * 2)

    train(Recipe.from_dict({"model": {"kind": "audio_codec", "preset": "tiny", "config": {"clip_seconds": 0.1}},
                            "data": {"shards": str(audio_shards)}, "train": quick, "out": str(tmp_path / "codec")}),
          progress=False)
    metrics = train(Recipe.from_dict({
        "model": {"kind": "magnet", "preset": "tiny",
                  "config": {"tokenizer": str(tmp_path / "codec"), "cond": "text", "text_tokenizer": "auto",
                             "clip_seconds": 0.1}},
        "data": {"shards": str(audio_shards)}, "train": quick, "out": str(tmp_path / "magnet")}), progress=False)
    assert metrics["step"] == 2 and (tmp_path / "magnet" / "samples" / "step-0000002.wav").is_file()
    wav = tmp_path / "tone.wav"
    assert main(["sample", "--ckpt", str(tmp_path / "magnet"), "--prompt", "instrument note, sine", "--n", "2",
                 "--duration", "0.05", "--steps", "3,1,1,1", "--out", str(wav)]) == 0
    audio, rate = soundfile.read(str(tmp_path / "tone-1.wav"))
    assert rate == 16000 and len(audio) == 800
    assert main(["sample", "--ckpt", str(tmp_path / "magnet"), "--duration", "5", "--out", str(wav)]) == 2
    assert main(["sample", "--ckpt", str(tmp_path / "maskgit"), "--duration", "5", "--out", str(wav)]) == 2


def test_hybrid_and_rescoring_with_a_multistream_ar_model(codec_dir, tmp_path):
    from tessera.cli import main

    magnet(codec_dir).save_pretrained(tmp_path / "magnet")
    torch.manual_seed(0)
    build_model("next_token_streams", "tiny", tokenizer=str(codec_dir), num_classes=3,
                clip_seconds=0.05).save_pretrained(tmp_path / "ar")
    build_model("vq", "tiny").save_pretrained(tmp_path / "vq")
    wav = tmp_path / "hybrid.wav"
    common = ["sample", "--ckpt", str(tmp_path / "magnet"), "--n", "1", "--steps", "2,1,1,1", "--out", str(wav)]
    assert main(common + ["--rescore-ckpt", str(tmp_path / "ar"), "--hybrid-seconds", "0.02"]) == 0 and wav.is_file()
    assert main(common + ["--rescore-ckpt", str(tmp_path / "ar"), "--masked-rescore-weight", "0.5"]) == 0
    assert main(common + ["--rescore-ckpt", str(tmp_path / "vq")]) == 2  # not an AR audio model
    assert main(common + ["--hybrid-seconds", "0.02"]) == 2  # no AR model to start with
    # the hybrid head is the AR model's own sample, kept by masked decoding
    from tessera.samplers.autoregressive import AutoregressiveSampler
    from tessera.samplers.masked import HybridSampler
    ar = TesseraModel.from_pretrained(tmp_path / "ar", ema=False).eval()
    model = magnet(codec_dir)
    settings = SamplingConfig(seed=3)
    hybrid = HybridSampler(StreamMaskedSampler(settings, MaskedSamplingConfig.magnet(stage_steps=[2, 1, 1, 1])),
                           ar, AutoregressiveSampler(settings), 0.02)
    codes = hybrid(model, torch.tensor([1]))
    ar.set_duration(0.02)
    head = ar.units_to_codes(AutoregressiveSampler(settings)(ar, torch.tensor([1])))
    assert torch.equal(codes[:, :, : head.shape[-1]], head) and (codes < model.vocab_size).all()


def test_compiled_forward_decodes_like_eager(vq_dir, codec_dir):
    """compile=True (torch.compile of the model's forward) fills the same tokens as the eager path."""
    settings = SamplingConfig(cfg=2.0, seed=4)
    labels = torch.tensor([0, 2])
    image_model = maskgit(vq_dir).float()
    masked = MaskedSamplingConfig(steps=4)
    eager = MaskedSampler(settings, masked)(image_model, labels)
    compiled = MaskedSampler(settings, masked, compile=True)
    assert torch.equal(compiled(image_model, labels), eager)
    audio_model = magnet(codec_dir).float()
    streams = MaskedSamplingConfig.magnet(stage_steps=[2, 1, 1, 1])
    eager = StreamMaskedSampler(settings, streams)(audio_model, labels)
    assert torch.equal(StreamMaskedSampler(settings, streams, compile=True)(audio_model, labels), eager)
