"""Evaluation runs: in-training callbacks (samples, held-out loss, throughput) and the `evaluate`
command. The metrics themselves live in dit_video/metrics."""
