"""Checkpoint files that survive a kill at any moment: atomic writes, pruning, and a fall-back reader.

A checkpoint is written to a temporary file and renamed over its final name, so a kill during the
write leaves every earlier checkpoint intact; a file that does not read back completely is set aside
as ``*.corrupt`` and the previous one is used.
"""
from __future__ import annotations

import contextlib
import glob
import os
import sys

import torch


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path to write; on success it is renamed over ``path`` (a kill leaves ``path`` as it was)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    yield tmp
    os.replace(tmp, path)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class CheckpointDir:
    """``step_0000123.pt`` files in one folder: the newest ``keep`` are kept."""

    def __init__(self, path: str, keep: int):
        self.path, self.keep = path, keep
        os.makedirs(path, exist_ok=True)

    def file(self, step: int) -> str:
        return os.path.join(self.path, f"step_{step:07d}.pt")

    def list(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.path, "step_*.pt")))

    def save(self, step: int, state: dict) -> None:
        save_atomic(state, self.file(step))
        self.prune()

    def prune(self) -> None:
        for path in self.list()[: -self.keep]:
            os.remove(path)
        for tmp in glob.glob(os.path.join(self.path, "*.tmp.*")):  # leftovers of killed saves
            os.remove(tmp)

    def load_newest_good(self) -> tuple[dict | None, str | None]:
        """The newest checkpoint that reads back completely (older ones are the fall-back)."""
        for path in reversed(self.list()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True), path
            except Exception as e:  # truncated or corrupted: set it aside so pruning cannot keep it
                os.replace(path, path + ".corrupt")
                print(f"[freeflow] set aside unreadable checkpoint {path} ({type(e).__name__}: {e})",
                      file=sys.stderr)
        return None, None
