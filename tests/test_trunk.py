"""Trunk: cached incremental decoding equals the full pass; RoPE is relative; AdaLN works."""
import pytest
import torch

from tessera.config import ConfigError
from tessera.nn.masks import AttentionMask
from tessera.nn.rope import RotaryEmbedding, apply_rotary
from tessera.nn.trunk import Trunk, TrunkConfig


def make(cond_dim=0, attention="sdpa"):
    cfg = TrunkConfig(dim=32, n_layers=2, n_heads=4, cond_dim=cond_dim, attention=attention)
    trunk = Trunk(cfg).double().eval()
    if cond_dim:  # give AdaLN non-zero weights so it actually modulates
        for p in trunk.parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.05)
    return trunk


def grid_positions(n):
    return torch.stack([torch.arange(n) // 4, torch.arange(n) % 4], -1).double()


@pytest.mark.parametrize("attention", ["sdpa", "flex", "math"])
@pytest.mark.parametrize("mask,chunks", [
    (AttentionMask.causal(), [1] * 9),
    (AttentionMask.causal(), [3, 1, 1, 4]),
    (AttentionMask.block_causal([1, 3, 5]), [1, 3, 5]),
    (AttentionMask.window_sink(window=3, n_sink=1), [1] * 9),
])
@torch.no_grad()  # FlexAttention has no CPU backward
def test_cached_decoding_equals_full_forward(attention, mask, chunks):
    trunk = make(cond_dim=8, attention=attention)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    cond = torch.randn(2, 8, dtype=torch.float64)
    pos = grid_positions(9)
    full = trunk(x, pos, mask, cond=cond)
    cache = trunk.new_cache(2, 12, torch.float64, "cpu")
    outs, start = [], 0
    for size in chunks:
        sl = slice(start, start + size)
        outs.append(trunk(x[:, sl], pos[sl], mask, cond=cond, cache=cache, positions=torch.arange(start, start + size)))
        start += size
    torch.testing.assert_close(torch.cat(outs, 1), full)


def test_causal_mask_blocks_future():
    trunk = make()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    y1 = trunk(x, grid_positions(6), AttentionMask.causal())
    x2 = x.clone()
    x2[:, 4:] += 1.0
    y2 = trunk(x2, grid_positions(6), AttentionMask.causal())
    torch.testing.assert_close(y1[:, :4], y2[:, :4])
    assert not torch.allclose(y1[:, 4:], y2[:, 4:])


def test_rope_2d_is_relative():
    rope = RotaryEmbedding(16, n_axes=2)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([pq], dtype=torch.float32))
        ck, sk = rope(torch.tensor([pk], dtype=torch.float32))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score([1, 2], [3, 5]), score([4, 0], [6, 3]))
    assert not torch.allclose(score([1, 2], [3, 5]), score([1, 2], [5, 3]))


def test_adaln_condition_changes_output():
    trunk = make(cond_dim=8)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    pos = grid_positions(5)
    a = trunk(x, pos, AttentionMask.causal(), cond=torch.zeros(2, 8, dtype=torch.float64))
    b = trunk(x, pos, AttentionMask.causal(), cond=torch.ones(2, 8, dtype=torch.float64))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="cond"):
        trunk(x, pos, AttentionMask.causal())


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="divisible"):
        TrunkConfig.from_dict({"dim": 30, "n_heads": 4})
    with pytest.raises(ConfigError, match="valid keys: dim"):
        TrunkConfig.from_dict({"width": 30})
    with pytest.raises(ConfigError, match="attention"):
        TrunkConfig.from_dict({"attention": "flash9"})


@torch.no_grad()
def test_bucketed_kv_len_equals_full_cache():
    """Attending over a static bucket of cache slots gives the same outputs as the whole cache."""
    trunk = make()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = grid_positions(9)
    full = trunk(x, pos, AttentionMask.causal())
    cache = trunk.new_cache(2, 16, torch.float64, "cpu")
    outs = []
    for i in range(9):
        bucket = min(16, 4 * (i // 4 + 1))
        outs.append(trunk(x[:, i:i + 1], pos[i:i + 1], AttentionMask.causal(), cache=cache,
                          positions=torch.tensor([i]), kv_len=bucket))
    torch.testing.assert_close(torch.cat(outs, 1), full)
