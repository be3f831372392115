"""The text-to-video diffusion transformer: DiT (Peebles & Xie 2023) on spacetime patches.

noisy latents [B, C, T, H, W] + t [B] + text (text_emb, text_mask) -> prediction [B, C_out, T, H, W].
What the prediction means (velocity, noise, x0) is decided by dit_video/diffusion, not here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import DiTBlock, FinalLayer, Mlp, RMSNorm, TimestepEmbedder
from .config import DiTConfig
from .patch import PatchEmbed, unpatchify
from .rope import rope_table


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D, cfg.freq_dim, cfg.time_scale)
        # adaLN-single (PixArt-alpha): one projection of c to the six modulation vectors, shared
        # by all blocks; each block adds its own learned table.
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        # PixArt's caption projection: text encoders (T5: 4096, MiniLM: 384) -> model width.
        self.text_proj = Mlp(cfg.text_dim, D, D)
        # A ModuleList of identical-signature blocks, so checkpointing/FSDP/compile wrap each one from outside.
        self.blocks = nn.ModuleList(
            DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.norm_eps, cfg.attn_backend)
            for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(D, cfg.out_dim * math.prod(cfg.patch_size), cfg.norm_eps)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialise every parameter (so a model built on the meta device can be materialised
        with `to_empty` and then this). adaLN-Zero: the output is exactly zero at init."""
        # Transformer linears: xavier uniform, zero bias (DiT / ViT).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
        # Patch embedding like a Linear: DiT inits its conv as xavier on the [D, C*p*p] view, which
        # is what the loop above already did.
        # Embedding MLPs: normal(0.02), as DiT does for the timestep MLP (and PixArt for captions).
        for mlp_linear in (
            self.t_embedder.mlp[0],
            self.t_embedder.mlp[2],
            self.text_proj.fc1,
            self.text_proj.fc2,
        ):
            nn.init.normal_(mlp_linear.weight, std=0.02)
        # adaLN-Zero: zero modulation so every gate is 0 and every scale is 1 at init ...
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)
            # ... the ungated cross-attention starts silent too (PixArt), so each block is the identity ...
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        # ... and the final layer outputs exactly zero.
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, T, H, W] noisy latents, t [B] diffusion time in [0, 1], text_emb [B, L, Dt],
        text_mask bool [B, L] (True = real token; None = all real) -> [B, C_out, T, H, W]."""
        cfg = self.cfg
        grid = cfg.grid(x.shape[2:])  # (T', H', W')

        # 1. patchify + embed; 3D RoPE table built once per forward and shared by every block
        tokens = self.x_embedder(x)  # [B, N, D]
        rope = rope_table(
            grid, cfg.axes_dim, cfg.rope_theta, device=x.device, scale=cfg.rope_scale
        )  # ([N, hd], [N, hd])

        # 2. conditioning: timestep -> c and the shared adaLN terms (per sample); text -> width D
        c = self.t_embedder(t)  # [B, D]
        t_mod = self.t_block(c).unflatten(1, (6, cfg.hidden_size))  # [B, 6, D]
        text = self.text_proj(text_emb)  # [B, L, D]
        if text_mask is not None:
            text_mask = text_mask[:, None, None, :]  # [B, 1, 1, L], broadcasts over heads and queries

        # 3. blocks
        for block in self.blocks:
            tokens = block(tokens, t_mod, text, text_mask, rope)  # [B, N, D]

        # 4. final layer + unpatchify
        out = self.final_layer(tokens, c)  # [B, N, C_out*pt*ph*pw]
        return unpatchify(out, cfg.patch_size, grid, cfg.out_dim)  # [B, C_out, T, H, W]
