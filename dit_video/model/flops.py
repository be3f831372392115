"""FLOP accounting for the DiT, from the config and the token counts alone.

Convention (the one MFU numbers use, e.g. PaLM appendix B and nanoGPT's estimate): only
matrix multiplies count, one multiply-add = 2 FLOPs; norms, activations, RoPE and softmax are
left out (they are memory-bound, a few percent of the work, and no peak-FLOPs figure includes
them). Training = forward + backward, where the backward of a matmul costs twice its forward
(grad of the input and grad of the weight) except when its input needs no gradient (the patch
embedding, the first layer of the timestep and text MLPs): then only the weight gradient runs.
Attention's backward is counted at 2x its forward as well, i.e. without the recompute that
flash-attention kernels do ("model FLOPs", recompute excluded, as for activation checkpointing).

Terms that depend on the timestep only (timestep MLP, adaLN projections) run once per sample,
not per token: counting them per token (the naive 6*N*T rule) overcounts a DiT-XL/2 by ~45%.

`python -m dit_video.model.flops` prints the table for every preset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import DIT_PRESETS, DiTConfig


@dataclass
class FlopCount:
    """Forward FLOPs of one sample, split by where they come from (each entry is a matmul group)."""

    terms: dict[str, int] = field(default_factory=dict)  # name -> forward FLOPs per sample
    no_input_grad: dict[str, int] = field(default_factory=dict)  # forward FLOPs of matmuls whose input needs no grad

    def add(self, name: str, flops: int, input_grad: bool = True) -> None:
        self.terms[name] = self.terms.get(name, 0) + flops
        if not input_grad:
            self.no_input_grad[name] = self.no_input_grad.get(name, 0) + flops

    @property
    def forward(self) -> int:
        """Forward FLOPs per sample."""
        return sum(self.terms.values())

    @property
    def backward(self) -> int:
        """Backward FLOPs per sample: 2x forward, minus the input-gradient half where none is needed."""
        return 2 * self.forward - sum(self.no_input_grad.values())

    @property
    def training(self) -> int:
        """Forward + backward FLOPs per sample (one optimizer step on one sample; recompute excluded)."""
        return self.forward + self.backward

    @property
    def attention(self) -> int:
        """Forward FLOPs of the attention products (q k^T and p v), the part that grows as N^2."""
        return sum(v for k, v in self.terms.items() if k.endswith("attention_scores"))


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """A [tokens, d_in] x [d_in, d_out] matmul: 2 * tokens * d_in * d_out (bias adds are not counted)."""
    return 2 * tokens * d_in * d_out


def attention_flops(n_q: int, n_k: int, dim: int) -> int:
    """q k^T ([n_q, d] x [d, n_k]) plus probs v ([n_q, n_k] x [n_k, d]), summed over heads (dim = heads * head_dim)."""
    return 2 * (2 * n_q * n_k * dim)


def dit_flops(cfg: DiTConfig, latent_shape: tuple[int, int, int], text_len: int) -> FlopCount:
    """Per-sample FLOPs of DiT(cfg) on latents of size (T, H, W) with `text_len` (padded) text tokens.

    Cross-attention (and MMDiT's joint attention) is counted over all `text_len` positions, padded
    or not: the kernels compute masked scores too. A model with cfg.text_len > 0 (Wan) pads every
    caption to cfg.text_len tokens, which then replaces `text_len`. Absolute position embeddings and
    Wan's final modulation table are adds, not matmuls.
    """
    N = math.prod(cfg.grid(latent_shape))  # video tokens
    L = cfg.text_len or text_len
    D = cfg.hidden_size
    F = int(D * cfg.mlp_ratio)
    fc = FlopCount()
    # 1. embeddings: patch tokens (per token), timestep and pooled text (per sample), caption projection (per text token)
    fc.add("patch_embed", linear_flops(N, cfg.patch_dim, D), input_grad=False)
    fc.add("timestep_mlp", linear_flops(1, cfg.freq_dim, D), input_grad=False)
    fc.add("timestep_mlp", linear_flops(1, D, D))
    if cfg.pooled_text_dim:
        fc.add("pooled_proj", linear_flops(1, cfg.pooled_text_dim, D), input_grad=False)
        fc.add("pooled_proj", linear_flops(1, D, D))
    # adaLN terms: one shared projection per sample (adaLN-single) or one per block (adaLN-Zero),
    # n modulation vectors each: 6 per cross-attn block or dual-stream stream, 3 per single-stream block
    def add_adaln_zero(n: int) -> None:
        if cfg.modulation == "adaln_zero":
            fc.add("adaln_zero", linear_flops(1, D, n * D))

    if cfg.modulation == "adaln_single":
        fc.add("adaln_single", linear_flops(1, D, 6 * D))
    fc.add("text_proj", linear_flops(L, cfg.text_dim, D), input_grad=False)
    fc.add("text_proj", linear_flops(L, D, D))
    # 2. blocks
    for i in range(cfg.depth):
        if cfg.conditioning == "cross_attn":
            fc.add("self_attn_linear", linear_flops(N, D, 3 * D) + linear_flops(N, D, D))
            fc.add("self_attention_scores", attention_flops(N, N, D))
            fc.add("cross_attn_linear", linear_flops(N, D, D) + linear_flops(L, D, 2 * D) + linear_flops(N, D, D))
            fc.add("cross_attention_scores", attention_flops(N, L, D))
            fc.add("mlp", linear_flops(N, D, F) + linear_flops(N, F, D))
            add_adaln_zero(6)
        elif i < cfg.num_dual_blocks:  # dual-stream: each stream its own qkv, proj, MLP over its own tokens
            for n_tok in (N, L):
                fc.add("joint_attn_linear", linear_flops(n_tok, D, 3 * D) + linear_flops(n_tok, D, D))
                fc.add("mlp", linear_flops(n_tok, D, F) + linear_flops(n_tok, F, D))
                add_adaln_zero(6)
            fc.add("joint_attention_scores", attention_flops(N + L, N + L, D))
        else:  # single-stream: one fused qkv+MLP-in and one fused out+MLP-out GEMM over N + L tokens
            fc.add("single_stream_linear", linear_flops(N + L, D, 3 * D + F) + linear_flops(N + L, D + F, D))
            fc.add("joint_attention_scores", attention_flops(N + L, N + L, D))
            add_adaln_zero(3)
    # 3. final layer: adaLN (per sample) and the projection to patch values
    if cfg.final_modulation == "linear":
        fc.add("final_adaln", linear_flops(1, D, 2 * D))
    fc.add("final_linear", linear_flops(N, D, cfg.out_dim * math.prod(cfg.patch_size)))
    return fc


def naive_training_flops(cfg: DiTConfig, n_params: int, latent_shape: tuple[int, int, int]) -> int:
    """The 6 * params * tokens rule (Kaplan et al. 2020), for comparison only: it charges per-sample
    parameters (adaLN, timestep MLP) to every token and ignores attention's N^2 term."""
    return 6 * n_params * math.prod(cfg.grid(latent_shape))


def _main() -> None:
    import torch

    from .dit import DiT

    latent_shape, text_len = (9, 32, 32), 226  # dit_256: 33 frames at 256^2 through a 4x8x8 VAE, T5 text
    print(f"latents {latent_shape}, {text_len} text tokens, text_dim 4096, 16 latent channels")
    print(f"{'preset':>15} {'params':>9} {'tokens':>7} {'fwd GFLOP':>10} {'train GFLOP':>12} {'attn %':>7} {'6NT/exact':>10}")
    # Every preset, then the 1B preset in the conditioning variants (docs/models.md, "Model variants").
    rows = [(name, DIT_PRESETS[name]) for name in DIT_PRESETS] + [
        ("1B zero", {**DIT_PRESETS["1B"], "modulation": "adaln_zero"}),
        ("1B mm", {**DIT_PRESETS["1B"], "conditioning": "mmdit", "num_dual_blocks": 10}),  # Flux-like 1/3 dual
    ]
    for name, fields in rows:
        cfg = DiTConfig(**{**fields, "in_channels": 16, "text_dim": 4096})
        with torch.device("meta"):
            n_params = sum(p.numel() for p in DiT(cfg).parameters())
        fc = dit_flops(cfg, latent_shape, text_len)
        tokens = math.prod(cfg.grid(latent_shape))
        print(
            f"{name:>15} {n_params / 1e6:8.1f}M {tokens:7d} {fc.forward / 1e9:10.1f} {fc.training / 1e9:12.1f} "
            f"{100 * fc.attention / fc.forward:6.1f}% {naive_training_flops(cfg, n_params, latent_shape) / fc.training:10.2f}"
        )


if __name__ == "__main__":
    _main()
