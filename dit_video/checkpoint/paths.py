"""Where checkpoints live: step names, the `latest` pointer, `ckpt_path=auto`, run dir -> checkpoint."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from dit_video.checkpoint.deepspeed import is_deepspeed_checkpoint
from dit_video.checkpoint.verify import verify_checkpoint
from dit_video.errors import CheckpointError

log = logging.getLogger("dit_video")

LATEST = "latest"  # pointer file: the name of the newest complete checkpoint
LAST_LINK = "last.ckpt"  # symlink to the same checkpoint, for humans and `sample.py ckpt=...`
STEP_NAME = re.compile(r"^step-(\d{8})\.ckpt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete step checkpoints in `ckpt_dir`, oldest first (temporaries are never listed)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_NAME.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names; if the pointer is missing or stale, the newest complete one."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        if STEP_NAME.match(target.name) and target.exists():
            return target
        log.warning("checkpoint pointer %s names a missing checkpoint; using the newest complete one", pointer)
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def resolve_ckpt_path(spec: str | None, ckpt_dir: Path) -> str | None:
    """`ckpt_path` as configured -> what `Trainer.fit(ckpt_path=...)` gets.

    None/"" starts fresh; "auto" resumes from the newest complete checkpoint in `ckpt_dir` (a
    fresh start if there is none, so a requeued job and its first attempt run the same command);
    anything else must exist.
    """
    if spec in (None, "", "null"):
        return None
    if spec == "auto":
        found = latest_checkpoint(ckpt_dir)
        if found is None:
            log.info("ckpt_path=auto: no checkpoint in %s, starting fresh", ckpt_dir)
            return None
        log.info("ckpt_path=auto: resuming from %s", found)
    else:
        found = Path(spec)
        if not found.exists():
            raise CheckpointError(f"ckpt_path: '{spec}' does not exist (use ckpt_path=auto to resume the newest one)")
    verify_checkpoint(found)
    return str(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or DCP folder (FSDP2), or a run directory -> its checkpoints/last.ckpt."""
    path = Path(path)
    if path.is_dir() and not (path / ".metadata").is_file() and not is_deepspeed_checkpoint(path):
        last = path / "checkpoints" / LAST_LINK
        if not last.exists():  # a file, or a link to a DCP folder
            raise CheckpointError(f"run directory '{path}' has no checkpoints/last.ckpt (is it a DiT run?)")
        return last
    return path
