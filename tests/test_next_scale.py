"""VAR next-scale generator: block-causal isolation, cached == uncached sampling, loss, bad pairings."""
import pytest
import torch

from fitting import fit
from tessera.checkpoint import CheckpointError
from tessera.config import ConfigError
from tessera.generators.next_scale import NextScaleGenerator
from tessera.modeling import TesseraModel
from tessera.registry import build_model
from tessera.samplers.autoregressive import ScaleWiseSampler
from tessera.samplers.logits import SamplingConfig


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("msvq") / "tok"
    build_model("multiscale_vq", "tiny").save_pretrained(folder)
    return folder


def tiny(tokenizer_dir, **overrides) -> NextScaleGenerator:
    torch.manual_seed(0)
    return build_model("next_scale", "tiny", tokenizer=str(tokenizer_dir), num_classes=3, **overrides).float().eval()


def images(n=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_layout_follows_the_tokenizer_schedule(tokenizer_dir):
    model = tiny(tokenizer_dir)
    assert model.scales == [1, 2, 4, 8] and model.seq_len == 85 and model.starts == [0, 1, 5, 21]
    # RoPE coordinates of a coarse token sit at the centre of its region on the 8x8 grid.
    assert model.rope_positions[0].tolist() == [3.5, 3.5]


def test_a_finer_scale_never_changes_coarser_outputs(tokenizer_dir):
    model = tiny(tokenizer_dir)
    codes = model.tokenizer.encode_scales(images())
    cond_vec = model.condition_vector(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.bool))
    x = model.teacher_sequence(cond_vec, model.tokenizer.teacher_inputs(codes))
    base = model.outputs_upto(x, cond_vec)
    perturbed = x.clone()
    perturbed[:, model.starts[2]:] += torch.randn_like(perturbed[:, model.starts[2]:])
    out = model.outputs_upto(perturbed, cond_vec)
    torch.testing.assert_close(out[:, : model.starts[2]], base[:, : model.starts[2]])
    assert not torch.allclose(out[:, model.starts[2]:], base[:, model.starts[2]:])


@pytest.mark.parametrize("cfg,schedule", [(1.0, "constant"), (3.0, "linear"), (2.0, "constant")])
def test_cached_sampling_equals_uncached(tokenizer_dir, cfg, schedule):
    model = tiny(tokenizer_dir)
    settings = SamplingConfig(cfg=cfg, cfg_schedule=schedule, top_k=20, top_p=0.9, seed=5)
    labels = torch.tensor([0, 1, 2])
    seen = []
    cached = ScaleWiseSampler(settings, on_scale=lambda k, f: seen.append((k, tuple(f.shape))))(model, labels)
    uncached = ScaleWiseSampler(settings, use_cache=False)(model, labels)
    assert cached.shape == (3, 85)
    assert torch.equal(cached, uncached)
    assert seen == [(k, (3, 8, 8, 8)) for k in range(4)]
    assert model.sample(labels, ScaleWiseSampler(settings)).shape == (3, 3, 32, 32)


def test_compiled_scale_steps_match_eager(tokenizer_dir):
    """The torch.compile'd per-scale step (one specialisation per scale) draws what eager sampling draws."""
    model = tiny(tokenizer_dir)
    settings = SamplingConfig(cfg=3.0, cfg_schedule="linear", top_k=20, top_p=0.9, seed=2)
    labels = torch.tensor([1, 0])
    eager = ScaleWiseSampler(settings)(model, labels)
    compiled = ScaleWiseSampler(settings, compile=True)
    assert torch.equal(compiled(model, labels), eager)
    assert torch.equal(compiled(model, labels), eager)  # second call reuses the cache and the compiled steps
    with pytest.raises(ValueError, match="need use_cache"):
        ScaleWiseSampler(settings, use_cache=False, compile=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_scale_steps_match_eager(tokenizer_dir):
    model = tiny(tokenizer_dir).cuda()
    settings = SamplingConfig(cfg=3.0, cfg_schedule="linear", top_k=20, seed=2)
    labels = torch.tensor([1, 0], device="cuda")
    eager = ScaleWiseSampler(settings)(model, labels)
    graphed = ScaleWiseSampler(settings, cuda_graph=True)
    assert torch.equal(graphed(model, labels), eager)
    assert torch.equal(graphed(model, labels), eager)


def test_samples_with_bf16_weights_without_autocast(tokenizer_dir):
    """Half-precision weights (as the benchmark runs them) sample without dtype clashes; f_hat stays float32."""
    model = tiny(tokenizer_dir).to(torch.bfloat16)
    states = []
    sampler = ScaleWiseSampler(SamplingConfig(cfg=2.0, seed=0), on_scale=lambda k, f: states.append(f.dtype))
    images = model.sample(torch.tensor([0, 1]), sampler)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images.float()).all()
    assert set(states) == {torch.float32}


def test_loss_trains_and_logs_each_scale(tokenizer_dir):
    model = tiny(tokenizer_dir, scale_loss_weights=[1.0, 1.0, 1.0, 2.0]).train()
    batch = {"image": images(4), "class": torch.tensor([0, 1, 2, 0])}
    losses, logs = fit(model, batch, steps=25, lr=3e-3)
    assert losses[-1] < 0.6 * losses[0]
    assert {f"ce_s{k}" for k in range(4)} <= set(logs)


def test_checkpoint_round_trip(tokenizer_dir, tmp_path):
    model = tiny(tokenizer_dir)
    model.save_pretrained(tmp_path / "var")
    loaded = TesseraModel.from_pretrained(tmp_path / "var", ema=False).eval()
    settings = SamplingConfig(cfg=2.0, seed=1)
    labels = torch.tensor([0, 2])
    assert torch.equal(ScaleWiseSampler(settings)(loaded, labels), ScaleWiseSampler(settings)(model, labels))


def test_bad_pairings_name_both_sides(tokenizer_dir, tmp_path):
    build_model("vq", "tiny").save_pretrained(tmp_path / "vq")
    with pytest.raises(CheckpointError, match="next_scale generator needs a 'multiscale_vq' tokenizer.*holds a 'vq'"):
        tiny(tmp_path / "vq")
    with pytest.raises(ConfigError, match="scale_loss_weights has 2 entries.*4 scales"):
        tiny(tokenizer_dir, scale_loss_weights=[1.0, 2.0])


def test_trainer_and_sample_cli_end_to_end(tmp_path):
    from PIL import Image

    from tessera.cli import main
    from tessera.data.shapes import write_shapes_dataset
    from tessera.train.recipe import Recipe
    from tessera.train.trainer import train

    shards = tmp_path / "shapes"
    write_shapes_dataset(shards, n=32, resolution=32, seed=0)
    common = {"data": {"shards": str(shards), "resolution": 32},
              "train": {"steps": 3, "batch_size": 8, "log_every": 1, "ckpt_every": 3, "sample_every": 3,
                        "warmup_steps": 1}}
    train(Recipe.from_dict({"model": {"kind": "multiscale_vq", "preset": "tiny"}, "out": str(tmp_path / "msvq"),
                            **common}), progress=False)
    metrics = train(Recipe.from_dict({
        "model": {"kind": "next_scale", "preset": "tiny",
                  "config": {"tokenizer": str(tmp_path / "msvq"), "cond": "text", "text_tokenizer": "auto"}},
        "out": str(tmp_path / "var"), **common}), progress=False)
    assert metrics["step"] == 3 and "ce_s3" in metrics and metrics["tokens_per_s"] > 0
    assert (tmp_path / "var" / "samples" / "step-0000003.png").is_file()
    grid, strip = tmp_path / "grid.png", tmp_path / "strip.png"
    code = main(["sample", "--ckpt", str(tmp_path / "var"), "--prompt", "a red circle", "--n", "3", "--cfg", "2",
                 "--cfg-schedule", "linear", "--out", str(grid), "--save-scales", str(strip)])
    assert code == 0 and grid.is_file()
    assert Image.open(strip).size == (4 * 32 + 5 * 2, 3 * 32 + 4 * 2)  # 4 scales across, 3 samples down
