"""Decoding is bounded in memory and time, in the loader and in ingest: a long source, a header
claiming huge frames, a decode that never ends. Memory is measured in a fresh process (peak
resident set growth around the call), so other tests cannot hide or cause it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from data_prep.ingest import IngestConfig, ingest, sources_from_folder
from dit_video.data.clips import VideoShardDataset
from dit_video.data.decode import TimedCall
from dit_video.data.shards import encode_mp4
from dit_video.data.synthetic import render_clip
from dit_video.errors import SampleError

ROOT = Path(__file__).resolve().parents[1]
# What the decodes below may add to a process's peak resident memory. Holding the long source's
# frames (2000 x 192 x 192 x 3 = 221 MB, twice with np.stack) or one 9000 x 9000 frame
# (81 MB grey + 243 MB RGB) is far above it; a streaming decode of 16-frame clips is far below.
BOUND_MB = 120


def long_video(frames: int = 2000, side: int = 192, fmt: str = "matroska") -> bytes:
    """A low-resolution, many-frame H.264 video (mkv records no frame count); ~1 s to make."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30", "threads": "1"}
        image = np.zeros((side, side, 3), np.uint8)
        for i in range(frames):
            image[:, :, 0] = (i * 7) % 256  # every frame differs a little: motion for ingest
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _peak_growth_mb(setup: str, work: str) -> tuple[float, dict]:
    """Run `setup`, then `work` (which sets `result`), in a fresh Python; returns (peak RSS growth
    in MB during `work`, result)."""
    code = textwrap.dedent(setup) + textwrap.dedent("""
        import json, resource
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = {}
    """) + textwrap.dedent(work) + textwrap.dedent("""
        growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps({"growth": growth, "result": result}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["growth"], out["result"]


LOADER_SETUP = textwrap.dedent("""
    import numpy as np
    from test_data_bounded import long_video
    from hostile_shards import huge_frame_video
    from dit_video.data.decode import decode_clip
    from dit_video.errors import SampleError
""")


def test_loader_decodes_a_long_source_and_a_huge_header_in_bounded_memory():
    # in one fresh process, each step's growth of the peak: a later step shows only what it adds
    # above the earlier peak, which still catches anything near the sizes above
    growth, result = _peak_growth_mb(LOADER_SETUP + "long, huge = long_video(), huge_frame_video(9000)\n", """
        steps = {}
        for backend in ("pyav", "auto"):  # mkv has no frame count; auto = decord
            start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            shape = decode_clip(long, 16, None, np.random.default_rng(0), backend).shape
            steps[backend] = [list(shape), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024]
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode_clip(huge, 1, None, np.random.default_rng(0), "auto")
        except SampleError as err:
            steps["huge"] = [err.reason, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024]
        result = steps
    """)
    assert result["pyav"][0] == result["auto"][0] == [16, 192, 192, 3] and result["huge"][0] == "too_large"
    assert growth < BOUND_MB, f"the decodes grew the process by {growth:.0f} MB ({result})"


def _spin(seconds: float) -> int:
    """A decode that never returns in time (a decoder stuck in a loop)."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def test_a_timed_out_loader_decode_is_stopped_not_abandoned():
    timed = TimedCall(0.5)
    assert timed(_spin, 0.0) >= 0
    pid = timed._call._child[0]  # the decode process, alive between calls
    os.kill(pid, 0)
    start = time.monotonic()
    with pytest.raises(SampleError, match="decode_timeout"):
        timed(_spin, 60.0)
    assert time.monotonic() - start < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: nothing goes on spinning (or allocating)
    assert timed(_spin, 0.0) >= 0  # the next call gets a fresh process


def test_a_decode_process_that_dies_is_a_decode_error():
    timed = TimedCall(5.0)
    with pytest.raises(SampleError, match="decode_error.*died"):
        timed(os._exit, 3)
    assert timed(len, "abc") == 3


INGEST_SETUP = textwrap.dedent("""
    import tempfile
    from collections import Counter
    from pathlib import Path
    import data_prep.ingest.process as process
    from data_prep.ingest import IngestConfig, process_source
    from dit_video.data.shards import ShardWriter
    from test_data_bounded import long_video
    from hostile_shards import huge_frame_video
    root = Path(tempfile.mkdtemp())
    (root / "long.mkv").write_bytes(long_video())
    (root / "huge.mov").write_bytes(huge_frame_video(9000))

    def run(name, **options):
        drops = Counter()
        with ShardWriter(root / "out", prefix=name.split(".")[0]) as writer:
            rows = process_source({"id": "x", "path": str(root / name), "source": name, "caption": "a video"},
                                  IngestConfig(out=str(root / "out"), **options), writer, drops)
        return {"rows": len(rows), "drops": dict(drops)}
""")


def test_ingest_decodes_a_long_source_and_a_huge_header_in_bounded_memory():
    # Each source would be held whole by a decode-everything-then-filter ingest: the long one at
    # full resolution, one clip, dropped only by the motion filter or by its length.
    growth, result = _peak_growth_mb(INGEST_SETUP, """
        result = {"motion": run("long.mkv", max_size=None, min_motion=1000.0),
                  "length": run("long.mkv", max_size=None, max_duration=4.0),
                  "huge": run("huge.mov")}
        for call in getattr(process, "_isolated", {}).values():
            call.close()  # reaped: its peak counts in RUSAGE_CHILDREN
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result["children_growth"] = (children - before) / 1024
    """)
    assert result["motion"] == {"rows": 0, "drops": {"low_motion": 1}}
    assert result["length"] == {"rows": 0, "drops": {"too_long": 1}}
    assert result["huge"] == {"rows": 0, "drops": {"too_large": 1}}
    growth = max(growth, result["children_growth"])  # the decode runs in a child process
    assert growth < BOUND_MB, f"ingesting a long source grew the process by {growth:.0f} MB"


def test_ingest_decode_timeout_kills_the_work(tmp_path):
    source = tmp_path / "long.mkv"
    source.write_bytes(long_video(2000))
    src = {"id": "long", "path": str(source), "source": "long", "caption": "a long video"}
    start = time.monotonic()
    report = ingest([src, {"id": "ok", "path": str(source), "source": "ok", "caption": "the same, quick",
                           "end": 0.5}],
                    IngestConfig(out=str(tmp_path / "out"), max_size=None, decode_timeout=1.0))
    assert report["dropped_by_reason"] == {"decode_timeout": 1} and report["clips_written"] == 1
    assert time.monotonic() - start < 30


def test_a_truncated_source_is_re_encoded_and_its_clip_decodes_in_the_loader(tmp_path):
    clip = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)  # noise: big frames
    whole = tmp_path / "whole.mp4"  # H.264 mp4 with the index (moov) before the data (faststart)
    with av.open(str(whole), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.options = {"threads": "1", "x264-params": "bframes=0"}
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = whole.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])  # mdat cut: the index still says 40 frames
    (raw / "cut.txt").write_text("a green square moving up")
    out = tmp_path / "out"
    report = ingest(sources_from_folder(str(raw)),
                    IngestConfig(out=str(out)))
    assert report["clips_written"] == 1
    row = json.loads((out / "manifest.jsonl").read_text())
    assert row["reencoded"] is True and 0 < row["frames"] < 40
    items = list(VideoShardDataset(str(out / "*.tar"), row["frames"], None, (64, 64), infinite=False))
    assert len(items) == 1 and items[0]["skipped_by_reason"] == {}


def test_encode_mp4_is_byte_identical_under_load():


    frames = render_clip("red", "circle", "left", 17, 64, np.random.default_rng(3))
    with ThreadPoolExecutor(4) as pool:  # four encodes at once compete for the cores
        encoded = list(pool.map(lambda _: encode_mp4(frames, 8.0), range(8)))
    assert len(set(encoded)) == 1
