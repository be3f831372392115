"""Metrics of clips, pure functions of pixels (and of local weights where a metric needs them).

  probe.py          caption faithfulness on the synthetic demo (colour, direction, shape) and its prompt set
  motion.py         camera motion (pan/tilt/zoom/still) and scene of clips against captions or reference clips
  image_metrics.py  PSNR and SSIM (VAE validation)
  frechet.py        Frechet distance between feature sets
  fvd.py            I3D features and FVD (local weights)
  clipscore.py      per-frame CLIPScore (a local CLIP folder)
"""
