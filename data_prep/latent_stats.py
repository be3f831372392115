"""Per-channel mean/std of a VAE's raw latents over a shard set, so the DiT sees ~N(0, 1) latents.

    python -m data_prep.latent_stats --vae-config conf/vae/causal_demo.yaml vae.path=outputs/vae_demo/<time> \\
        --shards 'data/demo/train-{000000..000003}.tar' --out stats.json --num-frames 17 --size 32 32

`--vae-config` is a conf/vae/*.yaml file (or its name); `vae.FIELD=VALUE` arguments override its
fields, and the VAE is built by the same `build_vae` a training run uses. Clips are read as the
latent cache reads them (centre crop, frame start from (seed, key)), at the size and frame count
the DiT will train on. The raw latents are the encoder's posterior mode before any normalisation.

Writes `--out` (JSON: latents_mean, latents_std, how many samples and values, the VAE identity)
and then:
  * our CausalVAE (vae.kind causal): rewrites vae.safetensors with shift = mean, scale = 1/std,
    so every later run normalises with them (skip with --no-write; the weights hash changes, so
    latent caches made before are refused, as they should be);
  * a pretrained adapter: prints `latents_mean: [...]` / `latents_std: [...]` to paste into its
    conf/vae/*.yaml (the adapter then uses latents = (z - mean) / std instead of the model's own).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dit_video.build import build_vae
from dit_video.data.clips import VideoShardDataset
from dit_video.data.config import resolve_shards
from dit_video.encoders.base import clip_to_video
from dit_video.encoders.causal_vae import VAE_WEIGHTS_FILE, CausalVideoAutoencoder, save_vae
from dit_video.files import sha256_file

STATS_FORMAT = "dit_video.latent_stats/1"
CONF_VAE = Path(__file__).resolve().parents[1] / "conf" / "vae"


class ChannelStats:
    """Running per-channel count, mean and sum of squared deviations (M2) in float64.

    Batches are merged with Chan et al.'s parallel update (1979) rather than summing x and x^2:
    sum(x^2)/n - mean^2 cancels catastrophically when |mean| >> std, which raw latents can have
    (SD's latents have means of several std).
    """
    def __init__(self, channels: int):
        self.count = 0  # values seen per channel
        self.mean = torch.zeros(channels, dtype=torch.float64)  # [C]
        self.m2 = torch.zeros(channels, dtype=torch.float64)  # [C]

    def update(self, latents: torch.Tensor) -> None:
        """latents [B, C, ...]: every value of channel c counts once for channel c."""
        x = latents.detach().transpose(0, 1).flatten(1).double()  # [C, N]
        n_b = x.shape[1]
        mean_b = x.mean(dim=1)  # [C]
        m2_b = (x - mean_b[:, None]).pow(2).sum(dim=1)  # [C]
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.pow(2) * (self.count * n_b / n)
        self.count = n

    @property
    def std(self) -> torch.Tensor:
        """Population std [C] (what normalising the same values to unit variance needs)."""
        if self.count == 0:
            raise ValueError("--shards: no clip could be read at --num-frames/--size (all too short or corrupt)")
        return (self.m2 / self.count).sqrt()


def raw_latents(vae, video: torch.Tensor) -> torch.Tensor:
    """Un-normalised latents [B, C, T', H', W'] of video [B, 3, T, H, W].

    Both VAE kinds keep their normalisation as [C] buffers, latents = (z - shift) * scale, so the
    raw z is recovered from encode() without knowing which VAE this is."""
    latents = vae.encode(video)  # [B, C, T', H', W'] (normalised)
    return latents.double() / vae.scale.double().view(1, -1, 1, 1, 1) + vae.shift.double().view(1, -1, 1, 1, 1)


@torch.no_grad()
def latent_stats(vae, shards: list[str], num_frames: int, size: tuple[int, int], fps: float | None,
                 batch_size: int = 8, max_samples: int | None = None, seed: int = 0, decoder: str = "auto",
                 progress: bool = False) -> dict:
    """{"latents_mean", "latents_std" ([C] lists), "samples", "values_per_channel", "skipped_by_reason"}."""
    vae.latent_shape(num_frames, *size)  # raises naming the frame/size rule before any decoding
    dataset = VideoShardDataset(shards, num_frames, fps, size, crop="center", decoder=decoder, shuffle_buffer=0,
                                seed=seed, infinite=False, batch_size=batch_size, batched=True, rank=0,
                                world_size=1)
    total = len(dataset.index.samples) if max_samples is None else min(max_samples, len(dataset.index.samples))
    stats = ChannelStats(vae.latent_channels)
    skipped: Counter = Counter()
    samples = 0
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task("latent stats", total=total)
    try:
        for batch in dataset:
            skipped.update(batch["skipped_by_reason"])
            clip = batch["clip"][: total - samples]  # [B, T, H, W, 3] uint8
            stats.update(raw_latents(vae, clip_to_video(clip)))
            samples += clip.shape[0]
            if bar:
                bar.update(task, completed=samples)
            if samples >= total:
                break
    finally:
        if bar:
            bar.stop()
    std = stats.std
    return {
        "latents_mean": stats.mean.tolist(),
        "latents_std": std.tolist(),
        "samples": samples,
        "values_per_channel": stats.count,
        "skipped_by_reason": dict(skipped),
    }


def load_vae_node(spec: str, overrides: list[str]) -> dict:
    """A conf/vae YAML (path or name) with `vae.FIELD=VALUE` overrides applied, resolved."""
    path = Path(spec)
    if not path.is_file():
        path = CONF_VAE / f"{spec.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_VAE.glob("*.yaml"))
        raise ValueError(f"--vae-config: no file '{spec}' and no conf/vae/{spec}.yaml; known: {known}")
    node = OmegaConf.load(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("vae."):
            raise ValueError(f"override {item!r}: write it as vae.FIELD=VALUE (e.g. vae.path=/weights/my_vae)")
        field = key.removeprefix("vae.")
        if field.split(".")[0] not in node:  # a typo must not silently add a field
            raise ValueError(f"override {item!r}: {path.name} has no field {field!r}; known: {sorted(node)}")
        OmegaConf.update(node, field, OmegaConf.from_dotlist([f"v={value}"]).v)
    return OmegaConf.to_container(node, resolve=True)


def yaml_snippet(stats: dict) -> str:
    """The two lines to paste into a conf/vae/*.yaml (6 significant digits: ~1e-6 relative error)."""
    fmt = lambda xs: "[" + ", ".join(f"{x:.6g}" for x in xs) + "]"  # noqa: E731
    return f"latents_mean: {fmt(stats['latents_mean'])}\nlatents_std: {fmt(stats['latents_std'])}"


def write_into_causal_vae(vae, stats: dict) -> Path:
    """Rewrite a CausalVAE's vae.safetensors with shift = mean, scale = 1/std; returns its folder."""
    folder = Path(vae.weights_path).parent
    mean = torch.tensor(stats["latents_mean"], dtype=torch.float32)
    std = torch.tensor(stats["latents_std"], dtype=torch.float32)
    save_vae(folder, vae.vae, vae.vae.config, shift=mean, scale=1.0 / std)
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="vae.FIELD=VALUE", help="overrides of the VAE config")
    parser.add_argument("--vae-config", required=True, help="conf/vae/*.yaml file or name (e.g. causal_demo, wan)")
    parser.add_argument("--shards", nargs="+", required=True, help="clip shards (globs/braces)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--num-frames", type=int, default=17, help="frames per clip (the DiT's data.num_frames)")
    parser.add_argument("--size", type=int, nargs=2, default=[32, 32], metavar=("H", "W"))
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None, help="stop after this many clips (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="frame starts (use the training data.seed)")
    parser.add_argument("--decoder", default="auto")
    parser.add_argument("--no-write", action="store_true", help="causal VAE: only write --out, not vae.safetensors")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples={args.max_samples}: must be >= 1")
    try:
        node = load_vae_node(args.vae_config, args.overrides)
    except ValueError as err:
        parser.error(str(err))
    shards = resolve_shards(args.shards, field="--shards")
    if not shards:
        parser.error(f"--shards: no files match {args.shards}")
    try:
        vae = build_vae(OmegaConf.create({"vae": node}))
    except (ValueError, FileNotFoundError) as err:  # no VAE at vae.path, or a bad field
        parser.error(str(err))
    try:
        vae.latent_shape(args.num_frames, *args.size)
    except ValueError as err:
        parser.error(f"--num-frames/--size do not fit the VAE: {err}")
    try:
        stats = latent_stats(vae, shards, args.num_frames, tuple(args.size), args.fps, args.batch_size,
                             args.max_samples, args.seed, args.decoder, progress=sys.stderr.isatty())
    except ValueError as err:  # e.g. no clip of the shards could be decoded at this size
        parser.error(str(err))
    identity = vae.identity()
    if any(not math.isfinite(s) or s <= 0 for s in stats["latents_std"]):
        parser.error(f"latent std {stats['latents_std']} has a zero/non-finite channel: the VAE is degenerate")
    written = None
    if isinstance(vae, CausalVideoAutoencoder) and not args.no_write:
        written = str(write_into_causal_vae(vae, stats))
    result = {"format": STATS_FORMAT, **stats,
              "vae": {k: identity.get(k) for k in ("name", "weights", "sha256")}, "vae_kind": node.get("kind", "causal"),
              "clips": {"shards": shards, "num_frames": args.num_frames, "size": list(args.size), "fps": args.fps,
                        "crop": "center", "seed": args.seed},
              "written_to": written,
              # vae.sha256 is the file the stats were measured with; the rewritten file hashes to this
              "written_sha256": sha256_file(Path(written) / VAE_WEIGHTS_FILE) if written else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"latent stats of {stats['samples']} clips ({stats['values_per_channel']} values per channel) -> {out}")
    if written:
        print(f"wrote shift = mean, scale = 1/std into {written}/vae.safetensors: later runs normalise with them")
    elif isinstance(vae, CausalVideoAutoencoder):
        print("--no-write: vae.safetensors unchanged")
    else:
        print(f"paste into conf/vae/<yours>.yaml (or pass as vae.latents_mean=... vae.latents_std=...):\n"
              f"{yaml_snippet(stats)}")
    return result


if __name__ == "__main__":
    main()
