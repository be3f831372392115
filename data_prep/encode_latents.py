"""Clip shards -> latent shards (VAE latents + text embeddings), for training with `data=latents`.

    python -m data_prep.encode_latents --shards 'data/demo/train-*.tar' --out data/latents \\
        --vae outputs/vae_demo/<time> --text-encoder minilm --num-frames 17 --fps 8 --size 32 32

prints the cache folder, OUT/{vae}-{hash}__{text encoder}-{hash}/{T}x{H}x{W} (layout in
dit_video/data/latents.py); train on it with `data=latents data.cache=<that folder>`.

Any VAE a training run can use: `--vae-config NAME|file.yaml vae.FIELD=VALUE ...` (a conf/vae
config and overrides, built by the run's own `build_vae`, as data_prep.latent_stats does), e.g.

    python -m data_prep.encode_latents --vae-config wan vae.path=/weights/Wan2.1-T2V-1.3B-Diffusers \
        vae.subfolder=vae --shards ... --out data/latents --num-frames 17 --size 256 256

The cache is keyed on the adapter's identity(), so training with `data=latents vae=wan` and the
same vae.* fields accepts it and any other VAE is refused. `--vae DIR` is short for
`--vae-config causal_demo vae.path=DIR`.

Each clip is read exactly as the clip loader's validation pass reads it (centre crop; frame
start from (seed, epoch 0, key)), so the cached latents are those on-the-fly training would
compute for that window. One cache fixes one window per sample: on-the-fly training draws a
new window and crop every epoch; a cache trades that augmentation for speed.

Resumable: input shard i becomes latents-{i:06d}.tar, written under a temporary name and
renamed when complete; a rerun skips shards already written. The encoder identities are checked
against an existing cache.json first, so a rerun with other weights cannot mix two caches.

On GPUs, one process per GPU (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK):

    torchrun --nproc_per_node 8 -m data_prep.encode_latents --shards ... --out ... --vae-config wan \
        vae.path=... --text-encoder t5_xxl --device auto --text-dtype bfloat16

Rank r encodes input shards r, r + W, r + 2W, ... on `--device` (auto: cuda:LOCAL_RANK, else
cpu); rank 0 writes the empty-caption embedding and, once every rank is done, cache.json. Each
shard's output depends only on that shard, so W processes write the same files as one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data_prep.latent_stats import load_vae_node
from dit_video.build import build_vae
from dit_video.data.buckets import Bucket
from dit_video.data.clips import VideoShardDataset
from dit_video.data.config import resolve_shards
from dit_video.data.latents import (
    CACHE_FILE,
    CACHE_FORMAT,
    NULL_TEXT_FILE,
    cache_dir,
    check_identity,
    text_key,
    vae_key,
)
from dit_video.encoders.base import clip_to_video
from dit_video.encoders.causal_vae import CausalVideoAutoencoder, load_vae
from dit_video.encoders.text import HFTextEncoder
from dit_video.encoders.text_concat import build_text_encoder

_MTIME = 1_700_000_000
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_is(batch):
    return batch  # the dataset already collates


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
    tar.addfile(info, io.BytesIO(data))


@torch.no_grad()
def encode_shard(shard: str, out_path: Path, vae, text_encoder, bucket: Bucket, fps: float | None, seed: int,
                 decoder: str, num_workers: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> dict:
    """One clip shard -> one latent shard; returns {"samples", "skipped_by_reason"}."""
    from safetensors.torch import save as save_safetensors
    from torch.utils.data import DataLoader

    dataset = VideoShardDataset([shard], bucket.num_frames, fps, (bucket.height, bucket.width), crop="center",
                                decoder=decoder, shuffle_buffer=0, seed=seed, infinite=False,
                                batch_size=bucket.batch_size, batched=True, rank=0, world_size=1)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is)
    skipped: Counter = Counter()
    count = 0
    tmp = out_path.with_name(out_path.name + ".partial")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for batch in loader:
            skipped.update(batch["skipped_by_reason"])
            latents = vae.encode(clip_to_video(batch["clip"].to(device))).float().cpu()  # [B, C, T', H', W']
            text_emb, text_mask = (x.cpu() for x in text_encoder.encode(batch["caption"]))  # [B, L, D], [B, L]
            for i, key in enumerate(batch["key"]):
                n = int(text_mask[i].sum())
                tensors = {"latents": latents[i].to(dtype).contiguous(),  # [C, T', H', W']
                           "text_emb": text_emb[i, :n].float().contiguous()}  # [n, D]: no padding stored
                _add(tar, f"{key}.safetensors", save_safetensors(tensors))
                _add(tar, f"{key}.txt", batch["caption"][i].encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps({"source_shard": os.path.basename(shard), "key": key}).encode())
                count += 1
    os.replace(tmp, out_path)
    return {"samples": count, "skipped_by_reason": dict(skipped)}


def _no_barrier() -> None:
    return None


@torch.no_grad()
def encode_latents(shards: list[str], out_root: str | os.PathLike, vae, text_encoder, num_frames: int,
                   size: tuple[int, int], fps: float | None, batch_size: int = 16, seed: int = 0,
                   decoder: str = "auto", num_workers: int = 0, dtype: str = "float32",
                   progress: bool = False, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                   barrier: Callable[[], None] = _no_barrier) -> Path:
    """Encode `shards` into a latent cache under `out_root`; returns the cache folder.

    The VAE and text encoder must already be on `device`. With world_size > 1 this process (rank)
    encodes shards rank, rank + world_size, ...; `barrier` waits for every process (collective:
    all ranks call this function with the same arguments)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    bucket = Bucket(num_frames, size[0], size[1], batch_size)
    vae_id, text_id = vae.identity(), text_encoder.identity()
    vae.latent_shape(num_frames, *size)  # raises naming the rule if the clip shape does not fit the VAE
    out = cache_dir(out_root, vae_id, text_id, bucket)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / CACHE_FILE
    if meta_path.is_file():
        check_identity(json.loads(meta_path.read_text()), vae_id, text_id, where=str(out))
    if rank == 0:
        null_emb, null_mask = text_encoder.encode([""])  # [1, L0, D], [1, L0]
        save_file({"text_emb": null_emb[0].float().cpu().contiguous(),
                   "text_mask": null_mask[0].cpu().to(torch.uint8).bool()}, str(out / NULL_TEXT_FILE))

    state_dir = out / ".done"
    state_dir.mkdir(exist_ok=True)
    mine = list(range(rank, len(shards), world_size))  # round-robin: each shard's output depends on it alone
    bar = None
    if progress and rank == 0:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task(f"encode latents (rank 0 of {world_size})", total=len(mine))
    for i in mine:
        target = out / f"latents-{i:06d}.tar"
        done = state_dir / f"latents-{i:06d}.json"
        if not (target.is_file() and done.is_file()):
            result = encode_shard(shards[i], target, vae, text_encoder, bucket, fps, seed, decoder, num_workers,
                                  DTYPES[dtype], device)
            done.write_text(json.dumps({"shard": shards[i], **result}))
        if bar:
            bar.advance(task)
    if bar:
        bar.stop()
    barrier()  # every shard written before rank 0 sums them up
    if rank == 0:
        _write_meta(out, shards, vae, vae_id, text_id, num_frames, size, fps, dtype, seed)
    barrier()  # cache.json exists for every rank's caller
    return out


def _write_meta(out: Path, shards: list[str], vae, vae_id: dict, text_id: dict, num_frames: int,
                size: tuple[int, int], fps: float | None, dtype: str, seed: int) -> None:
    """cache.json from the per-shard results (written last, atomically: its presence marks a complete cache)."""
    state_dir = out / ".done"
    results = [json.loads((state_dir / f"latents-{i:06d}.json").read_text()) for i in range(len(shards))]
    skipped: Counter = Counter()
    for r in results:
        skipped.update(r["skipped_by_reason"])
    c = vae.latent_channels
    meta = {
        "format": CACHE_FORMAT,
        "vae": vae_key(vae_id), "text_encoder": text_key(text_id),
        "vae_weights": vae_id.get("weights"), "text_encoder_path": text_id.get("path"),  # informative only
        "bucket": {"num_frames": num_frames, "size": list(size), "fps": fps, "crop": "center"},
        "latent_shape": [c, *vae.latent_shape(num_frames, *size)],
        "dtype": dtype, "seed": seed, "samples": sum(r["samples"] for r in results),
        "skipped_by_reason": dict(skipped), "source_shards": [r["shard"] for r in results],
    }  # no timing: the same shards and encoders give the same bytes, on 1 process or W
    meta_path = out / CACHE_FILE
    tmp = meta_path.with_name(CACHE_FILE + ".partial")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)


def load_text_encoder(spec: str, max_length: int | None, dtype: str | None):
    """`spec` = a conf/text_encoder/*.yaml name (e.g. minilm: the identity training will check) or a
    local Hugging Face model folder. --text-max-length/--text-dtype override a single encoder's
    fields (a concatenated config is used as written)."""
    conf = Path(__file__).resolve().parents[1] / "conf" / "text_encoder" / f"{spec}.yaml"
    if conf.is_file():
        node = OmegaConf.to_container(OmegaConf.load(conf), resolve=True)
        if "encoders" not in node:
            node.update({k: v for k, v in (("max_length", max_length), ("dtype", dtype)) if v is not None})
        elif max_length is not None or dtype is not None:
            raise SystemExit(f"--text-max-length/--text-dtype: {conf} concatenates encoders; edit its parts instead")
        return build_text_encoder(node)
    return HFTextEncoder(spec, max_length or 32, dtype or "float32")


def build_vae_from_args(vae_dir: str | None, vae_config: str | None, overrides: list[str]):
    """The frozen VAE a training run with the same vae config would build: our causal VAE from
    `vae_dir`, or conf/vae `vae_config` + `vae.FIELD=VALUE` overrides through dit_video.run.build_vae
    (causal or any diffusers adapter), so the cache key is the identity() training checks."""
    if vae_dir is not None:
        return load_vae(vae_dir)
    return build_vae(OmegaConf.create({"vae": load_vae_node(vae_config, overrides)}))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", nargs="+", required=True, help="clip shards (globs/braces)")
    parser.add_argument("--out", required=True, help="cache root; the cache folder is printed")
    parser.add_argument("overrides", nargs="*", metavar="vae.FIELD=VALUE", help="overrides of --vae-config")
    vae_arg = parser.add_mutually_exclusive_group(required=True)
    vae_arg.add_argument("--vae", help="trained causal VAE folder (vae.safetensors + vae.json)")
    vae_arg.add_argument("--vae-config", help="conf/vae/*.yaml name or file (e.g. wan), with vae.FIELD=VALUE overrides")
    parser.add_argument("--text-encoder", default="minilm", help="conf/text_encoder name or model folder")
    parser.add_argument("--text-max-length", type=int, default=None)
    parser.add_argument("--text-dtype", default=None)
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--size", type=int, nargs=2, default=[32, 32], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers decoding clips")
    parser.add_argument("--seed", type=int, default=0, help="frame starts (use the training data.seed)")
    parser.add_argument("--decoder", default="auto")
    parser.add_argument("--dtype", default="float32", help="stored latent dtype: float32 | bfloat16 | float16")
    parser.add_argument("--device", default="auto", help="where the encoders run: auto (cuda:LOCAL_RANK if a GPU "
                        "is there, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument("--vae-dtype", default=None, choices=sorted(DTYPES),
                        help="our causal VAE's weights and compute dtype (default: as saved, float32); a "
                             "pretrained VAE takes vae.dtype=... instead (it is part of its identity)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's
    if args.vae is not None and args.overrides:
        parser.error(f"{args.overrides[0]}: vae.FIELD=VALUE overrides go with --vae-config, not --vae")
    shards = resolve_shards(args.shards, field="--shards")
    if not shards:
        parser.error(f"--shards: no files match {args.shards}")
    try:
        vae = build_vae_from_args(args.vae, args.vae_config, args.overrides)
    except (ValueError, FileNotFoundError) as err:  # no VAE at vae.path, a bad field or override
        parser.error(str(err))
    if args.vae_dtype is not None and not isinstance(vae, CausalVideoAutoencoder):  # adapters cast to vae.dtype
        parser.error("--vae-dtype: this VAE is a pretrained one; set vae.dtype=... (part of its identity) instead")
    device = torch.device(args.device if args.device != "auto" else
                          f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    vae = vae.to(device=device, dtype=DTYPES[args.vae_dtype] if args.vae_dtype else None)
    text_encoder = load_text_encoder(args.text_encoder, args.text_max_length, args.text_dtype).to(device)
    barrier = _no_barrier
    if world_size > 1:  # a barrier only: the shards are split by rank, nothing else is exchanged
        dist.init_process_group("gloo")
        barrier = dist.barrier
    start = time.perf_counter()
    try:
        out = encode_latents(shards, args.out, vae, text_encoder, args.num_frames, tuple(args.size), args.fps,
                             args.batch_size, args.seed, args.decoder, args.workers, args.dtype,
                             progress=sys.stderr.isatty(), device=device, rank=rank, world_size=world_size,
                             barrier=barrier)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        meta = json.loads((out / CACHE_FILE).read_text())
        print(f"encoded {meta['samples']} samples into {out} (skipped {sum(meta['skipped_by_reason'].values())}) "
              f"in {time.perf_counter() - start:.1f} s on {world_size} process(es); "
              f"train with: data=latents data.cache={out}")
    return out


if __name__ == "__main__":
    main()
