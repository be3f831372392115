"""Input-pipeline throughput on one shard set: the decode limit, our clip loader, the latent loader.

    python benchmarks/data_throughput.py [--shards 'data/demo/train-*.tar'] [--clips 512] [--vae DIR]

Measured in one run, on the same shards, with the same clip shape (--num-frames at --fps,
--size):
  raw decord      (and "helper thread": the same, each clip in a TimedCall thread as the loader
                  decodes it) decord.VideoReader + get_batch of exactly the frames the loader reads for the
                  same samples (the loader's epoch order, its per-key frame start), member bytes
                  already in memory, one process: the decode limit of one worker. Resizing and
                  cropping are the loader's own work, so they count against it (the demo shards
                  are stored at 32x32: there is none at the default size)
  loader, 0 / 2   VideoDataModule's training loader (index read by offset, decode, crop,
                  collate) with 0 and 2 DataLoader workers
  latent loader   LatentDataModule over a cache of the same clips (encoded first, not timed),
                  0 workers
  decode_clip, X  data.decoder=X (decord, pyav, torchcodec) through the loader's decode_clip,
                  bytes in memory, one process: the backends side by side (torchcodec only
                  where it loads; otherwise the reason is printed)

Fairness on a shared machine: raw decode, the 0-worker loader and the latent loader are timed
batch by batch in turn (raw batch, loader batch, latent batch, raw batch, ...), so load drift
hits all three alike, and each is timed both by the wall clock and by this process's CPU time
(process_time: every thread, not slowed by other jobs' load). Measuring them one after
another for seconds each, as an earlier version did, let the machine's load move the ratio by
+-30%. The 2-worker loader runs in child processes, so it has only a wall-clock figure, timed on
its own (interleaving it would let its workers prefetch during the other measurements).
Every figure is the median over --repeats rounds. Judge the 0.9x target on CPU time: on a loaded
machine the wall clock favours the loader, whose decode runs in the decode-timeout helper thread
(TimedCall); a thread that sleeps and wakes per clip is scheduled ahead of busy jobs, and the same
decode took ~20% less wall time but the same CPU time in a helper thread than in the main thread.
"raw decord, helper thread" is the wall-clock limit measured the loader's way.

Prints clips/s and the ratios the issue asks about: loader(0 workers) / raw decode (target
>= 0.9: the loader adds little to decoding), loader(2) / loader(0) (scaling; this machine has 2
shared cores) and latent / loader(0) (target >= 20x at the demo size). Without --vae a randomly
initialised VAE of the demo configuration is used: throughput does not depend on its weights.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.encode_latents import encode_latents, load_text_encoder  # noqa: E402
from dit_video.data.config import VideoDataConfig, resolve_shards  # noqa: E402
from dit_video.data.datamodule import VideoDataModule  # noqa: E402
from dit_video.data.decode import TimedCall, decode_clip, frame_indices, torchcodec_problem  # noqa: E402
from dit_video.data.index import MemberReader, build_index  # noqa: E402
from dit_video.data.latents import LatentDataConfig, LatentDataModule  # noqa: E402
from dit_video.data.samples import key_seed  # noqa: E402
from dit_video.encoders.causal_vae import CausalVAE, CausalVAEConfig, load_vae, save_vae  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Timer:
    """Seconds and clips per clock, summed over the timed chunks of one measurement."""

    def __init__(self):
        self.seconds = dict.fromkeys(CLOCKS, 0.0)
        self.clips = 0

    def time(self, fn) -> None:
        start = {name: clock() for name, clock in CLOCKS.items()}
        self.clips += fn()
        for name, clock in CLOCKS.items():
            self.seconds[name] += clock() - start[name]

    def rate(self, clock: str) -> float:
        return self.clips / self.seconds[clock]


def planned_blobs(module: VideoDataModule, batches: int) -> list[list[tuple[str, bytes]]]:
    """(key, mp4 bytes) of the samples in the training loader's first `batches` batches, in its order."""
    dataset = module.train_dataset()
    plan = dataset.epoch_plan(0)
    reader = MemberReader(dataset.index.shards)
    out = []
    for batch in plan[1:batches + 1]:  # the loader's first batch is its warm-up
        refs = [dataset.index.samples[int(i)] for i in batch]
        out.append([(ref.key, reader.read(ref, ("mp4",))["mp4"]) for ref in refs])
    reader.close()
    return out


def raw_decord(blobs: list[tuple[str, bytes]], num_frames: int, fps: float | None, seed: int) -> int:
    """Decode exactly the frames the loader decodes for these samples (same per-key frame start)."""
    import decord

    for key, data in blobs:
        video = decord.VideoReader(io.BytesIO(data), num_threads=1)
        rng = np.random.default_rng([seed, 0, key_seed(key)])  # the loader's stream for (seed, epoch 0, key)
        indices = frame_indices(len(video), video.get_avg_fps(), num_frames, fps, rng)
        video.get_batch(indices.tolist()).asnumpy()  # [T, H, W, 3]
    return len(blobs)


def raw_decord_threaded(timed: TimedCall, blobs: list[tuple[str, bytes]], num_frames: int, fps: float | None) -> int:
    """raw_decord, each clip in the decode-timeout helper thread as the loader runs it (see above)."""
    return sum(timed(raw_decord, [blob], num_frames, fps, 0) for blob in blobs)


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


def take(batches: Iterator[dict], n: int) -> int:
    """Clips in the next `n` batches of a loader."""
    return sum(len(next(batches)["key"]) for _ in range(n))


def loader_rate(module, clips: int, batch_size: int) -> float:
    """Wall-clock clips/s of a fresh training loader, after one warm-up batch."""
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
    parser.add_argument("--clips", type=int, default=512, help="clips timed per measurement and round")
    parser.add_argument("--num-frames", type=int, default=17)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--size", type=int, nargs=2, default=[32, 32])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--latent-batches", type=int, default=4, help="latent batches timed per clip batch")
    parser.add_argument("--vae", default=None, help="trained VAE folder (default: a random demo VAE)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    shards = resolve_shards(args.shards)
    if not shards:
        parser.error(f"--shards: no files match {args.shards!r} (python -m data_prep.make_demo --out data/demo)")

    def clip_module(workers: int) -> VideoDataModule:
        cfg = VideoDataConfig(shards=shards, val_shards=None, num_frames=args.num_frames, fps=args.fps,
                              size=tuple(args.size), batch_size=args.batch_size, num_workers=workers,
                              shuffle_buffer=1, seed=0, crop="random")
        return VideoDataModule(cfg)

    batches = max(1, args.clips // args.batch_size)
    runs: dict[str, list[float]] = {}
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

        blobs = planned_blobs(clip_module(0), batches)
        timed = TimedCall(VideoDataConfig.decode_timeout)
        backends = ["decord", "pyav"] + ([] if torchcodec_problem() else ["torchcodec"])
        for _ in range(args.repeats):
            # 1. raw decode, the 0-worker loader and the latent loader, batch by batch in turn.
            clip_it, latent_it = iter(clip_module(0).train_dataloader()), iter(LatentDataModule(latent_cfg).train_dataloader())
            next(clip_it), next(latent_it)  # warm-up (index, first decode), not timed
            timers = {name: Timer() for name in ("raw", "raw_thread", "loader", "latent")}
            for chunk in blobs:
                timers["raw"].time(functools.partial(raw_decord, chunk, args.num_frames, args.fps, 0))
                timers["raw_thread"].time(functools.partial(raw_decord_threaded, timed, chunk, args.num_frames, args.fps))
                timers["loader"].time(functools.partial(take, clip_it, 1))
                timers["latent"].time(functools.partial(take, latent_it, args.latent_batches))
            for name, label in (("raw", "raw decord (1 process)"), ("raw_thread", "raw decord, helper thread"),
                                ("loader", "clip loader, 0 workers"), ("latent", "latent loader, 0 workers")):
                for clock in CLOCKS:
                    runs.setdefault(f"{label} [{clock}]", []).append(timers[name].rate(clock))
            # 2. the 2-worker loader on its own (wall clock: its work is in child processes).
            runs.setdefault("clip loader, 2 workers [wall]", []).append(
                loader_rate(clip_module(2), args.clips, args.batch_size))
            # 3. the decoder backends side by side (informative).
            for backend in backends:
                rate = backend_rate(shards, args.clips, args.num_frames, args.fps, backend)
                runs.setdefault(f"decode_clip, {backend} [wall]", []).append(rate)

    results = {name: statistics.median(rates) for name, rates in runs.items()}
    ratios = {}
    for clock in CLOCKS:
        raw, l0, lat = (results[f"{k} [{clock}]"] for k in ("raw decord (1 process)", "clip loader, 0 workers",
                                                             "latent loader, 0 workers"))
        ratios[f"loader(0) / raw decode [{clock}]"] = l0 / raw
        ratios[f"latent / loader(0) [{clock}]"] = lat / l0
    ratios["loader(0) / raw decode, helper thread [wall]"] = (
        results["clip loader, 0 workers [wall]"] / results["raw decord, helper thread [wall]"])
    ratios["loader(2) / loader(0) [wall]"] = results["clip loader, 2 workers [wall]"] / results["clip loader, 0 workers [wall]"]
    print(f"shards {args.shards}: clips of {args.num_frames} frames at {args.fps:g} fps, {args.size[0]}x{args.size[1]}, "
          f"batch {args.batch_size}, medians of {args.repeats} rounds (latent cache encoded in {encode_s:.1f} s, not timed)")
    for name, rate in results.items():
        print(f"  {name:44s} {rate:9.1f} clips/s")
    targets = {"loader(0) / raw decode": "target >= 0.9", "latent / loader(0)": "target >= 20",
               "loader(0) / raw decode, helper thread": "target >= 0.9",
               "loader(2) / loader(0)": "2 shared CPU cores here"}
    for name, ratio in ratios.items():
        print(f"  {name:44s} {ratio:9.2f}x   ({targets[name.split(' [')[0]]})")
    if torchcodec_problem():
        print(f"  torchcodec not measured: {torchcodec_problem()}")
    return {**results, **ratios}


if __name__ == "__main__":
    main()
