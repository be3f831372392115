"""Prompts and real reference clips from a run's own data, so any run is evaluated on what it learnt.

By default a run is evaluated on captions of its validation shards (data.val_shards, or the clip
shards its latent cache data.val_cache was encoded from); a run without them on a fixed seeded
sample of its training captions. Each prompt comes with the real clip of the same sample, read as
the validation loader reads it (dit_video.data.clips.VideoShardDataset: the run's frames, fps,
size, centre crop, and the loader's per-sample random stream of epoch 0), so generated and real
clips have one shape and can be compared frame for frame. Prompts given by hand (`prompts=`,
`prompt_file=`) have no real clip.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dit_video.data.clips import VideoShardDataset
from dit_video.data.config import resolve_shards
from dit_video.data.index import MemberReader, build_index
from dit_video.data.latents import CACHE_FILE
from dit_video.data.samples import key_seed
from dit_video.errors import SampleError
from dit_video.eval.camera import run_clip_shards
from dit_video.prompt_filter import compile_phrases
from dit_video.provenance import DEFAULT_BLOCKLIST, load_blocklist


@dataclass
class References:
    """Prompts to sample and, when they come from the run's data, the real clip of each."""

    prompts: list[str]
    clips: np.ndarray | None = None  # uint8 [N, T, H, W, 3], clips[i] is the sample prompts[i] is the caption of
    keys: list[str] = field(default_factory=list)  # the samples' keys, in prompt order
    source: dict = field(default_factory=dict)  # where they come from (recorded in the report)

    def describe(self) -> str:
        """One line: where the prompts come from."""
        s = self.source
        if s.get("split") is None:
            return f"{len(self.prompts)} prompts given by hand ({s.get('from', 'prompts=')}); no real clips"
        what = "validation" if s["split"] == "val" else "training"
        sample = f" (seeded sample, seed {s['seed']})" if len(self.prompts) < s["num_available"] else ""
        return (f"{len(self.prompts)} captions of the run's {what} clips{sample}, {s['num_available']} available "
                f"in {s['shards']}, with the real clip of each")


def clip_spec(data: dict) -> dict:
    """How the run's loader reads a clip: {"num_frames", "fps", "size", "seed", "decoder"} from a
    run's `data` config (for a latent cache: what its cache.json says the clips were read with)."""
    if data.get("kind") == "latents":
        meta = json.loads((Path(str(data["cache"])) / CACHE_FILE).read_text())
        bucket = meta["bucket"]
        return {"num_frames": int(bucket["num_frames"]), "fps": bucket.get("fps"), "size": tuple(bucket["size"]),
                "seed": int(meta.get("seed", 0)), "decoder": "auto"}
    return {"num_frames": int(data["num_frames"]), "fps": data.get("fps"), "size": tuple(data["size"]),
            "seed": int(data.get("seed", 0)), "decoder": data.get("decoder", "auto")}


def run_references(data: dict, num: int, seed: int = 0) -> References:
    """`num` captions and real clips from a run's `data` config: its validation clips, or without
    them a seeded sample of its training clips. Within a split the samples are a seeded sample too
    (`seed`), so the same run and seed always give the same prompts. Captions the prompt filter
    refuses (conf/blocklist.txt) and samples the loader cannot read at the run's shape are passed
    over and counted in source["passed_over"]."""
    train_shards, val_shards = run_clip_shards(data)
    for split, shards in (("val", val_shards), ("train", train_shards)):
        if shards and resolve_shards(shards):
            return read_references(shards, clip_spec(data), num, seed, split)
    raise ValueError(f"the run's data names no readable clip shards (data.shards={train_shards!r}, "
                     f"data.val_shards={val_shards!r}); give prompts=[...] instead")


def read_references(shards, spec: dict, num: int, seed: int, split: str) -> References:
    """A seeded sample of `num` captioned samples of `shards`, read at `spec` (clip_spec)."""
    if num < 1:
        raise ValueError(f"num_prompts: must be >= 1, got {num}")
    urls = resolve_shards(shards)
    index = build_index(urls)
    dataset = VideoShardDataset(urls, spec["num_frames"], spec["fps"], spec["size"], crop="center",
                                decoder=spec["decoder"], seed=spec["seed"], infinite=False, rank=0, world_size=1,
                                index=index)
    refuse = compile_phrases(tuple(load_blocklist()), str(DEFAULT_BLOCKLIST))
    reader = MemberReader(index.shards)
    prompts, clips, keys, passed = [], [], [], Counter()
    try:
        for i in np.random.default_rng(seed).permutation(len(index)):
            if len(prompts) >= num:
                break
            ref = index.samples[int(i)]
            # The validation loader's stream for this sample (dataset.py: seed, epoch 0, key): the
            # frames it computes the held-out loss on.
            rng = np.random.default_rng([spec["seed"], 0, key_seed(ref.key)])
            try:
                item = dataset.load(reader.read(ref), ref.key, dataset.buckets[0], rng)
            except SampleError as err:
                passed[err.reason] += 1
                continue
            if refuse.match(item["caption"]) is not None:
                passed["refused_caption"] += 1
                continue
            prompts.append(item["caption"])
            clips.append(item["clip"].numpy())  # [T, H, W, 3]
            keys.append(ref.key)
    finally:
        reader.close()
    if not prompts:
        raise ValueError(f"no readable captioned clip of {spec['num_frames']} frames in {shards!r} "
                         f"(passed over: {dict(passed) or 'none'}); give prompts=[...] instead")
    source = {"split": split, "shards": shards if isinstance(shards, str) else list(shards), "seed": seed,
              "num_available": len(index), "keys": keys, "passed_over": dict(passed),
              "clip": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}}
    return References(prompts, np.stack(clips), keys, source)  # clips [N, T, H, W, 3]


def given_references(prompts: list[str] | None, prompt_file: str | None) -> References | None:
    """References for prompts given by hand (`prompts=` or `prompt_file=`: one prompt a line,
    blank lines and lines starting with '#' skipped, as sample.py), or None when neither is given."""
    if prompts and prompt_file:
        raise ValueError("prompts= and prompt_file= both given; use one")
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file: '{path}' does not exist (one prompt a line)")
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]  # as sample.py reads it
        if not prompts:
            raise ValueError(f"prompt_file: '{path}' has no prompts (one a line)")
        return References(prompts, source={"from": f"prompt_file={path}"})
    if prompts:
        return References(list(prompts), source={"from": "prompts="})
    return None
