"""Input-pipeline throughput on one shard set: the decode limit, our clip loader, the latent loader.

    python benchmarks/data_throughput.py [--shards 'data/demo/train-*.tar'] [--clips 512] [--vae DIR]

Measured in one run, on the same shards, with the same clip shape (--num-frames at --fps,
--size), each after a short warm-up:
  raw decord      decord.VideoReader + get_batch of exactly the frames a clip needs, member
                  bytes already in memory, one process: the decode limit of one worker
  loader, 0 / 2   VideoDataModule's training loader (index read by offset, decode, crop,
                  collate) with 0 and 2 DataLoader workers
  latent loader   LatentDataModule over a cache of the same clips (encoded first, not timed),
                  0 workers
  decode_clip, X  data.decoder=X (decord, pyav, torchcodec) through the loader's decode_clip,
                  bytes in memory, one process: the backends side by side (torchcodec only
                  where it loads; otherwise the reason is printed)
Each clip measurement is repeated --repeats times, alternating, and the median is reported.
Prints clips/s and the ratios the issue asks about: loader(0 workers) / raw decode (target
>= 0.9: the loader adds little to decoding), loader(2) / loader(0) (scaling; this machine has 2
shared cores) and latent / loader(0) (target >= 20x at the demo size). Without --vae a randomly
initialised VAE of the demo configuration is used: throughput does not depend on its weights.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_video.data.decode import decode_clip, frame_indices, torchcodec_problem  # noqa: E402
from dit_video.data.index import MemberReader, build_index  # noqa: E402
from dit_video.data.loader import VideoDataConfig, VideoDataModule, resolve_shards  # noqa: E402


def raw_decord(shards: list[str], clips: int, num_frames: int, fps: float | None) -> float:
    import decord

    index = build_index(shards)
    reader = MemberReader(shards)
    blobs = [reader.read(ref, ("mp4",))["mp4"] for ref in index.samples[:clips]]
    reader.close()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for data in blobs:
        video = decord.VideoReader(io.BytesIO(data), num_threads=1)
        indices = frame_indices(len(video), video.get_avg_fps(), num_frames, fps, rng)
        video.get_batch(indices.tolist()).asnumpy()
    return len(blobs) / (time.perf_counter() - start)


def backend_rate(shards: list[str], clips: int, num_frames: int, fps: float | None, backend: str) -> float:
    index = build_index(shards)
    reader = MemberReader(shards)
    blobs = [reader.read(ref, ("mp4",))["mp4"] for ref in index.samples[:clips]]
    reader.close()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for data in blobs:
        decode_clip(data, num_frames, fps, rng, backend=backend)
    return len(blobs) / (time.perf_counter() - start)


def loader_rate(module, clips: int, batch_size: int) -> float:
    loader = module.train_dataloader()
    batches = max(1, clips // batch_size)
    it = iter(loader)
    next(it)  # warm-up: worker start, index, first decode
    start = time.perf_counter()
    n = sum(len(b["key"]) for b in itertools.islice(it, batches))
    rate = n / (time.perf_counter() - start)
    del it, loader
    return rate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="data/demo/train-*.tar")
    parser.add_argument("--clips", type=int, default=512, help="clips timed per measurement")
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--size", type=int, nargs=2, default=[32, 32])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--vae", default=None, help="trained VAE folder (default: a random demo VAE)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    shards = resolve_shards(args.shards)
    if not shards:
        parser.error(f"--shards: no files match {args.shards!r} (python -m data_prep.make_demo --out data/demo)")

    backends = ["decord", "pyav"] + ([] if torchcodec_problem() else ["torchcodec"])
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # alternate the measurements: load on this shared machine drifts
        runs.setdefault("raw decord (1 process)", []).append(raw_decord(shards, args.clips, args.num_frames, args.fps))
        for backend in backends:
            rate = backend_rate(shards, args.clips, args.num_frames, args.fps, backend)
            runs.setdefault(f"decode_clip, {backend}", []).append(rate)
        for workers in (0, 2):
            cfg = VideoDataConfig(shards=shards, val_shards=None, num_frames=args.num_frames, fps=args.fps,
                                  size=tuple(args.size), batch_size=args.batch_size, num_workers=workers,
                                  shuffle_buffer=1, seed=0, crop="random")
            rate = loader_rate(VideoDataModule(cfg), args.clips, args.batch_size)
            runs.setdefault(f"clip loader, {workers} workers", []).append(rate)
    results = {name: statistics.median(rates) for name, rates in runs.items()}

    from data_prep.encode_latents import encode_latents, load_text_encoder
    from dit_video.data.latents import LatentDataConfig, LatentDataModule
    from dit_video.encoders.vae import CausalVAE, CausalVAEConfig, load_vae, save_vae

    with tempfile.TemporaryDirectory() as tmp:
        if args.vae is None:
            vae_cfg = CausalVAEConfig(base_channels=32, channel_mult=(1, 2, 2), patch_size=2)
            c = vae_cfg.latent_channels
            save_vae(Path(tmp) / "vae", CausalVAE(vae_cfg), vae_cfg, torch.zeros(c), torch.ones(c))
        vae = load_vae(args.vae or Path(tmp) / "vae")
        text = load_text_encoder("minilm", None, None)
        t0 = time.perf_counter()
        cache = encode_latents(shards[:max(1, len(shards) // 3)], Path(tmp) / "latents", vae, text, args.num_frames,
                               tuple(args.size), args.fps, batch_size=args.batch_size)
        encode_s = time.perf_counter() - t0
        latent_cfg = LatentDataConfig(cache=str(cache), batch_size=args.batch_size, num_workers=0)
        results["latent loader, 0 workers"] = loader_rate(LatentDataModule(latent_cfg), args.clips * 4, args.batch_size)

    raw, l0, l2 = (results[k] for k in ("raw decord (1 process)", "clip loader, 0 workers", "clip loader, 2 workers"))
    lat = results["latent loader, 0 workers"]
    print(f"shards {args.shards}: clips of {args.num_frames} frames at {args.fps:g} fps, {args.size[0]}x{args.size[1]}, "
          f"batch {args.batch_size} (latent cache encoded in {encode_s:.1f} s, not timed)")
    for name, rate in results.items():
        print(f"  {name:28s} {rate:9.1f} clips/s")
    print(f"  loader(0) / raw decode      {l0 / raw:9.2f}x   (target >= 0.9)")
    print(f"  loader(2) / loader(0)       {l2 / l0:9.2f}x   (2 shared CPU cores here)")
    print(f"  latent / loader(0)          {lat / l0:9.1f}x   (target >= 20)")
    if torchcodec_problem():
        print(f"  torchcodec not measured: {torchcodec_problem()}")
    return results


if __name__ == "__main__":
    main()
