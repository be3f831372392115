"""The project's exception types, at the bottom of the import graph so every layer can raise them.

Each carries a one-line message that names the field, file or sample and says what to do.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A run cannot start as configured; the message says what is missing and how to fix it."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what is wrong."""


class PromptRefused(ValueError):
    """A prompt matches the blocklist; the message names the prompt and the entry."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps: the message names the last good checkpoint to restart from."""


class SampleError(Exception):
    """One sample cannot be used. `reason` is a short fixed label the loader counts skips by
    ("decode_error", "too_short", ...); `detail` is free text for the log line."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # crosses process boundaries (the loader decodes in a child process)
        return type(self), (self.reason, self.detail)
