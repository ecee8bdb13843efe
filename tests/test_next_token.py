"""Next-token generator: Token-Shuffle bookkeeping, s=1 is the plain path, cached = uncached sampling."""
import pytest
import torch

from fitting import fit
from tessera.config import ConfigError
from tessera.generators.next_token import NextTokenGenerator
from tessera.generators.token_shuffle import tokens_to_units, units_to_tokens
from tessera.nn.masks import AttentionMask
from tessera.registry import build_model
from tessera.samplers.autoregressive import AutoregressiveSampler
from tessera.samplers.logits import SamplingConfig


def tiny(**kw) -> NextTokenGenerator:
    overrides = {"vocab_size": 32, "grid_size": 4, "num_classes": 3, **kw}
    return build_model("next_token", "tiny", **overrides).double().eval()


@pytest.mark.parametrize("s", [1, 2, 4])
def test_shuffle_unshuffle_is_identity(s):
    tokens = torch.randint(0, 100, (3, 8, 8))
    units = tokens_to_units(tokens, s)
    assert units.shape == (3, (8 // s) ** 2, s * s)
    assert torch.equal(units_to_tokens(units, 8, s), tokens)


def test_units_are_spatial_windows():
    tokens = torch.arange(16).reshape(1, 4, 4)
    units = tokens_to_units(tokens, 2)
    assert units[0, 0].tolist() == [0, 1, 4, 5]
    assert units[0, 1].tolist() == [2, 3, 6, 7]
    assert units[0, 2].tolist() == [8, 9, 12, 13]


def test_s1_is_the_plain_model_path():
    """With s=1 the logits equal embedding -> trunk -> head computed by hand (no shuffle modules)."""
    model = tiny()
    assert model.shuffle is None
    labels = torch.tensor([0, 2])
    tokens = torch.randint(0, 32, (2, 4, 4))
    prefix = model.prefix_embeddings(labels, torch.zeros(2, dtype=torch.bool))
    logits = model.logits_all(prefix, tokens_to_units(tokens, 1)[:, :-1])
    x = torch.cat([model.prefix.table(labels)[:, None], model.token_embedding(tokens.flatten(1)[:, :-1])], 1)
    rows = torch.arange(16)
    rope = torch.cat([torch.zeros(1, 2), torch.stack([rows // 4, rows % 4], -1).double()])[:16]
    by_hand = model.head(model.trunk(x, rope, AttentionMask.causal()))
    torch.testing.assert_close(logits[:, :, 0], by_hand)


def test_token_shuffle_reduces_trunk_length_and_trains():
    model = tiny(token_shuffle=2).float().train()
    assert model.n_units == 4 and model.unit_size == 4
    batch = {"tokens": torch.randint(0, 32, (4, 4, 4)), "class": torch.tensor([0, 1, 2, 0])}
    loss, logs = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.shuffle.compress.weight.grad is not None
    assert 0 <= float(logs["acc"]) <= 1


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("cfg,schedule", [(1.0, "constant"), (3.0, "constant"), (2.5, "linear"), (4.0, "half_linear")])
def test_cached_sampling_equals_uncached(s, cfg, schedule):
    model = tiny(token_shuffle=s)
    settings = SamplingConfig(cfg=cfg, cfg_schedule=schedule, top_k=10, top_p=0.9, temperature=1.0, seed=7)
    labels = torch.tensor([0, 1, 2])
    cached = AutoregressiveSampler(settings, use_cache=True)(model, labels)
    uncached = AutoregressiveSampler(settings, use_cache=False)(model, labels)
    assert cached.shape == (3, model.n_units, model.unit_size)
    assert torch.equal(cached, uncached)


def test_sampling_depends_on_seed_and_is_reproducible():
    model = tiny()
    labels = torch.tensor([0, 1])
    a = AutoregressiveSampler(SamplingConfig(seed=1))(model, labels)
    b = AutoregressiveSampler(SamplingConfig(seed=1))(model, labels)
    c = AutoregressiveSampler(SamplingConfig(seed=2))(model, labels)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_reduces_loss_on_a_fixed_pattern():
    model = tiny().float().train()
    tokens = torch.arange(16).reshape(1, 4, 4).repeat(8, 1, 1) % 32
    batch = {"tokens": tokens, "class": torch.zeros(8, dtype=torch.long)}
    losses, _ = fit(model, batch, steps=60, lr=3e-3)
    assert losses[-1] < 0.2 * losses[0]


def test_bad_configs_are_clear():
    with pytest.raises(ConfigError, match="vocab_size and grid_size"):
        build_model("next_token", "tiny")
    with pytest.raises(ConfigError, match="token_shuffle"):
        build_model("next_token", "tiny", vocab_size=8, grid_size=6, token_shuffle=4)
    with pytest.raises(ConfigError, match="valid keys"):
        build_model("next_token", "tiny", vocab_size=8, grid_size=4, depth=3)
    with pytest.raises(ConfigError, match="unknown class"):
        tiny().parse_condition(["giraffe"], 2)


def test_compiled_decode_step_matches_eager():
    """The torch.compile'd decode step (bucketed KV slots) draws the same tokens as eager sampling."""
    model = tiny().float()
    settings = SamplingConfig(cfg=3.0, top_k=10, seed=3)
    labels = torch.tensor([0, 1])
    eager = AutoregressiveSampler(settings)(model, labels)
    for bucket in (8, 0):
        compiled_sampler = AutoregressiveSampler(settings, compile=True, kv_bucket=bucket)
        assert torch.equal(compiled_sampler(model, labels), eager)
        assert torch.equal(compiled_sampler(model, labels), eager)  # second call reuses the compiled step
