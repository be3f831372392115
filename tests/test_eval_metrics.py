"""Frechet distance (closed forms), I3D/FVD with a tiny random I3D saved locally, CLIPScore with a
tiny random CLIP saved locally."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_run import calibrated_random_i3d, save_tiny_clip

from dit_video.data.synthetic import all_combinations, caption_for, render_clip
from dit_video.metrics.frechet import frechet_distance, frechet_distance_features, gaussian_stats
from dit_video.metrics.fvd import I3D, fvd, i3d_features, load_i3d, save_i3d


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run ~40x faster on one thread than on two busy ones (measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_closed_form_for_diagonal_and_commuting_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # W2^2 of diagonal Gaussians
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))  # a shared rotation keeps them commuting
    assert frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected)
    assert frechet_distance(2.0, 4.0, -1.0, 1.0) == pytest.approx(9.0 + (2 - 1) ** 2)  # 1-D: (m1-m2)^2 + (s1-s2)^2


def test_frechet_general_covariances_match_scipy_sqrtm_and_properties():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    d = frechet_distance(mu1, s1, mu2, s2)
    assert d == pytest.approx(reference, rel=1e-8)
    assert d == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)  # symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_from_samples_converges_to_the_closed_form():
    rng = np.random.default_rng(2)
    a = rng.multivariate_normal([0, 0, 0], np.diag([1.0, 2.0, 0.5]), size=20000)
    b = rng.multivariate_normal([1, 0, 0], np.diag([4.0, 2.0, 0.5]), size=20000)
    assert frechet_distance_features(a, b) == pytest.approx(1.0 + 1.0, abs=0.08)
    mu, sigma = gaussian_stats(a)
    assert mu.shape == (3,) and sigma.shape == (3, 3)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(a[:1])


@pytest.fixture(scope="module")
def demo_clips():
    rng = np.random.default_rng(0)
    combos = all_combinations()[:24]
    return np.stack([render_clip(*c, 17, 32, rng) for c in combos]), [caption_for(*c) for c in combos]


def test_i3d_full_size_and_tiny_saved_model_round_trip(tmp_path, demo_clips):
    with torch.device("meta"):
        full = I3D()
    n_params = sum(p.numel() for p in full.parameters())
    assert 12e6 < n_params < 13.5e6 and full.feature_dim == 1024  # the published RGB I3D: ~12.7M
    torch.manual_seed(0)
    tiny = I3D(width=1 / 16).eval()
    path = save_i3d(tiny, tmp_path / "i3d_tiny.safetensors")
    loaded = load_i3d(path)
    assert loaded.width == pytest.approx(1 / 16) and loaded.num_classes == 400
    clips, _ = demo_clips
    a = i3d_features(clips[:3], tiny, size=32)
    b = i3d_features(clips[:3], loaded, size=32)
    assert a.shape == (3, 400) and np.allclose(a, b)
    torch.save(tiny.state_dict(), tmp_path / "i3d_tiny.pt")
    assert np.allclose(i3d_features(clips[:3], load_i3d(tmp_path / "i3d_tiny.pt"), size=32), a)
    with pytest.raises(FileNotFoundError, match="i3d_path"):
        load_i3d(tmp_path / "missing.pt")


def test_fvd_is_zero_on_identical_sets_and_larger_for_noise(tmp_path, demo_clips):
    clips, _ = demo_clips
    model = load_i3d(save_i3d(calibrated_random_i3d(clips), tmp_path / "i3d.safetensors"))
    real_a, real_b = clips[:12], clips[12:24]
    noise = np.random.default_rng(0).integers(0, 256, real_b.shape, dtype=np.uint8)
    same = fvd(real_a, real_a, model, size=32)
    real_vs_real = fvd(real_a, real_b, model, size=32)
    real_vs_noise = fvd(real_a, noise, model, size=32)
    print(f"\nFVD (tiny random I3D): same {same:.3g}, real/real {real_vs_real:.3g}, real/noise {real_vs_noise:.3g}")
    assert same == pytest.approx(0.0, abs=1e-6)
    assert real_vs_noise > 1.5 * real_vs_real


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def test_clipscore_per_frame_matches_a_direct_computation(tiny_clip_dir, demo_clips):
    from transformers import CLIPModel

    from dit_video.metrics.clipscore import CLIPScorer, clipscore

    clips, captions = demo_clips
    result = clipscore(clips[:3], captions[:3], tiny_clip_dir)
    per_frame = np.array(result["per_frame"])
    assert per_frame.shape == (3, 17) and (per_frame >= 0).all() and (per_frame <= 100).all()
    assert result["clipscore"] == pytest.approx(np.mean(result["per_clip"]))
    # the same number straight from the model, for one frame
    scorer = CLIPScorer(tiny_clip_dir)
    model = CLIPModel.from_pretrained(str(tiny_clip_dir), local_files_only=True).eval()
    tokens = scorer.tokenizer([captions[1]], return_tensors="pt")
    with torch.no_grad():
        text = scorer._pooled(model.get_text_features(**tokens))
        image = scorer._pooled(model.get_image_features(pixel_values=scorer.preprocess(torch.as_tensor(clips[1, 5:6]))))
    cos = torch.nn.functional.cosine_similarity(text, image).item()
    assert per_frame[1, 5] == pytest.approx(100 * max(cos, 0.0), abs=1e-3)
    with pytest.raises(FileNotFoundError, match="clip_path"):
        CLIPScorer(tiny_clip_dir / "nope")
