"""KL autoencoder: shapes, scaling factor, training, checkpoint round trip, config errors."""
import pytest
import torch

from tessera.config import ConfigError
from tessera.modeling import TesseraModel
from tessera.registry import build_model
from tessera.tokenizers.continuous import estimate_scaling_factor


def images(n=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("kl", "tiny", **overrides)


def test_encode_decode_shapes_and_scaling():
    model = tiny().eval()
    assert model.latent_shape() == (4, 16, 16)
    z = model.encode(images())
    assert z.shape == (2, 4, 16, 16) and model.decode(z).shape == (2, 3, 32, 32)
    scaled = tiny(scaling_factor=2.0).eval()
    torch.testing.assert_close(scaled.encode(images()), 2 * z)
    torch.testing.assert_close(scaled.decode(2 * z), model.decode(z))
    assert estimate_scaling_factor(torch.randn(1000) * 4) == pytest.approx(0.25, rel=0.1)


def test_training_lowers_the_loss():
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    smooth = torch.nn.functional.interpolate(images(4)[:, :, :4, :4], size=(32, 32), mode="bilinear")
    batch = {"image": smooth}
    losses = []
    for _ in range(40):
        loss, logs = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and {"rec_loss", "kl", "psnr"} <= set(logs)


def test_checkpoint_round_trip(tmp_path):
    model = tiny().eval()
    model.save_pretrained(tmp_path / "kl")
    loaded = TesseraModel.from_pretrained(tmp_path / "kl", ema=False).eval()
    torch.testing.assert_close(loaded.encode(images()), model.encode(images()))


def test_bad_configs():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        tiny(block_out_channels=[30, 64])
    with pytest.raises(ConfigError, match="not divisible by the downsample factor"):
        tiny(image_size=33)
    with pytest.raises(ConfigError, match="scaling_factor"):
        tiny(scaling_factor=0.0)
