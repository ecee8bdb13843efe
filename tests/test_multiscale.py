"""Multi-scale residual quantiser: shapes, teacher-forcing inputs, training, fine-tuning from a VQ."""
import pytest
import torch

from fitting import fit
from tessera.checkpoint import CheckpointError
from tessera.config import ConfigError
from tessera.modeling import TesseraModel
from tessera.registry import build_model


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("multiscale_vq", "tiny", **overrides)


def images(n=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_gives_one_map_per_scale_and_decodes_back_to_pixels():
    model = tiny().eval()
    codes = model.encode_scales(images())
    assert [c.shape for c in codes] == [(2, pn, pn) for pn in (1, 2, 4, 8)]
    assert model.encode(images()).shape == (2, 1 + 4 + 16 + 64)
    assert model.decode_scales(codes).shape == (2, 3, 32, 32)
    torch.testing.assert_close(model.decode(model.encode(images())), model.decode_scales(codes))


def test_teacher_inputs_are_the_downsampled_running_reconstruction():
    model = tiny().eval()
    codes = model.encode_scales(images())
    inputs = model.teacher_inputs(codes)
    assert [x.shape[-1] for x in inputs] == [2, 4, 8]
    for k, x in enumerate(inputs):
        f_hat = model.latent_from_scales(codes[: k + 1])
        torch.testing.assert_close(x, model.next_input(f_hat, k))
    # The residual scheme: each scale's codes were chosen against what the coarser scales left.
    f = model._latents(images())
    errors = [(model.latent_from_scales(codes[: k + 1]) - f).pow(2).mean().item() for k in range(4)]
    assert errors[-1] < errors[0]


def test_training_steps_lower_the_loss_and_track_usage():
    model = tiny(dead_code_threshold=0.0)
    losses, logs = fit(model, {"image": images(8)}, steps=30, lr=2e-3, optimizer=torch.optim.Adam)
    assert losses[-1] < 0.7 * losses[0]
    assert 0 < float(logs["usage"]) <= 1 and float(logs["perplexity"]) >= 1
    assert model.phis[0].conv.weight.grad is not None


def test_checkpoint_round_trip_and_fine_tuning_from_a_single_scale_vq(tmp_path):
    model = tiny().eval()
    model.save_pretrained(tmp_path / "ms")
    loaded = TesseraModel.from_pretrained(tmp_path / "ms", ema=False)
    assert torch.equal(loaded.encode(images()), model.encode(images()))

    vq = build_model("vq", "tiny", l2_norm_codes=False)
    vq.save_pretrained(tmp_path / "vq")
    tuned = build_model("multiscale_vq", "tiny", init_from=str(tmp_path / "vq"))
    torch.testing.assert_close(tuned.encoder.conv_in.weight, vq.encoder.conv_in.weight)
    torch.testing.assert_close(tuned.quantizer.embedding.weight, vq.quantizer.embedding.weight)
    cosine_vq = build_model("vq", "tiny")
    cosine_vq.save_pretrained(tmp_path / "cosine")
    from_cosine = build_model("multiscale_vq", "tiny", init_from=str(tmp_path / "cosine"))
    norms = from_cosine.quantizer.embedding.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    tuned.save_pretrained(tmp_path / "tuned")
    assert TesseraModel.from_pretrained(tmp_path / "tuned").config.init_from == ""


def test_bad_schedules_and_sources_are_named():
    with pytest.raises(ConfigError, match="last scale 4 must equal the latent side 8"):
        tiny(scales=[1, 2, 4])
    with pytest.raises(ConfigError, match="strictly increasing"):
        tiny(scales=[1, 4, 2, 8])


def test_init_from_a_checkpoint_of_another_kind_fails(tmp_path):
    tiny().save_pretrained(tmp_path / "ms")
    with pytest.raises(CheckpointError, match="holds a 'multiscale_vq' model; a 'vq' tokenizer is needed"):
        tiny(init_from=str(tmp_path / "ms"))


def test_eval_tokenizer_covers_multiscale_and_kl(tmp_path):
    from tessera.data.shapes import write_shapes_dataset
    from tessera.eval.reconstruction import evaluate_tokenizer

    write_shapes_dataset(tmp_path / "shapes", n=8, resolution=32, seed=0)
    tiny().save_pretrained(tmp_path / "ms")
    build_model("kl", "tiny", image_size=32).save_pretrained(tmp_path / "kl")
    ms = evaluate_tokenizer(tmp_path / "ms", tmp_path / "shapes", n=8, batch_size=4)
    assert ms["images"] == 8 and 0 < ms["codes_used"] <= 8 * 85 and ms["psnr_db"] > 0
    kl = evaluate_tokenizer(tmp_path / "kl", tmp_path / "shapes", n=8, batch_size=4)
    assert set(kl) == {"images", "psnr_db"} and kl["psnr_db"] > 0
    build_model("next_scale", "tiny", tokenizer=str(tmp_path / "ms")).save_pretrained(tmp_path / "var")
    with pytest.raises(CheckpointError, match="not an image tokenizer"):
        evaluate_tokenizer(tmp_path / "var", tmp_path / "shapes", n=2)
