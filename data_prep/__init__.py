"""Offline steps that turn videos and captions into shards (run as `python -m data_prep.<step>`)."""
