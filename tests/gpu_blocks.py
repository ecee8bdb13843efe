"""A compiled VAR-shaped trunk block on a GPU in bf16 autocast: the plain ops against the fused ones,
in the form the trunk runs its blocks after the first (the previous block's MLP branch handed on,
its own handed on)."""
import torch


def assert_compiled_blocks_agree(backends: tuple[str, str], group_rows: int = 0,
                                 fused_options: dict | None = None) -> None:
    """Two blocks with the same weights, plain QK-norm + RoPE, SwiGLU and residual norm under attention backend
    `backends[0]` and the fused kernels under `backends[1]` (compiled with Inductor `fused_options`),
    compiled: outputs and gradients agree to bf16 rounding."""
    from tessera.nn.attention import prepare_mask
    from tessera.nn.masks import AttentionMask
    from tessera.nn.rope import RotaryEmbedding
    from tessera.nn.trunk import Block, PendingBranch, TrunkConfig
    torch.manual_seed(0)
    blocks = [Block(TrunkConfig(dim=256, n_heads=4, cond_dim=256, fused_qk_rope=fused, fused_swiglu=fused,
                                fused_residual_norm=fused)).cuda() for fused in (False, True)]
    for p in blocks[0].parameters():
        p.data.normal_(0, 0.05)
    blocks[1].load_state_dict(blocks[0].state_dict())
    sizes = [1, 4, 9, 16, 25, 36, 64, 100]
    pos = torch.arange(sum(sizes), device="cuda")
    mask = AttentionMask.block_causal(sizes, "cuda")
    rope = RotaryEmbedding(64, 2).cuda()(torch.rand(pos.numel(), 2, device="cuda") * 16)
    x, cond = torch.randn(4, pos.numel(), 256, device="cuda"), torch.randn(4, 256, device="cuda")
    gate = 0.3 * torch.randn(4, 1, 256, device="cuda")
    pending = PendingBranch(torch.randn_like(x).requires_grad_(), gate.requires_grad_())
    results = []
    for block, backend, options in zip(blocks, backends, (None, fused_options), strict=True):
        prepared = prepare_mask(mask, pos, pos, backend, full_sequence=True, group_rows=group_rows)
        compiled = torch.compile(block, options=options)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, branch = compiled(x, rope, prepared, cond, None, 0, None, None, pending, defer=True)
        loss = out.float().square().mean() + branch.out.float().square().mean()
        grads = torch.autograd.grad(loss, [*block.parameters(), *pending])
        results.append((torch.cat([out.float(), branch.out.float()]), grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    names = [name for name, _ in blocks[0].named_parameters()] + ["pending.out", "pending.gate"]
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        assert (g - w).norm() <= 0.03 * w.norm() + 1e-6, name
