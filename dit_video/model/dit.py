"""The text-to-video diffusion transformer: DiT (Peebles & Xie 2023) on spacetime patches.

noisy latents [B, C, T, H, W] + t [B] + text (text_emb, text_mask[, pooled]) -> prediction [B, C_out, T, H, W].
What the prediction means (velocity, noise, x0) is decided by dit_video/diffusion, not here.
The config picks the variant (docs/models.md, "Model variants"): cross-attention or MMDiT joint attention
(mmdit.py), adaLN-single or per-block adaLN-Zero, RoPE or absolute (pos_embed.py) positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PackedMask
from .blocks import DiTBlock, FinalLayer, Mlp, RMSNorm, TimestepEmbedder
from .config import DiTConfig
from .mmdit import AdaLN, DualStreamBlock, JointPacking, SingleStreamBlock
from .packing import patchify_packed, unpatchify_packed
from .patch import PatchEmbed, unpatchify
from .pos_embed import LearnedPosEmbed, sincos_3d
from .rope import packed_rope_table, rope_table


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D, cfg.freq_dim, cfg.time_scale)
        single = cfg.modulation == "adaln_single"
        if single:
            # adaLN-single (PixArt-alpha): one projection of c to the six modulation vectors, shared
            # by all blocks; each block adds its own learned table. (adaLN-Zero: each block projects c.)
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        # PixArt's caption projection: text encoders (T5: 4096, MiniLM: 384) -> model width.
        self.text_proj = Mlp(cfg.text_dim, D, D)
        if cfg.pooled_text_dim:
            # SD3 / HunyuanVideo: a pooled caption vector (CLIP) joins the timestep in c, so it
            # reaches every block's modulation, not only the attention.
            self.pooled_proj = Mlp(cfg.pooled_text_dim, D, D)
        if cfg.pos_embed == "learned":
            self.pos_embed = LearnedPosEmbed(cfg.max_grid, D)
        # A ModuleList of identical-signature blocks, so checkpointing/FSDP/compile wrap each one from outside.
        args = (D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.norm_eps, cfg.attn_backend)
        if cfg.conditioning == "mmdit":
            self.blocks = nn.ModuleList(
                DualStreamBlock(*args, adaln_single=single) if i < cfg.num_dual_blocks
                else SingleStreamBlock(*args, adaln_single=single)
                for i in range(cfg.depth)
            )
        else:
            self.blocks = nn.ModuleList(
                DiTBlock(*args, adaln_single=single, qk_norm_across_heads=cfg.qk_norm_across_heads,
                         cross_attn_norm=cfg.cross_attn_norm)
                for _ in range(cfg.depth)
            )
        self.final_layer = FinalLayer(D, cfg.out_dim * math.prod(cfg.patch_size), cfg.norm_eps, cfg.final_modulation)
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
            *((self.pooled_proj.fc1, self.pooled_proj.fc2) if self.cfg.pooled_text_dim else ()),
        ):
            nn.init.normal_(mlp_linear.weight, std=0.02)
        if self.cfg.pos_embed == "learned":
            self.pos_embed.reset_parameters()
        # adaLN-Zero: zero modulation so every gate is 0 and every scale is 1 at init ...
        if self.cfg.modulation == "adaln_single":
            nn.init.zeros_(self.t_block[1].weight)
            nn.init.zeros_(self.t_block[1].bias)
        for block in self.blocks:
            if isinstance(block, DiTBlock):
                if self.cfg.modulation == "adaln_single":
                    nn.init.zeros_(block.modulation)
                else:
                    nn.init.zeros_(block.adaLN_modulation[1].weight)
                    nn.init.zeros_(block.adaLN_modulation[1].bias)
                # ... the ungated cross-attention starts silent too (PixArt), so each block is the identity ...
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
            else:  # MMDiT: every branch of both streams is gated
                for adaln in block.modules():
                    if isinstance(adaln, AdaLN):
                        adaln.zero_()
        # ... and the final layer outputs exactly zero.
        if self.cfg.final_modulation == "table":
            nn.init.zeros_(self.final_layer.modulation)
        else:
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
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, C, T, H, W] noisy latents, t [B] diffusion time in [0, 1] (or [B, T]: one per latent
        frame, objective.per_frame_t), text_emb [B, L, Dt],
        text_mask bool [B, L] (True = real token; None = all real), pooled [B, P] pooled text
        vector (only with cfg.pooled_text_dim = P > 0) -> [B, C_out, T, H, W]."""
        cfg = self.cfg
        grid = cfg.grid(x.shape[2:])  # (T', H', W')
        if (pooled is None) != (cfg.pooled_text_dim == 0):
            raise ValueError(
                f"DiT got pooled={'None' if pooled is None else tuple(pooled.shape)} with model.pooled_text_dim="
                f"{cfg.pooled_text_dim}: pass the text encoder's pooled vector exactly when pooled_text_dim > 0"
            )

        # 1. patchify + embed; positions: a 3D RoPE table shared by every block, or absolute ones added here
        tokens = self.x_embedder(x)  # [B, N, D]
        rope = None
        if cfg.pos_embed == "rope":
            rope = rope_table(
                grid, cfg.axes_dim, cfg.rope_theta, device=x.device, scale=cfg.rope_scale
            )  # ([N, hd], [N, hd])
        elif cfg.pos_embed == "sincos":
            tokens = tokens + sincos_3d(grid, cfg.hidden_size, device=x.device).to(tokens.dtype)  # [B, N, D]
        else:
            tokens = tokens + self.pos_embed(grid)  # [B, N, D]

        # 2. conditioning: timestep (+ pooled text) -> c, then what the blocks' adaLN reads; text -> width D
        if t.dim() == 2:  # per-frame t [B, T] (diffusion forcing): each latent frame's c for its tokens
            c = self.frame_cond(t, grid, pooled)  # [B, N, D]
        else:
            c = self.t_embedder(t)  # [B, D]
        if pooled is not None and t.dim() == 1:
            c = c + self.pooled_proj(pooled.to(c.dtype))  # [B, D]
        cond = self.block_cond(c)  # [B, 6, D] (adaLN-single) or [B, D] (adaLN-Zero)
        if cfg.text_len:
            text_emb, text_mask = self.pad_text(text_emb, text_mask)  # [B, text_len, Dt], None
        text = self.text_proj(text_emb)  # [B, L, D]

        # 3. blocks
        if cfg.conditioning == "mmdit":
            # Joint attention keys are [text, video]: padded text keys masked, every video key real.
            mask = None
            if text_mask is not None:
                video_keys = text_mask.new_ones(text_mask.shape[0], tokens.shape[1])  # [B, N]
                mask = torch.cat([text_mask, video_keys], dim=1)[:, None, None, :]  # [B, 1, 1, L+N]
            for block in self.blocks:
                tokens, text = block(tokens, cond, text, mask, rope)  # [B, N, D], [B, L, D]
        else:
            if text_mask is not None:
                text_mask = text_mask[:, None, None, :]  # [B, 1, 1, L], broadcasts over heads and queries
            for block in self.blocks:
                tokens = block(tokens, cond, text, text_mask, rope)  # [B, N, D]

        # 4. final layer + unpatchify
        out = self.final_layer(tokens, c)  # [B, N, C_out*pt*ph*pw]
        return unpatchify(out, cfg.patch_size, grid, cfg.out_dim)  # [B, C_out, T, H, W]

    def frame_cond(self, t: torch.Tensor, grid: tuple[int, int, int], pooled: torch.Tensor | None) -> torch.Tensor:
        """Per-frame t [B, T] (one per latent frame, equal within a temporal patch) -> c per token
        [B, N, D]: tokens are ordered (t, h, w), so each token group of a frame takes its frame's c."""
        if self.cfg.conditioning == "mmdit":
            raise ValueError("DiT: per-frame t [B, T] needs model.conditioning=cross_attn (MMDiT's text stream has no frames)")
        c = self.t_embedder(t[:, :: self.cfg.patch_size[0]].flatten()).unflatten(0, (t.shape[0], grid[0]))  # [B, T', D]
        if pooled is not None:
            c = c + self.pooled_proj(pooled.to(c.dtype))[:, None]  # [B, T', D]
        return c.repeat_interleave(grid[1] * grid[2], dim=1)  # [B, N, D]

    def pad_text(self, text_emb: torch.Tensor, text_mask: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        """cfg.text_len > 0 (Wan): text_emb [B, L, Dt] with its padding zeroed, zero-padded to [B, text_len, Dt],
        and no mask: the model attends to every position, as Wan's weights were trained to."""
        L, n = text_emb.shape[1], self.cfg.text_len
        if L > n:
            raise ValueError(f"DiT got {L} text tokens but model.text_len={n}: truncate captions to text_len tokens "
                             "(text_encoder.max_length) or raise model.text_len")
        if text_mask is not None:
            text_emb = torch.where(text_mask[..., None], text_emb, 0.0)  # [B, L, Dt]
        return F.pad(text_emb, (0, 0, 0, n - L)), None  # [B, text_len, Dt]

    def block_cond(self, c: torch.Tensor) -> torch.Tensor:
        """What every block's adaLN reads: c [B, D] (or [B, N, D]) -> the shared adaLN-single terms
        [B, 6, D] (or [B, N, 6, D]), or c itself under per-block adaLN-Zero."""
        if self.cfg.modulation == "adaln_single":
            return self.t_block(c).unflatten(-1, (6, self.cfg.hidden_size))
        return c

    def forward_packed(
        self,
        x: list[torch.Tensor],
        t: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Clips of different (T, H, W) in one packed token sequence (NaViT; model/packing.py).

        x: B noisy latents [C, T_i, H_i, W_i], t [B] (one per clip), text_emb [B, L, Dt], text_mask
        bool [B, L], pooled [B, P] as in forward() -> B predictions [C_out, T_i, H_i, W_i], each equal
        to forward() on that clip alone. Captions are packed without their padding; cross-attention
        lets clip i see caption i only, MMDiT's joint attention runs over one [text_i, video_i]
        segment per clip (mmdit.JointPacking).
        """
        cfg = self.cfg
        if t.dim() != 1:
            raise ValueError(
                f"DiT.forward_packed: t must be [B], one per clip (got {tuple(t.shape)}); per-frame t has no packed mode"
            )

        # 1. patchify every clip, concatenate; positions restart at 0 for every clip
        patches, packing = patchify_packed(x, cfg.patch_size)  # [1, ΣN, C*pt*ph*pw]
        tokens = self.x_embedder.proj(patches)  # [1, ΣN, D]
        seq_id = packing.seq_id(patches.device)  # [ΣN] clip of every token
        lengths = packing.lengths_tensor(patches.device)  # [B]
        rope = None
        if cfg.pos_embed == "rope":
            rope = packed_rope_table(
                packing.grids, cfg.axes_dim, cfg.rope_theta, device=patches.device, scale=cfg.rope_scale
            )  # ([ΣN, hd], [ΣN, hd])
        elif cfg.pos_embed == "sincos":
            pos = torch.cat([sincos_3d(g, cfg.hidden_size, device=patches.device) for g in packing.grids])  # [ΣN, D]
            tokens = tokens + pos.to(tokens.dtype)  # [1, ΣN, D]
        else:
            tokens = tokens + torch.cat([self.pos_embed(g) for g in packing.grids])  # [1, ΣN, D]

        # 2. conditioning per clip, gathered to its tokens; captions packed without their padding
        c = self.t_embedder(t)  # [B, D]
        if (pooled is None) != (cfg.pooled_text_dim == 0):
            raise ValueError("DiT.forward_packed: pass pooled exactly when model.pooled_text_dim > 0")
        if pooled is not None:
            c = c + self.pooled_proj(pooled.to(c.dtype))  # [B, D]
        cond = self.block_cond(c)  # [B, 6, D] (adaLN-single) or [B, D] (adaLN-Zero)
        if cfg.text_len:
            text_emb, text_mask = self.pad_text(text_emb, text_mask)  # [B, text_len, Dt], None
        text = self.text_proj(text_emb)  # [B, L, D]
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)  # [B, L]
        text_lens = text_mask.sum(1)  # [B] real caption tokens per clip
        # The packed forward's one host sync: how many caption tokens are real. Every other size and
        # bound below is known on the host (clip grids, the padded caption length L).
        real = text_mask.flatten().nonzero().squeeze(1)  # [ΣL_real] positions in [B*L]
        text = text.flatten(0, 1).index_select(0, real)[None]  # [1, ΣL_real, D]
        n_text, longest, L = text.shape[1], max(packing.lengths), text_mask.shape[1]

        # 3. blocks
        if cfg.conditioning == "mmdit":
            # The blocks see [all text, all video]; each text token takes its clip's modulation too.
            text_id = torch.arange(len(x), device=text.device).repeat_interleave(text_lens, output_size=n_text)  # [ΣL_real]
            cond = torch.cat([cond[text_id], cond[seq_id]])[None]  # [1, ΣL_real+ΣN, 6, D] or [1, ΣL_real+ΣN, D]
            # clip i attends over [text_i, video_i] only
            joint = JointPacking(text_lens, lengths, sizes=(n_text, sum(packing.lengths)), max_seqlen=L + longest)
            for block in self.blocks:
                tokens, text = block(tokens, cond, text, joint, rope)  # [1, ΣN, D], [1, ΣL_real, D]
        else:
            cond = cond[seq_id][None]  # [1, ΣN, 6, D] (adaLN-single) or [1, ΣN, D] (adaLN-Zero)
            self_mask = PackedMask(lengths, lengths, (longest, longest))  # block-diagonal: a clip attends to itself only
            cross_mask = PackedMask(lengths, text_lens, (longest, L))  # clip i sees caption i's real tokens
            for block in self.blocks:
                tokens = block(tokens, cond, text, cross_mask, rope, self_mask=self_mask)  # [1, ΣN, D]

        # 4. final layer (per-token c) + unpatchify each clip
        out = self.final_layer(tokens, c[seq_id][None])  # [1, ΣN, C_out*pt*ph*pw]
        return unpatchify_packed(out, packing, cfg.patch_size, cfg.out_dim)  # B x [C_out, T_i, H_i, W_i]
