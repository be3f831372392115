"""Evaluation of generated clips."""
