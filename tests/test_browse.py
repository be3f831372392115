"""Shard browsing for notebooks (dit_video.data.browse, behind api.browse_shards/shard_stats) reads
shards as the training loader does: compressed shards are refused, unsafe names and oversized
members skip their sample, a shard cut short keeps the samples before the damage; each skip is
counted by reason."""

from __future__ import annotations

import gzip
import json
import lzma
import tarfile
from collections import Counter

import pytest

from dit_video.data.browse import browse_shards, shard_stats


def _member(name: str, data: bytes, size: int | None = None) -> bytes:
    """One tar member (header + data padded to 512 bytes); `size` overrides what the header claims."""
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def _sample(key: str, caption: str, frames: int = 17) -> bytes:
    return _member(f"{key}.json", json.dumps({"frames": frames, "height": 32, "width": 32}).encode()) + \
        _member(f"{key}.txt", caption.encode())


END = b"\0" * 1024  # end-of-archive marker


def test_compressed_shards_are_refused(tmp_path):
    plain = _sample("a", "a red square") + _sample("b", "a blue circle") + END
    for name, data, kind in (("gz.tar.gz", gzip.compress(plain), "gzip"), ("xz.tar.xz", lzma.compress(plain), "xz")):
        (tmp_path / name).write_bytes(data)
        for read in (shard_stats, browse_shards):
            with pytest.raises(ValueError, match=f"shard '{tmp_path / name}' is {kind}-compressed.*tar -cf"):
                read(str(tmp_path / name))
    (tmp_path / "plain.tar").write_bytes(plain)
    assert shard_stats(str(tmp_path / "plain.tar"))["num_samples"] == 2


def test_unsafe_oversized_and_cut_members_skip_their_sample_and_are_counted(tmp_path):
    # a huge member's header claims 1 TiB (the file holds 512 bytes): its sample is never read
    huge = (_sample("a", "a red square") + _member("../evil.txt", b"outside") + _sample("b", "a blue circle")
            + _member("c.txt", b"x" * 512, size=2**40))
    (tmp_path / "huge.tar").write_bytes(huge)
    stats = shard_stats(str(tmp_path / "huge.tar"))
    assert stats["num_samples"] == 2 and stats["captions"] == Counter({"a red square": 1, "a blue circle": 1})
    assert stats["skipped"] == Counter({"unsafe_name": 1, "too_large": 1, "bad_tar": 1})
    assert [s["key"] for s in browse_shards(str(tmp_path / "huge.tar"))] == ["a", "b"]
    # a shard cut in the middle of its last sample: the samples before the damage are kept
    whole = _sample("a", "a red square") + _sample("b", "a blue circle") + _sample("c", "x" * 2000) + END
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) - 1024 - 1000])
    stats = shard_stats([str(tmp_path / "cut.tar"), str(tmp_path / "huge.tar")])
    assert stats["num_samples"] == 4 and stats["skipped"]["bad_tar"] == 2
    assert stats["buckets"] == Counter({(17, 32, 32): 4})


def test_ordinary_shards_and_folder_names_read_like_the_loader(tmp_path):
    """Every sample, members by extension, in tar order; a name inside a folder is keyed as the
    loader keys it ('dir/b'), where the old reader dropped it."""
    data = _sample("a", "one") + _sample("dir/b", "two") + END
    (tmp_path / "ok.tar").write_bytes(data)
    got = browse_shards(str(tmp_path / "ok.tar"))
    assert [(s["key"], s["caption"], s["meta"]["frames"]) for s in got] == [("a", "one", 17), ("dir/b", "two", 17)]
    assert shard_stats(str(tmp_path / "ok.tar"))["skipped"] == Counter()
