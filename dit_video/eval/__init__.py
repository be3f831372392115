"""Evaluation runs: in-training callbacks (samples, held-out loss, throughput) and the `evaluate`
command (evaluate.py; its prompts and real clips from the run's data in references.py, its
metrics in scores.py and heldout.py, its report in report.py). The metrics themselves live in
dit_video/metrics."""
