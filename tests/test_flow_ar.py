"""FlowAR: scale layout over a KL latent, cached == uncached flow sampling, training, bad pairings."""
import pytest
import torch
import torch.nn.functional as F

from fitting import fit
from tessera.checkpoint import CheckpointError
from tessera.config import ConfigError
from tessera.modeling import TesseraModel
from tessera.registry import build_model
from tessera.samplers.flow import FlowSamplingConfig, FlowScaleSampler
from tessera.samplers.logits import SamplingConfig


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("kl") / "tok"
    build_model("kl", "tiny", image_size=32).save_pretrained(folder)
    return folder


def tiny(kl_dir, **overrides):
    torch.manual_seed(0)
    kw = {"tokenizer": str(kl_dir), "image_size": 32, "num_classes": 3, "head_width": 32, "head_depth": 2,
          "scales": [1, 2, 4, 8, 16], **overrides}
    return build_model("flow_ar", "tiny", **kw).float().eval()


def images(n=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_scales_double_up_to_the_latent_side(kl_dir):
    model = tiny(kl_dir, scales=[])
    assert model.scales == [1, 2, 4, 8, 16] and model.seq_len == 341


def test_scale_inputs_are_the_bicubic_upsampling_of_the_previous_scale(kl_dir):
    """The next scale's input (matrix-product bicubic) equals F.interpolate's bicubic of the map before it."""
    model = tiny(kl_dir)
    for k in range(1, len(model.scales)):
        state = torch.randn(2, model.latent_channels, model.scales[k - 1], model.scales[k - 1])
        want = F.interpolate(state, size=(model.scales[k],) * 2, mode="bicubic")
        torch.testing.assert_close(model.next_input_map(state, k), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg,schedule", [(1.0, "constant"), (2.5, "linear")])
def test_cached_flow_sampling_equals_uncached(kl_dir, cfg, schedule):
    model = tiny(kl_dir)
    settings = SamplingConfig(cfg=cfg, cfg_schedule=schedule, seed=3)
    flow = FlowSamplingConfig(steps=4, solver="heun")
    labels = torch.tensor([0, 2])
    seen = []
    cached = FlowScaleSampler(settings, flow, on_scale=lambda k, s: seen.append(tuple(s.shape)))(model, labels)
    uncached = FlowScaleSampler(settings, flow, use_cache=False)(model, labels)
    c = model.latent_channels
    assert cached.shape == (2, c, 16, 16) and seen[0] == (2, c, 1, 1) and seen[-1] == (2, c, 16, 16)
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)
    assert model.sample(labels, FlowScaleSampler(settings, flow)).shape == (2, 3, 32, 32)


def test_guidance_interval_on_flow_time(kl_dir):
    """Guidance limited to a flow-time interval: an empty-effect interval equals unguided sampling
    (per scale), the full interval equals constant guidance, a partial one differs from both."""
    model = tiny(kl_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # the flow head starts at zero; random weights make it depend on the condition
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    labels = torch.tensor([0, 2])
    flow = FlowSamplingConfig(steps=4)
    settings = SamplingConfig(cfg=3.0, seed=1)

    def run(**interval):
        return FlowScaleSampler(settings, flow.replace(**interval))(model, labels)
    full, partial = run(), run(cfg_interval_start=0.0, cfg_interval_end=0.5)
    torch.testing.assert_close(run(cfg_interval_start=0.0, cfg_interval_end=1.0), full)
    unguided = FlowScaleSampler(settings.replace(cfg=1.0), flow)(model, labels)
    # the grid is 0, .25, .5, .75: [0.9, 1] holds no step start, so no step is guided
    torch.testing.assert_close(run(cfg_interval_start=0.9, cfg_interval_end=1.0), unguided, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(partial, full) and not torch.allclose(partial, unguided)


def test_training_lowers_the_flow_loss_and_logs_each_scale(kl_dir):
    model = tiny(kl_dir).train()
    batch = {"image": images(4), "class": torch.tensor([0, 1, 2, 0])}
    torch.manual_seed(0)
    losses, logs = fit(model, batch, steps=40, lr=2e-3)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert {f"flow_s{k}" for k in range(5)} <= set(logs)


def test_checkpoint_round_trip(kl_dir, tmp_path):
    model = tiny(kl_dir)
    model.save_pretrained(tmp_path / "flowar")
    loaded = TesseraModel.from_pretrained(tmp_path / "flowar", ema=False).eval()
    sampler = FlowScaleSampler(SamplingConfig(cfg=2.0, seed=1), FlowSamplingConfig(steps=2))
    labels = torch.tensor([1])
    torch.testing.assert_close(sampler(loaded, labels), sampler(model, labels))


def test_bad_schedules_and_tokenizers_are_named(kl_dir, tmp_path):
    with pytest.raises(ConfigError, match="last scale 8 does not match the latent side 16"):
        tiny(kl_dir, scales=[1, 2, 4, 8])
    build_model("vq", "tiny").save_pretrained(tmp_path / "vq")
    with pytest.raises(CheckpointError, match="flow_ar generator needs a 'kl' tokenizer.*holds a 'vq'"):
        tiny(tmp_path / "vq")


def test_trainer_and_sample_cli_end_to_end(tmp_path):
    from PIL import Image

    from tessera.cli import main
    from tessera.data.shapes import write_shapes_dataset
    from tessera.train.recipe import Recipe
    from tessera.train.trainer import train

    shards = tmp_path / "shapes"
    write_shapes_dataset(shards, n=16, resolution=32, seed=0)
    common = {"data": {"shards": str(shards), "resolution": 32},
              "train": {"steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 2, "sample_every": 2,
                        "warmup_steps": 1}}
    train(Recipe.from_dict({"model": {"kind": "kl", "preset": "tiny", "config": {"image_size": 32}},
                            "out": str(tmp_path / "kl"), **common}), progress=False)
    metrics = train(Recipe.from_dict({
        "model": {"kind": "flow_ar", "preset": "tiny",
                  "config": {"tokenizer": str(tmp_path / "kl"), "image_size": 32, "cond": "text",
                             "text_tokenizer": "auto", "head_width": 32, "head_depth": 1}},
        "out": str(tmp_path / "flowar"), **common}), progress=False)
    assert metrics["step"] == 2 and "flow_s0" in metrics
    grid, strip = tmp_path / "grid.png", tmp_path / "strip.png"
    code = main(["sample", "--ckpt", str(tmp_path / "flowar"), "--prompt", "a blue square", "--n", "2", "--cfg", "2",
                 "--flow-steps", "3", "--flow-solver", "heun", "--flow-cfg-interval-end", "0.7", "--out", str(grid),
                 "--save-scales", str(strip)])
    assert code == 0 and grid.is_file()
    assert Image.open(strip).size[0] == 5 * 32 + 6 * 2
    assert main(["sample", "--ckpt", str(tmp_path / "flowar"), "--prompt", "x", "--flow-steps", "0",
                 "--out", str(grid)]) == 2
