"""Crash-safe checkpoints: a checkpoint counts only once it is complete.

The Trainer writes a checkpoint folder in several steps (model, optimizer, scheduler, RNG
states, trainer state). A process killed between two of them leaves a folder that looks like a
checkpoint but cannot be resumed from. anglekit therefore

* flushes every file of a finished checkpoint to disk and then writes a marker file
  (:data:`COMPLETE_MARKER`) atomically, as the very last step of the save;
* deletes older checkpoints (``save_total_limit``) only after that marker exists, so the
  previous complete checkpoint survives any kill during a save;
* resumes from the newest checkpoint *with* the marker, removing newer incomplete ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from anglekit._files import atomic_file

__all__ = ["COMPLETE_MARKER", "last_complete_checkpoint", "mark_complete"]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "anglekit_checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint: str | Path, step: int) -> None:
    """Flush a checkpoint's files to disk, then mark the checkpoint complete."""
    checkpoint = Path(checkpoint)
    for path in checkpoint.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    with atomic_file(checkpoint / COMPLETE_MARKER) as f:
        f.write(json.dumps({"step": step}) + "\n")


def last_complete_checkpoint(output_dir: str | Path, remove_incomplete: bool = True) -> str | None:
    """The newest complete checkpoint in ``output_dir``, or ``None``.

    Args:
        output_dir: the training output folder holding ``checkpoint-<step>`` folders.
        remove_incomplete: delete incomplete checkpoints newer than the one returned (left by
            a process killed while saving), so they are neither resumed from nor rotated.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name))),
        reverse=True,
    )
    for _, path in found:
        if (path / COMPLETE_MARKER).is_file():
            return str(path)
        logger.warning("skipping incomplete checkpoint %s (interrupted while saving)", path)
        if remove_incomplete:
            shutil.rmtree(path)
    return None
