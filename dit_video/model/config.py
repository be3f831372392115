"""DiTConfig: every architectural choice of the video DiT, plus named size presets.

The presets follow the DiT paper's widths and depths (S/B/L/XL with 2x2 spatial patches, one
latent frame per patch, as Wan/HunyuanVideo/Open-Sora 1.3 do on 4x8x8 VAEs) and add a demo size
for CPU and a ~1B model for a 4096-dim T5-XXL text encoder. `in_channels` and `text_dim` are not
part of a preset: they come from the VAE and the text encoder the run uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .attention import BACKENDS

CONDITIONINGS = ("cross_attn", "mmdit")
MODULATIONS = ("adaln_single", "adaln_zero")
POS_EMBEDS = ("rope", "sincos", "learned")
FINAL_MODULATIONS = ("linear", "table")


@dataclass
class DiTConfig:
    in_channels: int  # latent channels C (filled by the caller from the VAE's latent_channels)
    text_dim: int  # D of text_emb (filled by the caller from the text encoder's dim)
    out_channels: int | None = None  # channels predicted per latent voxel; None = in_channels
    hidden_size: int = 384  # transformer width D
    depth: int = 12  # number of DiT blocks
    num_heads: int = 6  # attention heads; head_dim = hidden_size // num_heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * hidden_size
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) latent voxels per token along T, H, W
    qk_norm: bool = True  # RMSNorm on q and k per head (training stability at scale; SD3, Wan, Hunyuan)
    rope_theta: float = 10000.0  # base of the 3D rotary position embedding frequencies
    rope_axes_dim: tuple[int, int, int] | None = None  # (dt, dh, dw) split of head_dim; None = automatic
    # Positions along (t, h, w) are divided by these before RoPE (position interpolation, Chen et al.
    # 2023): train on T frames, then sample 2T with rope_scale (2, 1, 1) and stay in the trained range.
    rope_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    freq_dim: int = 256  # size of the sinusoidal timestep embedding fed to the timestep MLP
    time_scale: float = 1000.0  # t in [0, 1] is multiplied by this before the sinusoidal embedding
    norm_eps: float = 1e-6  # epsilon of every LayerNorm / RMSNorm in the model
    attn_backend: str = "sdpa"  # attention implementation: "sdpa" (fused torch kernel) or "math" (reference)
    # How text enters (docs/models.md, "Model variants"): "cross_attn" = video tokens attend to text in every
    # block (PixArt-alpha, Wan); "mmdit" = joint attention over [text, video] tokens (SD3, Flux,
    # HunyuanVideo): num_dual_blocks dual-stream blocks, then depth - num_dual_blocks single-stream ones.
    conditioning: str = "cross_attn"
    num_dual_blocks: int = 0  # mmdit only: how many of the `depth` blocks keep separate text/video weights
    # How the timestep (+ pooled text) vector c modulates the blocks: "adaln_single" = one shared
    # Linear(c -> 6D) plus a learned per-block table (PixArt-alpha); "adaln_zero" = a Linear(c -> 6D)
    # in every block (the DiT paper; costs 6 D^2 parameters per block).
    modulation: str = "adaln_single"
    pooled_text_dim: int = 0  # width of a pooled text vector added to c through an MLP (SD3, Hunyuan); 0 = off
    # Where token positions come from: "rope" (3D rotary in attention, the rope_* fields), "sincos"
    # (fixed 3D sin-cos added to the tokens, any grid size) or "learned" (a table of max_grid size).
    pos_embed: str = "rope"
    max_grid: tuple[int, int, int] | None = None  # pos_embed=learned: largest token grid (T', H', W') it covers
    # Wan 2.1/2.2 (docs/models.md, "Wan layout"): the four fields below, rope_axes_dim = Wan's split and
    # time_scale 1000 make this DiT compute exactly diffusers' WanTransformer3DModel (dit_video/convert/).
    qk_norm_across_heads: bool = False  # qk_norm: one RMSNorm over all heads (weight [D]; Wan), not one per head
    cross_attn_norm: bool = True  # an affine LayerNorm on the tokens entering cross-attention (Wan's cross_attn_norm)
    # The final layer's shift/scale: "linear" = Linear(SiLU(c)) (DiT); "table" = a learned [2, D] table
    # plus c itself (Wan: no projection, so the output sees the raw timestep embedding).
    final_modulation: str = "linear"
    # 0 = padded caption tokens are masked out of cross-attention. N > 0 = captions are zeroed at their
    # padding, padded to N tokens and every token is attended, padding included (Wan was trained so, N = 512).
    text_len: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> DiTConfig:
        """A config from its `dataclasses.asdict` form, as checkpoints record it: JSON lists become
        tuples, and keys this version does not have are ignored (a field added later takes its default)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})

    def __post_init__(self) -> None:
        # Hydra/YAML hands us lists; tuples keep the config hashable and comparable.
        self.patch_size = tuple(self.patch_size)
        if self.rope_axes_dim is not None:
            self.rope_axes_dim = tuple(self.rope_axes_dim)
        self.rope_scale = tuple(float(s) for s in self.rope_scale)
        if self.max_grid is not None:
            self.max_grid = tuple(self.max_grid)

    @property
    def out_dim(self) -> int:
        """Channels the model predicts (out_channels, or in_channels when unset)."""
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one patch: C * pt * ph * pw (keep well below hidden_size, see REFERENCES)."""
        return self.in_channels * math.prod(self.patch_size)

    @property
    def axes_dim(self) -> tuple[int, int, int]:
        """(dt, dh, dw): how RoPE splits head_dim over the t, h, w axes (all even, summing to head_dim)."""
        if self.rope_axes_dim is not None:
            return self.rope_axes_dim
        # Spatial axes get 3/8 of the head dim each and time the rest (64 -> (16, 24, 24),
        # 128 -> (32, 48, 48)): frames per clip are few compared with H'*W' positions.
        d_spatial = 2 * (3 * self.head_dim // 16)
        return (self.head_dim - 2 * d_spatial, d_spatial, d_spatial)

    def grid(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Token grid (T', H', W') for latents of size (T, H, W) (assumes validate(latent_shape) passed)."""
        return tuple(n // p for n, p in zip(latent_shape, self.patch_size, strict=True))

    def validate(self, latent_shape: tuple[int, int, int] | None = None) -> None:
        """Raise ValueError naming the field and the fix; pass latent_shape (T, H, W) to check patching."""
        for name in ("in_channels", "text_dim", "hidden_size", "depth", "num_heads", "freq_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.out_channels is not None and self.out_channels <= 0:
            raise ValueError(
                f"model.out_channels={self.out_channels} must be positive, or null to use in_channels"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio} must be positive")
        if self.freq_dim % 2:
            raise ValueError(f"model.freq_dim={self.freq_dim} must be even (half sines, half cosines)")
        if self.rope_theta <= 0 or self.time_scale <= 0 or self.norm_eps <= 0:
            raise ValueError("model.rope_theta, model.time_scale and model.norm_eps must be positive")
        if len(self.rope_scale) != 3 or any(s <= 0 for s in self.rope_scale):
            raise ValueError(f"model.rope_scale={self.rope_scale} must be three positive factors (t, h, w)")
        if self.attn_backend not in BACKENDS:
            raise ValueError(
                f"model.attn_backend={self.attn_backend!r} is unknown; pick one of {', '.join(BACKENDS)}"
            )
        for name, value, known in (
            ("conditioning", self.conditioning, CONDITIONINGS),
            ("modulation", self.modulation, MODULATIONS),
            ("pos_embed", self.pos_embed, POS_EMBEDS),
            ("final_modulation", self.final_modulation, FINAL_MODULATIONS),
        ):
            if value not in known:
                raise ValueError(f"model.{name}={value!r} is unknown; pick one of {', '.join(known)}")
        if not isinstance(self.pooled_text_dim, int) or self.pooled_text_dim < 0:
            raise ValueError(
                f"model.pooled_text_dim={self.pooled_text_dim!r} must be 0 (off) or the pooled text width"
            )
        if not isinstance(self.text_len, int) or self.text_len < 0:
            raise ValueError(f"model.text_len={self.text_len!r} must be 0 (mask padded text) or the padded length (Wan: 512)")
        if self.qk_norm_across_heads and not self.qk_norm:
            raise ValueError("model.qk_norm_across_heads=true needs model.qk_norm=true (it says how q and k are normed)")
        if self.conditioning == "mmdit":
            for name, default in (("qk_norm_across_heads", False), ("cross_attn_norm", True), ("text_len", 0)):
                if getattr(self, name) != default:
                    raise ValueError(f"model.{name}={getattr(self, name)!r} applies to model.conditioning=cross_attn "
                                     f"only (the Wan layout); set it to {default!r} for mmdit")
        if self.conditioning == "mmdit" and not 0 <= self.num_dual_blocks < self.depth:
            raise ValueError(
                f"model.num_dual_blocks={self.num_dual_blocks} must be in [0, depth={self.depth}): mmdit ends "
                "with at least one single-stream block (the last dual block's text output would go unused)"
            )
        if self.conditioning != "mmdit" and self.num_dual_blocks:
            raise ValueError(
                f"model.num_dual_blocks={self.num_dual_blocks} only applies to model.conditioning=mmdit; set it to 0"
            )
        if self.pos_embed == "learned" and (
            self.max_grid is None or len(self.max_grid) != 3
            or any(not isinstance(n, int) or n < 1 for n in self.max_grid)
        ):
            raise ValueError(
                f"model.max_grid={self.max_grid} must be three positive integers (T', H', W') with "
                "model.pos_embed=learned: the largest token grid the table covers"
            )
        if len(self.patch_size) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ValueError(
                f"model.patch_size={self.patch_size} must be three positive integers (pt, ph, pw)"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                "pick num_heads dividing hidden_size (head_dim 64 is usual)"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"model.hidden_size/num_heads gives an odd head_dim={self.head_dim}; RoPE rotates pairs of "
                "channels, so pick hidden_size and num_heads with an even head_dim"
            )
        axes = self.axes_dim
        if len(axes) != 3 or sum(axes) != self.head_dim or any(d < 0 or d % 2 for d in axes):
            raise ValueError(
                f"model.rope_axes_dim={tuple(axes)} must be three even non-negative sizes summing to "
                f"head_dim={self.head_dim}; fix them or set rope_axes_dim=null for the automatic split"
            )
        if latent_shape is not None:
            if len(latent_shape) != 3:
                raise ValueError(f"latent_shape={tuple(latent_shape)} must be (T, H, W) of the latents")
            for axis, n, p in zip("THW", latent_shape, self.patch_size, strict=True):
                if n % p:
                    raise ValueError(
                        f"model.patch_size={self.patch_size} does not divide latent size (T,H,W)="
                        f"{tuple(latent_shape)} along {axis}; pick a patch size dividing it or change data.size"
                    )
            if self.pos_embed == "learned":
                check_max_grid(self.grid(latent_shape), self.max_grid)


def check_max_grid(grid: tuple[int, int, int], max_grid: tuple[int, int, int]) -> None:
    """Raise ValueError if a token grid (T', H', W') does not fit a learned position table of max_grid."""
    for axis, n, limit in zip("THW", grid, max_grid, strict=True):
        if n > limit:
            raise ValueError(
                f"token grid {tuple(grid)} exceeds model.max_grid={tuple(max_grid)} along {axis}: a learned "
                "position table has no entries there; raise max_grid (and retrain) or use pos_embed=sincos/rope"
            )


def wan_rope_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of head_dim over (t, h, w): h and w get 2 * (head_dim // 6) each, t the rest (128 -> 44, 42, 42)."""
    spatial = 2 * (head_dim // 6)
    return (head_dim - 2 * spatial, spatial, spatial)


# Every field that makes a cross-attention DiT compute a Wan transformer, besides its sizes and rope_axes_dim.
WAN_LAYOUT: dict = dict(
    patch_size=(1, 2, 2), qk_norm=True, qk_norm_across_heads=True, cross_attn_norm=True, final_modulation="table",
    text_len=512, rope_theta=10000.0, rope_scale=(1.0, 1.0, 1.0), freq_dim=256, time_scale=1000.0, norm_eps=1e-6,
)

# Named sizes. Widths/depths/heads of S, B, L, XL are the DiT paper's (Peebles & Xie 2023, Table 1).
DIT_PRESETS: dict[str, dict] = {
    "demo": dict(hidden_size=192, depth=6, num_heads=6, patch_size=(1, 2, 2)),  # CPU-sized, head_dim 32
    "S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=(1, 2, 2)),
    "B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=(1, 2, 2)),
    "L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=(1, 2, 2)),
    "XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=(1, 2, 2)),
    "1B": dict(hidden_size=1536, depth=28, num_heads=24, patch_size=(1, 2, 2)),  # head_dim 64
    # Frontier sizes, head_dim 128 as in Wan / HunyuanVideo. A block costs 16 D^2 parameters at
    # mlp_ratio 4 (self-attn 4, cross-attn 4, MLP 8).
    "3B": dict(hidden_size=2560, depth=28, num_heads=20, patch_size=(1, 2, 2)),
    "7B": dict(hidden_size=3584, depth=36, num_heads=28, patch_size=(1, 2, 2)),
    # Wan2.1-14B's widths: dim 5120, 40 layers, 40 heads, FFN 13824 (mlp_ratio 2.7).
    "14B": dict(hidden_size=5120, depth=40, num_heads=40, mlp_ratio=13824 / 5120, patch_size=(1, 2, 2)),
    # The released Wan 2.1 text-to-video transformers (Wan-AI/Wan2.1-T2V-*; README "Model Dim" table),
    # exactly: load their weights with dit_video.convert. Wan 2.2 A14B's two experts have the 14B shape.
    "Wan2.1-T2V-1.3B": dict(hidden_size=1536, depth=30, num_heads=12, mlp_ratio=8960 / 1536,
                            rope_axes_dim=wan_rope_axes_dim(128), **WAN_LAYOUT),
    "Wan2.1-T2V-14B": dict(hidden_size=5120, depth=40, num_heads=40, mlp_ratio=13824 / 5120,
                           rope_axes_dim=wan_rope_axes_dim(128), **WAN_LAYOUT),
}


def dit_config(preset: str, **overrides) -> DiTConfig:
    """DiTConfig of a named preset with fields overridden (in_channels and text_dim are required)."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"model preset {preset!r} is unknown; known presets: {', '.join(DIT_PRESETS)}")
    return DiTConfig(**{**DIT_PRESETS[preset], **overrides})
