"""The shared transformer trunk: pre-norm blocks, RMSNorm, SwiGLU, QK-norm, AdaLN, RoPE.

Positions, masks and conditioning come in as arguments; the trunk knows nothing about what
the tokens mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import Config, ConfigError, check_range
from .attention import BACKENDS, PreparedMask, attend, prepare_mask
from .cache import KVCache
from .gated_residual_norm import gated_residual_norm
from .layers import AdaLNModulation, RMSNorm, SwiGLU, autocast_dtype, modulate, swiglu_hidden
from .masks import AttentionMask
from .qk_norm_rope import rms_norm_rope, rms_norm_rope_reference
from .qkv_attention import qkv_prefix_attention, qkv_prefix_attention_supported
from .rope import RotaryEmbedding, apply_rotary


@dataclass
class TrunkConfig(Config):
    """Width, depth and the optional features of the trunk."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    multiple_of: int = 32
    qk_norm: bool = True
    norm_eps: float = 1e-6
    cond_dim: int = 0  # > 0 enables AdaLN conditioning on a pooled (B, cond_dim) vector
    rope_axes: int = 2
    rope_base: float = 10000.0
    dropout: float = 0.0
    # auto: per mask kind, measured (nn/attention.py); triton: nn/prefix_attention.py's kernels
    attention: Literal["auto", "sdpa", "flex", "triton", "xformers", "math"] = "auto"
    # Block-causal masks under sdpa: > 0 runs each block of at least this many query rows as its
    # own unmasked SDPA call over the keys up to its end (smaller blocks merge). On VAR-d16 (H100,
    # batch 32) 64 saves 4 ms of kernel time per step but adds ~10 SDPA launches per layer: it pays
    # where the GPU, not the host, is the bottleneck (batch 64, train.compile_mode=reduce-overhead).
    attention_group_rows: int = 0
    fused_qk_rope: bool = True  # QK-norm + RoPE as one Triton kernel where Triton runs (nn/qk_norm_rope.py)
    fused_swiglu: bool = True  # the SwiGLU activation and its backward as Triton kernels (nn/swiglu.py)
    # With AdaLN: each gated residual add and the modulated norm after it (the MLP input's; the next
    # block's attention input or the final norm, which add the MLP branch) as one Triton kernel each
    # way, where Triton runs (nn/gated_residual_norm.py)
    fused_residual_norm: bool = True
    # Under bf16 autocast, carry the residual stream between blocks in bf16 instead of float32 (as
    # Megatron-LM does unless --fp32-residual-connection): the norms, gates and residual adds, which
    # are memory-bound, move half the bytes. Norms still compute in float32. No effect without autocast.
    bf16_residual: bool = False

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"trunk.dim={self.dim} must be divisible by trunk.n_heads={self.n_heads}")
        check_range("trunk.n_layers", self.n_layers, 1)
        check_range("trunk.dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_range("trunk.cond_dim", self.cond_dim, 0)
        check_range("trunk.attention_group_rows", self.attention_group_rows, 0)
        if self.attention not in BACKENDS:
            raise ConfigError(f"trunk.attention={self.attention!r}; choose one of {', '.join(BACKENDS)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class Attention(nn.Module):
    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.fused_qk_rope = cfg.fused_qk_rope
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], prepared: PreparedMask,
                cache: KVCache | None, layer: int, positions: torch.Tensor | None, kv_len: int | None) -> torch.Tensor:
        b, length, _ = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim)
        if (prepared.prefix is not None and cache is None and self.fused_qk_rope and isinstance(self.q_norm, RMSNorm)
                and qkv_prefix_attention_supported(qkv)):  # one op, whose backward writes the packed gradient
            out = qkv_prefix_attention(qkv, self.q_norm.weight, self.k_norm.weight, *rope, self.q_norm.eps,
                                       prepared.prefix)
        else:
            out = self._attend_heads(qkv, rope, prepared, cache, layer, positions, kv_len)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, length, -1).to(x.dtype)))

    def _attend_heads(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], prepared: PreparedMask,
                      cache: KVCache | None, layer: int, positions: torch.Tensor | None,
                      kv_len: int | None) -> torch.Tensor:
        """(B, L, 3, H, D) projections -> (B, H, L, D) attention output, op by op."""
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        norm_rope = rms_norm_rope if self.fused_qk_rope else rms_norm_rope_reference
        if isinstance(self.q_norm, RMSNorm):
            q = norm_rope(q, self.q_norm.weight, *rope, self.q_norm.eps)
            k = norm_rope(k, self.k_norm.weight, *rope, self.k_norm.eps)
        else:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, positions, k, v, kv_len)
            q = q.to(k.dtype)
        return attend(q, k, v, prepared)


class PendingBranch(NamedTuple):
    """An AdaLN block's gated MLP branch, `gate` (B, 1, C) and `out` (B, L, C), not yet added to the
    residual stream: the next block (or the final norm) adds it in the kernel of its own norm."""

    out: torch.Tensor
    gate: torch.Tensor


class Block(nn.Module):
    """Pre-norm attention + SwiGLU, optionally AdaLN-modulated (adaLN-Zero gates)."""

    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps, affine=cfg.cond_dim == 0)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps, affine=cfg.cond_dim == 0)
        self.attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.dim, swiglu_hidden(cfg.dim, cfg.mlp_ratio, cfg.multiple_of), cfg.dropout,
                          fused=cfg.fused_swiglu)
        self.ada = AdaLNModulation(cfg.cond_dim, cfg.dim, 6) if cfg.cond_dim > 0 else None
        self.fused_residual_norm = cfg.fused_residual_norm

    def forward(self, x, rope, prepared, cond, cache, layer, positions, kv_len,
                pending: PendingBranch | None = None, defer: bool = False) -> tuple[torch.Tensor, PendingBranch | None]:
        """-> (the residual stream, None), or with AdaLN and `defer` (the stream before this block's
        MLP branch, that branch). `pending`: the previous block's deferred branch, added here."""
        if self.ada is None:
            if pending is not None or defer:
                raise ValueError("only AdaLN blocks defer their MLP branch")
            x = x + self.attn(self.norm1(x), rope, prepared, cache, layer, positions, kv_len)
            return x + self.mlp(self.norm2(x)), None
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond)
        if pending is None:
            attn_in = modulate(self.norm1(x), shift1, scale1)
        else:
            x, attn_in = gated_residual_norm(x, pending.out, pending.gate, shift1, scale1, self.norm1.eps,
                                             self.fused_residual_norm)
        attn_out = self.attn(attn_in, rope, prepared, cache, layer, positions, kv_len)
        x, mlp_in = gated_residual_norm(x, attn_out, gate1, shift2, scale2, self.norm2.eps, self.fused_residual_norm)
        branch = PendingBranch(self.mlp(mlp_in), gate2)
        if defer:
            return x, branch
        return x + (1 + branch.gate) * branch.out, None


class Trunk(nn.Module):
    """A stack of blocks and a final norm: (B, L, dim) -> (B, L, dim)."""

    def __init__(self, cfg: TrunkConfig):
        super().__init__()
        self.config = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_axes, cfg.rope_base)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, affine=cfg.cond_dim == 0)
        self.final_ada = AdaLNModulation(cfg.cond_dim, cfg.dim, 2) if cfg.cond_dim > 0 else None
        self.activation_checkpointing = False  # set by the trainer (train.activation_checkpointing)
        self._final_norm = final_norm  # torch.compile'd by `compile`
        _init_linear_weights(self)

    def compile(self, *args, **kwargs) -> None:
        """torch.compile each block in place (one graph serves every block after the first, which has
        no branch handed on to it: same code, same shapes) and the final norm, leaving the RoPE tables
        and the mask built eagerly once per forward. Compiling the whole trunk instead lets Inductor
        fold the cos/sin of the tables into every layer's rotation, recomputed per element: 12% of a
        VAR-d16 training step's GPU time on an H100."""
        for block in self.blocks:
            block.compile(*args, **kwargs)
        self._final_norm = torch.compile(final_norm, *args, **kwargs)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """A zeroed static cache sized for `max_len` positions."""
        c = self.config
        return KVCache(c.n_layers, batch_size, c.n_heads, max_len, c.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, rope_positions: torch.Tensor, mask: AttentionMask, *,
                cond: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """Run the blocks.

        x: (B, L, dim) inputs. rope_positions: (L, rope_axes) RoPE coordinates of these tokens.
        mask: rule on absolute sequence positions. cond: (B, cond_dim) for AdaLN.
        cache/positions: with a KV cache, `positions` (L,) are the absolute sequence slots of x;
        keys/values are written there and queries attend over the first `kv_len` cache slots
        (default: all) under `mask`.
        """
        if (self.final_ada is None) != (cond is None):
            raise ValueError("cond must be given exactly when trunk.cond_dim > 0")
        length = x.shape[1]
        if cache is None:
            q_pos = kv_pos = torch.arange(length, device=x.device)
            prepared = prepare_mask(mask, q_pos, kv_pos, self.config.attention, full_sequence=True,
                                    group_rows=self.config.attention_group_rows)
        else:
            if positions is None:
                raise ValueError("positions are required with a KV cache")
            kv_pos = torch.arange(kv_len or cache.max_len, device=x.device)
            prepared = prepare_mask(mask, positions, kv_pos, self.config.attention, full_sequence=False)
        rope = self.rope(rope_positions.to(x.device))
        if self.config.bf16_residual and autocast_dtype(x.device.type) == torch.bfloat16:
            x = x.to(torch.bfloat16)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        pending = None
        for layer, block in enumerate(self.blocks):
            if recompute:  # keep only block inputs; recompute each block's activations in backward
                x, _ = checkpoint(block, x, rope, prepared, cond, cache, layer, positions, kv_len, use_reentrant=False)
            else:  # AdaLN blocks hand their MLP branch on, to be added in the next norm's kernel
                x, pending = block(x, rope, prepared, cond, cache, layer, positions, kv_len, pending,
                                   defer=self.final_ada is not None)
        return self._final_norm(self.norm, self.final_ada, x, cond, pending, self.config.fused_residual_norm)


def final_norm(norm: RMSNorm, ada: AdaLNModulation | None, x: torch.Tensor, cond: torch.Tensor | None,
               pending: PendingBranch | None = None, fused: bool = True) -> torch.Tensor:
    """The trunk's final norm, AdaLN-modulated when `ada` is given, after adding the last block's
    `pending` branch (eagerly one pass over the activations per op, the norm's in float32; compiled,
    one fused kernel each way)."""
    if ada is None:
        return norm(x)
    shift, scale = ada(cond)
    if pending is None:
        return modulate(norm(x), shift, scale)
    return gated_residual_norm(x, pending.out, pending.gate, shift, scale, norm.eps, fused)[1]


def _init_linear_weights(module: nn.Module) -> None:
    """Truncated-normal(0.02) linears, zero biases; AdaLN projections keep their zero init."""
    zero_init = {id(m.linear) for m in module.modules() if isinstance(m, AdaLNModulation)}
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m) not in zero_init:
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
