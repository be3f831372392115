"""A corpus of hostile shards, generated (no binary blobs in git): one shard per kind of damage or
attack, each beside good samples, with what the loader and `data_prep.ingest --shards` must
count for it.

    kinds = write_corpus(tmp_path)        # one {kind}.tar per kind; returns [Shard]
    python tests/hostile_shards.py OUT    # the same, to look at (prints kind, loader and ingest counts)

Every shard holds good samples `{kind}_good0` (before the damage) and, where a reader can find
them, `{kind}_good1` (after it). Good samples are 9-frame 16x16 clips at 8 fps with a caption
and size metadata; the loader reads them at (9, 16, 16) with a second, 1-frame bucket for images.
Kept whole: one catalogue of kinds, each next to what the loader and ingest must count for it.
Counts are by reason, as the loader's `skipped_by_reason` and ingest's `dropped_by_reason` give them.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from dit_video.data.shards import encode_mp4
from dit_video.data.synthetic import render_clip

T, SIZE, FPS = 9, 16, 8.0
MTIME = 1_700_000_000
META = {"fps": FPS, "frames": T, "width": SIZE, "height": SIZE}
PETABYTE = 1 << 50


@dataclass
class Shard:
    kind: str
    loader: dict[str, int]  # skips by reason when the loader reads the shard
    ingest: dict[str, int]  # drops by reason when ingest reads it
    loader_good: list[str] = field(default_factory=list)  # keys the loader yields
    ingest_good: list[str] = field(default_factory=list)  # keys ingest writes a clip for


# --- tar pieces ---------------------------------------------------------------------------

def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE, linkname: str = "",
           fmt: int = tarfile.GNU_FORMAT, pax: dict | None = None) -> bytes:
    """The header block(s) of one member (tarfile's own writer, so only what we patch is odd)."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime = size, kind, linkname, MTIME
    if pax:
        info.pax_headers = pax
    return info.tobuf(format=fmt, encoding="utf-8", errors="surrogateescape")


def member(name: str, data: bytes, **kw) -> bytes:
    return header(name, len(data), **kw) + _pad(data)


def patched(block: bytes, offset: int, value: bytes) -> bytes:
    """A 512-byte header with `value` written at `offset` and its checksum made valid again."""
    out = bytearray(block[:512])
    out[offset:offset + len(value)] = value
    out[148:156] = b" " * 8
    out[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(out))[0]
    return bytes(out) + block[512:]


def base256(number: int) -> bytes:
    """A 12-byte size field in GNU base-256 (the only way a ustar header says > 8 GiB, or < 0)."""
    if number < 0:
        return b"\xff" + (256 ** 11 + number).to_bytes(11, "big")
    return b"\x80" + number.to_bytes(11, "big")


def end() -> bytes:
    return b"\0" * 1024


def sample(key: str, mp4: bytes | None, caption: bytes | None = b"a green square moving up",
           meta: bytes | None = None, video_ext: str = "mp4") -> bytes:
    meta = json.dumps(META).encode() if meta is None else meta
    out = b""
    for ext, data in ((video_ext, mp4), ("txt", caption), ("json", meta)):
        if data is not None:
            out += member(f"{key}.{ext}", data)
    return out


# --- hostile payloads ---------------------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def huge_frame_video(side: int, frames: int = 2) -> bytes:
    """A real, decodable mov of `side` x `side` grey PNG frames: ~100 KB on disk, side**2 bytes a
    frame once decoded (3x that as RGB). Built row block by row block: making it stays small too."""
    z = zlib.compressobj(1)
    rows = bytes((side + 1) * 256)
    body = b"".join(z.compress(rows) for _ in range(side // 256)) + z.compress(bytes((side + 1) * (side % 256)))
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", body + z.flush()) + chunk(b"IEND", b""))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mov") as container:
        stream = container.add_stream("png", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = side, side, "gray"
        for i in range(frames):
            packet = av.Packet(png)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 8)
            container.mux(packet)
    return buf.getvalue()


def good_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(render_clip("red", "circle", "left", 2, SIZE, np.random.default_rng(0))[0]).save(buf, "PNG")
    return buf.getvalue()


def good_mp4(seed: int = 0, frames: int = T) -> bytes:
    return encode_mp4(render_clip("green", "square", "up", frames, SIZE, np.random.default_rng(seed)), FPS)


# --- the kinds ------------------------------------------------------------------------------
# Each returns (shard bytes, Shard expectations). `g0`/`g1`: the good samples before/after.

def _kinds() -> dict[str, Callable[[str, bytes], tuple[bytes, Shard]]]:
    kinds: dict[str, Callable] = {}

    def kind(fn):
        kinds[fn.__name__] = fn
        return fn

    def both(name, reasons, good, data, ingest=None, ingest_good=None):
        return data, Shard(name, reasons, reasons if ingest is None else ingest, good,
                           good if ingest_good is None else ingest_good)

    # structural: found by the index, the same for the loader and ingest
    @kind
    def zero_byte(k, mp4):
        return both(k, {"bad_tar": 1}, [], b"")

    @kind
    def garbage(k, mp4):
        return both(k, {"bad_tar": 1}, [], np.random.default_rng(1).bytes(5000))

    @kind
    def truncated_mid_member(k, mp4):
        data = sample(f"{k}_good0", mp4) + sample(f"{k}_bad", mp4)
        return both(k, {"bad_tar": 1}, [f"{k}_good0"], data[:len(sample(f"{k}_good0", mp4)) + 512 + len(mp4) // 2])

    @kind
    def truncated_mid_header(k, mp4):
        return both(k, {"bad_tar": 1}, [f"{k}_good0"], sample(f"{k}_good0", mp4) + header(f"{k}_bad.mp4", 10)[:300])

    @kind
    def corrupt_header_mid_shard(k, mp4):
        txt = bytearray(header(f"{k}_bad.txt", 5))
        txt[148:150] = b"99"  # the checksum no longer matches
        bad = member(f"{k}_bad.mp4", mp4) + bytes(txt) + _pad(b"hello") + member(f"{k}_bad.json", b"{}")
        data = sample(f"{k}_good0", mp4) + bad + sample(f"{k}_good1", mp4) + end()
        return both(k, {"bad_tar": 1}, [f"{k}_good0", f"{k}_good1"], data)

    @kind
    def unsafe_dotdot(k, mp4):
        data = sample(f"{k}_good0", mp4) + member(f"../{k}_bad.mp4", mp4) + sample(f"{k}_good1", mp4) + end()
        return both(k, {"unsafe_name": 1}, [f"{k}_good0", f"{k}_good1"], data)

    @kind
    def unsafe_absolute(k, mp4):
        data = sample(f"{k}_good0", mp4) + member(f"/tmp/{k}_bad.mp4", mp4) + sample(f"{k}_good1", mp4) + end()
        return both(k, {"unsafe_name": 1}, [f"{k}_good0", f"{k}_good1"], data)

    @kind
    def non_utf8_name(k, mp4):
        data = sample(f"{k}_good0", mp4) + sample(f"{k}_bad\udcff", mp4) + sample(f"{k}_good1", mp4) + end()
        return both(k, {"bad_name": 1}, [f"{k}_good0", f"{k}_good1"], data)

    @kind
    def symlink_member(k, mp4):
        bad = member(f"{k}_bad.mp4", mp4) + header(f"{k}_bad.txt", 0, tarfile.SYMTYPE, "/etc/passwd")
        data = sample(f"{k}_good0", mp4) + bad + sample(f"{k}_good1", mp4) + end()
        return both(k, {"not_a_file": 1}, [f"{k}_good0", f"{k}_good1"], data)

    @kind
    def hardlink_member(k, mp4):
        bad = header(f"{k}_bad.mp4", 0, tarfile.LNKTYPE, f"{k}_good0.mp4") + member(f"{k}_bad.txt", b"a caption")
        data = sample(f"{k}_good0", mp4) + bad + sample(f"{k}_good1", mp4) + end()
        return both(k, {"not_a_file": 1}, [f"{k}_good0", f"{k}_good1"], data)

    @kind
    def fifo_member(k, mp4):
        bad = header(f"{k}_bad.mp4", 0, tarfile.FIFOTYPE) + member(f"{k}_bad.txt", b"a caption")
        data = sample(f"{k}_good0", mp4) + bad + sample(f"{k}_good1", mp4) + end()
        return both(k, {"not_a_file": 1}, [f"{k}_good0", f"{k}_good1"], data)

    @kind
    def gnu_sparse_member(k, mp4):
        block = header(f"{k}_bad.mp4", len(mp4), tarfile.GNUTYPE_SPARSE)
        block = patched(block, 483, base256(PETABYTE))  # its claimed expanded size
        bad = block + _pad(mp4) + member(f"{k}_bad.txt", b"a caption")
        data = sample(f"{k}_good0", mp4) + bad + sample(f"{k}_good1", mp4) + end()
        return both(k, {"sparse_member": 1}, [f"{k}_good0", f"{k}_good1"], data)

    def lying_size(k, mp4, size_field):
        bad = patched(header(f"{k}_bad.mp4", len(mp4)), 124, size_field) + _pad(mp4) + member(f"{k}_bad.txt", b"x")
        data = sample(f"{k}_good0", mp4) + bad + sample(f"{k}_good1", mp4) + end()
        return both(k, {"bad_tar": 1}, [f"{k}_good0", f"{k}_good1"], data)

    @kind
    def size_claims_a_petabyte(k, mp4):
        return lying_size(k, mp4, base256(PETABYTE))

    @kind
    def size_beyond_a_c_long(k, mp4):
        return lying_size(k, mp4, base256(1 << 80))

    @kind
    def size_negative(k, mp4):
        return lying_size(k, mp4, base256(-512))  # tarfile would read the same header forever

    @kind
    def pax_size_claims_a_petabyte(k, mp4):
        bad = header(f"{k}_bad.mp4", len(mp4), fmt=tarfile.PAX_FORMAT, pax={"size": str(PETABYTE)})
        data = sample(f"{k}_good0", mp4) + bad + _pad(mp4) + member(f"{k}_bad.txt", b"x") + sample(f"{k}_good1", mp4)
        return both(k, {"bad_tar": 1}, [f"{k}_good0", f"{k}_good1"], data + end())

    @kind
    def pax_header_claims_a_terabyte(k, mp4):
        ext = patched(header("././@PaxHeader", 30, tarfile.XHDTYPE), 124, base256(1 << 40))
        data = sample(f"{k}_good0", mp4) + ext + _pad(b"30 path=whatever/name.mp4\n") + sample(f"{k}_good1", mp4)
        return both(k, {"bad_tar": 1}, [f"{k}_good0", f"{k}_good1"], data + end())

    @kind
    def gnu_longname_claims_a_terabyte(k, mp4):
        ext = patched(header("././@LongLink", 20, tarfile.GNUTYPE_LONGNAME), 124, base256(1 << 40))
        data = sample(f"{k}_good0", mp4) + ext + _pad(b"a/long/name.mp4\0") + sample(f"{k}_good1", mp4)
        return both(k, {"bad_tar": 1}, [f"{k}_good0", f"{k}_good1"], data + end())

    @kind
    def chained_pax_headers(k, mp4):
        record = b"20 comment=aaaaaaaa\n"
        chain = (header("././@PaxHeader", len(record), tarfile.XHDTYPE) + _pad(record)) * 2000
        data = sample(f"{k}_good0", mp4) + chain + sample(f"{k}_good1", mp4) + end()
        return both(k, {"bad_tar": 1}, [f"{k}_good0", f"{k}_good1"], data)  # tarfile recursed once per header

    @kind
    def non_contiguous_key(k, mp4):
        data = (sample(f"{k}_good0", mp4) + member(f"{k}_bad.mp4", mp4) + sample(f"{k}_good1", mp4)
                + member(f"{k}_bad.txt", b"a caption far from its video") + end())
        return both(k, {"non_contiguous_key": 1}, [f"{k}_good0", f"{k}_good1"], data)

    @kind
    def stray_member(k, mp4):  # the complete sample is kept; only the stray is counted
        data = (sample(f"{k}_good0", mp4) + sample(f"{k}_good1", mp4) + sample(f"{k}_good2", mp4)
                + member(f"{k}_good0.txt", b"a stray caption") + end())
        good = [f"{k}_good0", f"{k}_good1", f"{k}_good2"]
        return both(k, {"stray_member": 1}, good, data)

    @kind
    def duplicate_member(k, mp4):
        data = sample(f"{k}_good0", mp4) + sample(f"{k}_bad", mp4) + member(f"{k}_bad.mp4", mp4) + sample(f"{k}_good1", mp4)
        return both(k, {"duplicate_member": 1}, [f"{k}_good0", f"{k}_good1"], data + end())

    @kind
    def missing_video(k, mp4):
        data = sample(f"{k}_good0", mp4) + sample(f"{k}_bad", None) + sample(f"{k}_good1", mp4) + end()
        return both(k, {"missing_video": 1}, [f"{k}_good0", f"{k}_good1"], data)

    # content: found when the loader reads (or buckets) the sample; ingest reads other members
    good = lambda k: [f"{k}_good0", f"{k}_good1"]  # noqa: E731
    around = lambda k, mp4, bad: sample(f"{k}_good0", mp4) + bad + sample(f"{k}_good1", mp4) + end()  # noqa: E731

    @kind
    def image_header_claims_30000x30000(k, mp4):  # beside a good image; ingest takes videos only
        bad = sample(f"{k}_bad", png_header_only(30000, 30000), video_ext="png")
        bad += sample(f"{k}_good2", good_png(), video_ext="png")
        return both(k, {"too_large": 1}, [*good(k), f"{k}_good2"], around(k, mp4, bad), ingest={"missing_video": 2},
                    ingest_good=good(k))

    @kind
    def video_frames_of_9000x9000(k, mp4):
        bad = sample(f"{k}_bad", huge_frame_video(9000), video_ext="mov")
        return both(k, {"too_large": 1}, good(k), around(k, mp4, bad))

    @kind
    def json_nested_200000_deep(k, mp4):
        bad = sample(f"{k}_bad", mp4, meta=b"[" * 200_000 + b"]" * 200_000)
        return both(k, {"bad_json": 1}, good(k), around(k, mp4, bad))

    @kind
    def json_integer_of_5000_digits(k, mp4):
        bad = sample(f"{k}_bad", mp4, meta=b'{"width": 1' + b"0" * 5000 + b', "height": 16, "frames": 9}')
        return both(k, {"bad_json": 1}, good(k), around(k, mp4, bad))

    def bad_meta(k, mp4, **fields):  # ingest does not bucket: the sample is fine there
        meta = json.dumps({**META, **fields}).encode()  # json.dumps writes Infinity / NaN literals
        return both(k, {"bad_meta": 1}, good(k), around(k, mp4, sample(f"{k}_bad", mp4, meta=meta)),
                    ingest={}, ingest_good=[f"{k}_good0", f"{k}_bad", f"{k}_good1"])

    @kind
    def meta_height_zero(k, mp4):
        return bad_meta(k, mp4, height=0)

    @kind
    def meta_width_infinity(k, mp4):
        return bad_meta(k, mp4, width=float("inf"))

    @kind
    def meta_height_nan(k, mp4):
        return bad_meta(k, mp4, height=float("nan"))

    @kind
    def meta_negative_size(k, mp4):
        return bad_meta(k, mp4, width=-16, height=-16)

    @kind
    def meta_fps_infinity(k, mp4):
        return bad_meta(k, mp4, fps=float("inf"))

    @kind
    def meta_frames_1e400(k, mp4):
        meta = json.dumps(META).replace('"frames": 9', '"frames": 1e400').encode()
        return both(k, {"bad_meta": 1}, good(k), around(k, mp4, sample(f"{k}_bad", mp4, meta=meta)),
                    ingest={}, ingest_good=[f"{k}_good0", f"{k}_bad", f"{k}_good1"])

    @kind
    def caption_not_utf8(k, mp4):  # ingest keeps the caption with replacement characters
        bad = sample(f"{k}_bad", mp4, caption=b"\xff\xfe a caption")
        return both(k, {"bad_caption": 1}, good(k), around(k, mp4, bad), ingest={},
                    ingest_good=[f"{k}_good0", f"{k}_bad", f"{k}_good1"])

    @kind
    def no_caption(k, mp4):
        bad = sample(f"{k}_bad", mp4, caption=None)
        return both(k, {"empty_caption": 1}, good(k), around(k, mp4, bad), ingest={"missing_caption": 1})

    @kind
    def video_zero_bytes(k, mp4):
        return both(k, {"decode_error": 1}, good(k), around(k, mp4, sample(f"{k}_bad", b"")))

    @kind
    def video_garbage(k, mp4):
        bad = sample(f"{k}_bad", np.random.default_rng(2).bytes(3000))
        return both(k, {"decode_error": 1}, good(k), around(k, mp4, bad))

    @kind
    def video_truncated(k, mp4):
        return both(k, {"decode_error": 1}, good(k), around(k, mp4, sample(f"{k}_bad", mp4[:len(mp4) // 3])))

    @kind
    def video_is_a_playlist(k, mp4):
        playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
        return both(k, {"decode_error": 1}, good(k), around(k, mp4, sample(f"{k}_bad", playlist)))

    @kind
    def video_too_short(k, mp4):  # ingest has no length requirement by default
        bad = sample(f"{k}_bad", good_mp4(3, frames=4))
        return both(k, {"too_short": 1}, good(k), around(k, mp4, bad), ingest={},
                    ingest_good=[f"{k}_good0", f"{k}_bad", f"{k}_good1"])

    return kinds


KINDS = _kinds()


def write_corpus(root: str | Path, kinds: list[str] | None = None) -> list[Shard]:
    """Write one `{kind}.tar` per kind into `root`; returns what each must give."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    mp4 = good_mp4()
    shards = []
    for name in kinds or KINDS:
        data, expect = KINDS[name](name, mp4)
        (root / f"{name}.tar").write_bytes(data)
        shards.append(expect)
    shards.append(_write_too_large_sample(root, mp4))
    return shards


def _write_too_large_sample(root: Path, mp4: bytes) -> Shard:
    """A member of 3 GiB (a hole in a sparse file: no disk, no memory) between two good samples."""
    k = "sample_of_3_gib"
    big = 3 << 30
    with open(root / f"{k}.tar", "wb") as f:
        f.write(sample(f"{k}_good0", mp4) + header(f"{k}_bad.mp4", big))
        f.seek(big, io.SEEK_CUR)
        f.write(member(f"{k}_bad.txt", b"a caption") + sample(f"{k}_good1", mp4) + end())
    return Shard(k, {"too_large": 1}, {"too_large": 1}, [f"{k}_good0", f"{k}_good1"], [f"{k}_good0", f"{k}_good1"])


if __name__ == "__main__":
    for shard in write_corpus(sys.argv[1] if len(sys.argv) > 1 else "hostile-shards"):
        print(f"{shard.kind:36s} loader {shard.loader}  ingest {shard.ingest}")
