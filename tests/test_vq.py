"""VQ tokenizer: shapes, nearest-code lookup, straight-through gradients, training, dead-code
restart (single process and across two gloo ranks), GAN gradient routing, checkpoints."""
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fitting import fit
from tessera.checkpoint import CheckpointError
from tessera.config import ConfigError
from tessera.metrics import psnr
from tessera.modeling import TesseraModel
from tessera.registry import build_model
from tessera.tokenizers import quantizer as quantizer_module
from tessera.tokenizers.quantizer import Quantizer
from tessera.tokenizers.vq import VQConfig, VQTokenizer

# A smaller-than-tiny model (16x16 images, 8x8 tokens) so the training test stays a few seconds.
MICRO = {"image_size": 16, "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
         "z_channels": 16, "norm_groups": 4, "codebook_size": 64, "usage_decay": 0.9}


def micro(**overrides) -> VQTokenizer:
    return VQTokenizer(VQTokenizer.make_config(None, {**MICRO, **overrides}))


def colour_blocks(n: int = 8, size: int = 16, seed: int = 1) -> torch.Tensor:
    """Images whose left and right halves are two random solid colours."""
    colours = torch.rand(n, 2, 3, 1, 1, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    x = torch.empty(n, 3, size, size)
    x[..., : size // 2] = colours[:, 0]
    x[..., size // 2:] = colours[:, 1]
    return x


def test_tiny_encode_decode_shapes():
    model = build_model("vq", "tiny").eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < model.vocab_size == 256
    out = model.decode(codes)
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    emb = model.code_embeddings(codes)
    assert emb.shape == (2, 8, 8, 8)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2, 8, 8))
    torch.testing.assert_close(model.decode_latent(emb), out)
    assert model.downsample_factor == 4 and model.token_grid() == (8, 8) and model.token_grid(64) == (16, 16)
    with pytest.raises(ValueError, match="divisible"):
        model.token_grid(30)
    with pytest.raises(ValueError, match="divisible by 4"):
        model.encode(torch.zeros(1, 3, 30, 30))


def test_presets_validate():
    for name, factor, grid, vocab in (("small", 8, (8, 8), 4096), ("vq16", 16, (16, 16), 16384)):
        config = VQTokenizer.make_config(name)
        assert config.downsample_factor == factor
        assert config.image_size // factor == grid[0] and config.codebook_size == vocab
    assert VQTokenizer.make_config("vq16").code_dim == 8


def test_config_errors():
    with pytest.raises(ConfigError, match="not divisible by the downsample factor 4"):
        VQConfig.from_dict({"image_size": 30})
    with pytest.raises(ConfigError, match="norm_groups=8 must divide"):
        VQConfig.from_dict({"base_channels": 12})
    with pytest.raises(ConfigError, match=r"usage_decay=1.0 is out of range"):
        VQConfig.from_dict({"usage_decay": 1.0})
    with pytest.raises(ConfigError) as err:
        VQConfig.from_dict({"codebook_sise": 512})
    assert "codebook_sise" in str(err.value) and "valid keys" in str(err.value)
    assert "codebook_size" in str(err.value) and "dead_code_threshold" in str(err.value)


@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_quantizer_picks_nearest_code(l2_norm, chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(quantizer_module, "_MAX_SIM_ELEMENTS", 64)
    quant = Quantizer(50, 8, l2_norm=l2_norm)
    z = torch.randn(3, 8, 5, 4)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    weight = quant.embedding.weight.detach()
    if l2_norm:
        expected = F.cosine_similarity(flat[:, None], weight[None], dim=-1).argmax(1)
    else:
        expected = torch.cdist(flat, weight).argmin(1)
    codes = quant.lookup(z)
    assert codes.shape == (3, 5, 4)
    assert torch.equal(codes.flatten(), expected)
    out = quant.eval()(z)
    assert torch.equal(out.indices, codes)
    torch.testing.assert_close(out.z_q, quant.embed(codes))  # straight-through: forward value is the code


def test_straight_through_gradients_reach_encoder():
    model = micro().train()
    images = colour_blocks(4)
    recon, _ = model.reconstruct(images)
    F.mse_loss(recon, images).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0
    emb_grad = model.quantizer.embedding.weight.grad
    assert emb_grad is None or emb_grad.abs().sum() == 0  # the reconstruction never moves the codebook


@pytest.fixture()
def one_thread():
    """Tiny convs gain nothing from intra-op threads, and spinning threads stall on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_raises_psnr(one_thread):
    torch.manual_seed(0)
    model = micro()
    images = colour_blocks(8)
    model.eval()
    before = float(psnr(model.decode(model.encode(images)), images))
    model.train()
    _, logs = fit(model, {"image": images}, steps=150, lr=3e-3)
    model.eval()
    after = float(psnr(model.decode(model.encode(images)), images))
    assert after > before + 10 and after > 22, (before, after)
    assert set(logs) == {"rec_loss", "codebook_loss", "commit_loss", "psnr", "usage", "perplexity", "dead_restarts"}
    assert 0 < float(logs["usage"]) <= 1 and 1 <= float(logs["perplexity"]) <= 64


def test_dead_code_restart_revives_codes():
    model = micro().train()
    quant = model.quantizer
    k = quant.codebook_size
    dead = torch.arange(k) % 2 == 0
    quant.usage.copy_(torch.where(dead, 0.0, 1.0))
    assert model.codebook_usage() == pytest.approx(0.5)
    before = quant.embedding.weight.detach().clone()
    images = colour_blocks(4)

    model.eval()  # no restarts outside training
    model.reconstruct(images)
    assert torch.equal(quant.embedding.weight, before) and model.codebook_usage() == pytest.approx(0.5)

    model.train()
    _, logs = model.loss({"image": images})
    assert float(logs["dead_restarts"]) == k // 2
    after = quant.embedding.weight.detach()
    assert torch.equal(after[~dead], before[~dead])
    assert (after[dead] != before[dead]).any(1).all()
    with torch.no_grad():  # every restarted code is one of the batch's (normalised) latents
        latents = F.normalize(model.quant_conv(model.encoder(images)), dim=1).permute(0, 2, 3, 1).reshape(-1, 8)
    cos = F.normalize(after[dead], dim=1) @ latents.t()
    assert torch.allclose(cos.max(1).values, torch.ones(k // 2), atol=1e-5)
    assert model.codebook_usage() == 1.0


def _restart_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial codebook on every rank
        quant = Quantizer(32, 4, dead_threshold=0.5).train()
        quant.usage[:16] = 0.0
        torch.manual_seed(100 + rank)  # different data and different random picks per rank
        z = torch.randn(2, 4, 3, 3)
        out = quant(z)
        save_file({"weight": quant.embedding.weight.detach(), "usage": quant.usage.clone(),
                   "restarts": out.restarts, "z": F.normalize(z, dim=1).contiguous()}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_dead_code_restart_identical_across_ranks(tmp_path):
    mp.spawn(_restart_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert float(r0["restarts"]) == float(r1["restarts"]) == 16
    assert torch.equal(r0["weight"], r1["weight"]) and torch.equal(r0["usage"], r1["usage"])
    rank0_latents = r0["z"].permute(0, 2, 3, 1).reshape(-1, 4)
    cos = F.normalize(r0["weight"][:16], dim=1) @ rank0_latents.t()
    assert torch.allclose(cos.max(1).values, torch.ones(16), atol=1e-5)  # replacements come from rank 0


def test_gan_discriminator_gradients_come_only_from_d_loss():
    torch.manual_seed(0)
    model = micro(gan_weight=0.5, disc_layers=2, disc_channels=8, dead_code_threshold=0.0).train()
    images = colour_blocks(4)
    disc_params = list(model.discriminator.parameters())

    loss, logs = model.loss({"image": images, "step": 5})
    assert {"gan_d", "gan_g"} <= set(logs) and float(logs["gan_g"]) != 0
    loss.backward()
    full = [p.grad.clone() for p in disc_params]
    model.zero_grad()

    recon, _ = model.reconstruct(images)
    model.discriminator_loss(images, recon.detach()).backward()
    d_only = [p.grad.clone() for p in disc_params]
    for a, b in zip(full, d_only):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in d_only)
    model.zero_grad()

    # Control: a naive generator loss through the live discriminator would have changed D's gradient.
    recon, _ = model.reconstruct(images)
    (model.discriminator_loss(images, recon.detach()) - model.discriminator(recon).mean()).backward()
    assert any(not torch.allclose(p.grad, g) for p, g in zip(disc_params, d_only))


def test_gan_start_step_gates_generator_term():
    model = micro(gan_weight=0.5, gan_start_step=10, disc_layers=2, disc_channels=8).train()
    images = colour_blocks(2)
    _, early = model.loss({"image": images, "step": 9})
    _, late = model.loss({"image": images, "step": 10})
    assert float(early["gan_g"]) == 0 and float(late["gan_g"]) != 0
    assert float(early["gan_d"]) > 0


def test_bf16_autocast_and_bf16_weights():
    model = micro().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = model.loss({"image": colour_blocks(2)})
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.conv_in.weight.grad is not None
    model = model.to(torch.bfloat16).eval()  # a bf16-cast copy (e.g. frozen inside a generator) takes fp32 images
    codes = model.encode(colour_blocks(2))
    assert codes.shape == (2, 8, 8) and model.decode(codes).dtype == torch.bfloat16


def test_save_load_round_trip(tmp_path):
    model = micro(gan_weight=0.1, disc_layers=2, disc_channels=8).eval()
    model.quantizer.usage.copy_(torch.rand(64))
    images = colour_blocks(4)
    model.save_pretrained(tmp_path / "vq")
    loaded = VQTokenizer.from_pretrained(tmp_path / "vq").eval()
    assert loaded.config == model.config
    assert torch.equal(loaded.encode(images), model.encode(images))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert type(TesseraModel.from_pretrained(tmp_path / "vq")) is VQTokenizer


def test_loading_wrong_kind_errors(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"format": 1, "kind": "next_token", "config": {}}))
    with pytest.raises(CheckpointError, match="holds a 'next_token' model, but a 'vq' model was expected"):
        VQTokenizer.from_pretrained(folder)


def test_psnr_helper():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full((2, 3, 4, 4), 0.2)
    assert float(psnr(x, y)) == pytest.approx(20.0, abs=1e-4)  # mse 0.04, range 2 -> 10*log10(4/0.04)
    y[1] = 0.0  # per-image average: identical images hit the MSE floor of 1e-10
    assert float(psnr(x, y)) == pytest.approx((20.0 + 10 * math.log10(4 / 1e-10)) / 2, abs=1e-3)
    with pytest.raises(ValueError):
        psnr(x, y[:1])
