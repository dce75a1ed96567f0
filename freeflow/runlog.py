"""Run logging: metrics as JSON lines (plus TensorBoard when installed) and the progress bar."""
from __future__ import annotations

import json
import math
import os
import sys


def _row_step(line: str) -> float:
    """Step of a JSONL row; a line cut short by a kill counts as past any checkpoint (dropped)."""
    try:
        return json.loads(line).get("step", math.inf)
    except ValueError:
        return math.inf


class MetricsLog:
    """JSONL metrics (and TensorBoard when installed); on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        rows = []
        if resume_step > 0 and os.path.exists(path):
            with open(path) as f:
                rows = [line for line in f if _row_step(line) <= resume_step]
        with open(path, "w") as f:
            f.writelines(rows)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(os.path.dirname(path), "tb"))
        except Exception:  # tensorboard is optional
            pass

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])


def read_metrics(path: str) -> list[dict]:
    """The complete rows of a metrics JSONL file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip() and _row_step(line) < math.inf]


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def progress(total: int, start: int, enabled: bool, desc: str = "freeflow"):
    """A tqdm bar on the main process (a no-op elsewhere)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, file=sys.stdout)
