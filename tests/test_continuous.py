"""KL autoencoder: shapes, scaling factor, loss and training, checkpoints, config errors, the trainer."""
import pytest
import torch

from fitting import fit
from tessera.config import ConfigError
from tessera.modeling import TesseraModel
from tessera.registry import build_model
from tessera.tokenizers.continuous import KLAutoencoder, KLConfig, estimate_scaling_factor


def images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def colour_blocks(n: int = 4, size: int = 16, seed: int = 1) -> torch.Tensor:
    """Images whose left and right halves are two random solid colours (learnable in a few steps)."""
    colours = torch.rand(n, 2, 3, 1, 1, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    x = torch.empty(n, 3, size, size)
    x[..., : size // 2] = colours[:, 0]
    x[..., size // 2:] = colours[:, 1]
    return x


def tiny(**overrides) -> KLAutoencoder:
    return build_model("kl", "tiny", **overrides)


def test_encode_decode_shapes():
    model = tiny().eval()
    x = images(2)
    z = model.encode(x)
    assert model.latent_shape() == (4, 16, 16) and model.latent_shape(64) == (4, 32, 32)
    assert z.shape == (2, *model.latent_shape())
    out = model.decode(z)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert model.encode(x, sample=True, generator=torch.Generator().manual_seed(0)).shape == z.shape
    with pytest.raises(ValueError, match="divisible by 2"):
        model.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\) latents"):
        model.decode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="not divisible by the downsample factor 2"):
        model.latent_shape(33)


def test_presets_validate():
    small = KLAutoencoder.make_config("small")
    assert small.image_size == 64 and small.downsample_factor == 8
    assert KLAutoencoder(small).latent_shape() == (4, 8, 8)


def test_scaling_factor_is_applied():
    model = tiny().eval()
    x = images(2)
    z1 = model.encode(x)
    decoded = model.decode(z1)
    model.set_scaling_factor(2.0)
    assert model.config.scaling_factor == 2.0
    torch.testing.assert_close(model.encode(x), 2 * z1)
    torch.testing.assert_close(model.decode(2 * z1), decoded)
    with pytest.raises(ConfigError, match="scaling_factor"):
        model.set_scaling_factor(-1.0)


def test_estimate_scaling_factor_gives_unit_std():
    model = tiny().eval()
    x = images(8)
    factor = estimate_scaling_factor(model.encode(x))
    model.set_scaling_factor(factor)
    assert abs(float(model.encode(x).std()) - 1.0) < 1e-4
    with pytest.raises(ValueError, match="std"):
        estimate_scaling_factor(torch.zeros(2, 4, 2, 2))


@pytest.mark.parametrize("rec_loss", ["l1", "mse"])
def test_loss_is_finite_and_backward_reaches_every_weight(rec_loss):
    model = tiny(rec_loss=rec_loss).train()
    loss, logs = model({"image": images(2)})
    assert torch.isfinite(loss) and set(logs) == {"rec_loss", "kl", "psnr"}
    assert all(torch.isfinite(v) for v in logs.values()) and float(logs["kl"]) >= 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)  # the posterior samples draw from the global generator
    model = tiny().train()
    losses, _ = fit(model, {"image": colour_blocks()}, steps=16, lr=2e-3)
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_round_trip(tmp_path):
    model = tiny(scaling_factor=0.5).eval()
    assert set(model.trainable_state_dict()) == set(model.state_dict())  # no frozen or buffer-only state
    model.save_pretrained(tmp_path / "kl")
    assert sorted(p.name for p in (tmp_path / "kl").iterdir()) == ["config.json", "model.safetensors"]
    loaded = TesseraModel.from_pretrained(tmp_path / "kl").eval()
    assert isinstance(loaded, KLAutoencoder) and loaded.config == model.config
    x = images(2)
    torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)
    z = model.encode(x)
    torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)


@pytest.mark.parametrize("overrides,message", [
    ({"image_size": 31}, "image_size=31 is not divisible by the downsample factor 2"),
    ({"block_out_channels": [16, 20]}, "norm_num_groups=8 must divide every width"),
    ({"block_out_channels": []}, "non-empty list"),
    ({"latent_channels": 0}, r"latent_channels=0 is out of range"),
    ({"kl_weight": -1.0}, r"kl_weight=-1.0 is out of range"),
    ({"scaling_factor": 0.0}, r"scaling_factor=0.0 is out of range: it must be > 0.0"),
    ({"rec_loss": "l3"}, "'l3' is not one of"),
    ({"kl_wieght": 1.0}, "unknown config key kl_wieght.*valid keys"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        KLConfig.from_dict(overrides)


def test_trains_through_the_trainer(tmp_path):
    from tessera.data.shapes import write_shapes_dataset
    from tessera.train.recipe import Recipe
    from tessera.train.trainer import train

    shards = tmp_path / "shapes"
    write_shapes_dataset(shards, n=32, resolution=32, seed=0)
    recipe = Recipe.from_dict({
        "model": {"kind": "kl", "preset": "tiny", "config": {"image_size": 32}},
        "data": {"shards": str(shards), "resolution": 32},
        "train": {"steps": 3, "batch_size": 4, "log_every": 1, "ckpt_every": 3, "sample_every": 3, "warmup_steps": 1},
        "out": str(tmp_path / "run")})
    metrics = train(recipe, progress=False)
    assert metrics["step"] == 3 and {"rec_loss", "kl", "psnr"} <= set(metrics)
    assert (tmp_path / "run" / "samples" / "step-0000003.png").is_file()
    loaded = TesseraModel.from_pretrained(tmp_path / "run")
    assert isinstance(loaded, KLAutoencoder) and loaded.latent_shape() == (4, 16, 16)
